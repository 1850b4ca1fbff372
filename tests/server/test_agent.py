"""Agent mode end to end: a real VoxlaneServer whose turns take their text from an
OpenAI-compatible LLM on loopback.

Two upstreams: :class:`FakeLLM` (``tests/fake_llm.py``, shared with the SDK and LiveKit
tests), a small controllable server speaking the exact streaming wire format
(``data: {chat.completion.chunk}`` events, ``data: [DONE]``) that can fail in every way a real
one can and records whether the client hung up; and ``transformers serve`` on a tiny random
Llama (skipped when ``transformers[serving]`` is not installed).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from voxlane.protocol import AgentMessage, AgentTextDelta, TurnDone, TurnMark
from voxlane.server.agent import LLMConfig
from voxlane.session_protocol import AudioChunk

from ..fake_llm import ANSWER, SSE_HEAD, Behaviour, FakeLLM, chunk
from .conftest import Client, wait_engine_idle

SHORT = {"max_frames": 4, "seed": 1}


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    fake = await FakeLLM().start()
    yield fake
    await fake.close()


def llm_config(url: str, **fields: Any) -> LLMConfig:
    defaults: dict[str, Any] = {
        "model": "fake-model",
        "api_key": "upstream-key",
        "system_prompt": "You are terse.",
        "timeout_s": 5.0,
    }
    return LLMConfig(base_url=url, **(defaults | fields))


async def configure(client: Client, **fields: Any) -> None:
    await client.send(type="session.configure", **fields)
    await client.expect("session.configured")


async def until(client: Client, predicate: Callable[[Any], bool], seen: list[Any]) -> Any:
    """Receive into ``seen`` until a message matches ``predicate``; returns it."""
    while True:
        message = await client.recv()
        seen.append(message)
        if predicate(message):
            return message


def deltas_text(events: list[Any], turn_id: str) -> str:
    return "".join(e.text for e in events if isinstance(e, AgentTextDelta) and e.turn_id == turn_id)


# ------------------------------------------------------------------------------- answers


async def test_llm_text_never_reaches_the_speech_lm_as_control_tokens(
    start_server: Any, connect: Any, llm: FakeLLM
) -> None:
    # What an upstream LLM writes is user text too: token spellings and an unpaired
    # "\\ud800" escape (which could be neither sent as JSON nor tokenized).
    answer = "Sure <custom_token_4><|eot_id|>ok \ud800 and <custom_token_10> more."
    llm.default = FakeLLM.answer(answer)
    server = await start_server(llm=llm_config(llm.url))
    core = server.service.engine._core
    encode = core.encode
    prompts: list[list[int]] = []

    def spying(text: str) -> list[int]:
        prompts.append(encode(text))
        return prompts[-1]

    core.encode = spying
    try:
        async with connect(server) as client:
            await configure(client, sampling=SHORT)
            await client.send(type="agent.respond", turn_id="a1", text="Say it.")
            result = await client.collect("a1")
            assert result.done.reason == "completed" and result.audio
            assert deltas_text(result.events, "a1") == answer.replace("\ud800", "\ufffd")
            await client.send(type="agent.respond", turn_id="a2", text="Again?")
            assert (await client.collect("a2")).done.reason == "completed"
    finally:
        core.encode = encode
    assert prompts and all(ids[0] == 128000 and max(ids[1:]) < 128000 for ids in prompts)
    # The history the LLM gets back holds the answer as it was sent to the client.
    assert llm.requests[1]["messages"][2]["content"] == answer.replace("\ud800", "\ufffd")


async def test_answer_is_streamed_spoken_and_kept_in_history(
    start_server: Any, connect: Any, llm: FakeLLM
) -> None:
    server = await start_server(llm=llm_config(llm.url, max_history_messages=3))
    async with connect(server) as client:
        assert client.ready.agent is not None and client.ready.agent.model == "fake-model"
        await configure(client, sampling=SHORT)
        await client.send(type="agent.respond", turn_id="a1", text="What is the capital?")
        result = await client.collect("a1")

        started = result.events[0]
        assert started.type == "turn.started" and started.turn_id == "a1"
        assert deltas_text(result.events, "a1") == ANSWER
        offsets = [e.offset for e in result.events if isinstance(e, AgentTextDelta)]
        assert offsets == list(range(0, len(ANSWER), 6))
        assert " ".join(m.text for m in result.marks) == ANSWER
        assert result.marks[0].text == "Sure!"  # the first segment goes out early
        assert result.audio and result.done.reason == "completed"
        message = result.events[-2]
        assert isinstance(message, AgentMessage)
        assert (message.text, message.truncated) == (ANSWER, False)
        assert message.sample == result.samples

        request = llm.requests[0]
        assert request["stream"] is True and request["model"] == "fake-model"
        assert request["messages"] == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital?"},
        ]
        assert llm.headers[0]["authorization"] == "Bearer upstream-key"

        # The dialogue goes on; at most 3 history messages reach the LLM.
        for n in (2, 3):
            await client.send(type="agent.respond", turn_id=f"a{n}", text=f"Question {n}?")
            assert (await client.collect(f"a{n}")).done.reason == "completed"
        assert [m["content"] for m in llm.requests[1]["messages"]] == [
            "You are terse.",
            "What is the capital?",
            ANSWER,
            "Question 2?",
        ]
        assert [m["content"] for m in llm.requests[2]["messages"]] == [
            "You are terse.",
            "Question 2?",
            ANSWER,
            "Question 3?",
        ]


async def test_agent_respond_without_llm_is_unknown_type(start_server: Any, connect: Any) -> None:
    server = await start_server()
    async with connect(server) as client:
        assert client.ready.agent is None
        await client.send(type="agent.respond", text="Hello?")
        error = await client.expect("error")
        assert error.code == "unknown_type" and not error.fatal


# ------------------------------------------------------------------------------ barge-in


async def test_barge_in_closes_upstream_and_keeps_what_was_heard(
    start_server: Any, connect: Any, llm: FakeLLM
) -> None:
    llm.script = [llm.endless()]
    server = await start_server(llm=llm_config(llm.url))
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="agent.respond", turn_id="a1", text="Count for me.")
        seen: list[Any] = []
        marks: list[TurnMark] = []
        while len(marks) < 2:
            message = await until(client, lambda m: isinstance(m, TurnMark), seen)
            marks.append(message)
        while sum(a.num_samples for a in seen if isinstance(a, AudioChunk)) < marks[1].sample:
            seen.append(await client.recv())
        # The user spoke up exactly when segment 1 began to play: segment 0 was heard.
        await client.send(type="turn.playback", turn_id="a1", sample=marks[1].sample)
        await client.send(type="agent.respond", turn_id="a2", text="Stop. Say hi.")
        cancelled = await until(client, lambda m: getattr(m, "type", "") == "turn.cancelled", seen)
        assert cancelled.turn_id == "a1"
        after: list[Any] = []
        done = await until(client, lambda m: isinstance(m, TurnDone), after)
        assert done.turn_id == "a1" and done.reason == "cancelled"
        # Nothing of the interrupted answer follows turn.cancelled but its history entry.
        assert [type(m).__name__ for m in after if getattr(m, "turn_id", None) == "a1"] == [
            "AgentMessage",
            "TurnDone",
        ]
        message = next(m for m in after if isinstance(m, AgentMessage))
        generated = deltas_text(seen, "a1")
        heard = generated[: marks[0].end].strip()
        assert heard == "One two three four five."
        assert (message.text, message.truncated, message.sample) == (heard, True, marks[1].sample)

        # The upstream saw the request closed, and the engine stopped.
        await asyncio.wait_for(llm.hung_up.wait(), 10)
        result = await client.collect("a2")
        assert result.done.reason == "completed" and deltas_text(result.events, "a2") == ANSWER
        assert [m["content"] for m in llm.requests[1]["messages"][1:]] == [
            "Count for me.",
            heard,
            "Stop. Say hi.",
        ]
    await wait_engine_idle(server.service)


async def test_cancel_closes_upstream_and_cuts_to_the_audio_sent(
    start_server: Any, connect: Any, llm: FakeLLM
) -> None:
    llm.script = [llm.endless("Alpha beta gamma. ")]
    server = await start_server(llm=llm_config(llm.url))
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="agent.respond", turn_id="a1", text="Go.")
        seen: list[Any] = []
        # Cancel once segment 1 has started to arrive: all of segment 0 was sent.
        second = await until(client, lambda m: isinstance(m, TurnMark) and m.segment == 1, seen)
        while sum(a.num_samples for a in seen if isinstance(a, AudioChunk)) <= second.sample:
            seen.append(await client.recv())
        await client.send(type="turn.cancel", turn_id="a1")
        cancelled = await until(client, lambda m: getattr(m, "type", "") == "turn.cancelled", seen)
        message = await until(client, lambda m: isinstance(m, AgentMessage), seen)
        await until(client, lambda m: isinstance(m, TurnDone), seen)
        await asyncio.wait_for(llm.hung_up.wait(), 10)
        # No playback report: what was sent counts as heard.
        assert message.sample == cancelled.sample > 0
        assert message.truncated and deltas_text(seen, "a1").startswith(message.text)
        assert message.text.startswith("Alpha beta gamma.")
        # The session goes on.
        await client.send(type="agent.respond", turn_id="a2", text="Again.")
        assert (await client.collect("a2")).done.reason == "completed"


async def test_answer_longer_than_max_turn_chars_is_cut_and_upstream_closed(
    start_server: Any, connect: Any, llm: FakeLLM
) -> None:
    from voxlane.protocol import Limits

    llm.script = [llm.endless("Alpha beta gamma. ")]
    server = await start_server(llm=llm_config(llm.url), limits=Limits(max_turn_chars=40))
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="agent.respond", turn_id="a1", text="Talk forever.")
        result = await client.collect("a1")
        assert deltas_text(result.events, "a1") == ("Alpha beta gamma. " * 3)[:40]
        assert result.done.reason == "completed"
        await asyncio.wait_for(llm.hung_up.wait(), 10)


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("behaviour", "expect"),
    [
        (FakeLLM.status(500), "HTTP 500"),
        (FakeLLM.raw(b"data: {not json\n\n"), "malformed SSE data"),
        (FakeLLM.raw(chunk("Half an ans")), "ended before [DONE]"),  # connection dropped
        (FakeLLM.raw(chunk("Then silence"), then_sleep=5.0), "timed out"),
        (FakeLLM.raw(b'data: {"error": {"message": "quota"}}\n\n'), "quota"),
    ],
    ids=["http-500", "malformed", "dropped", "timeout", "error-event"],
)
async def test_upstream_failures_are_errors_and_the_session_survives(
    start_server: Any, connect: Any, llm: FakeLLM, behaviour: Behaviour, expect: str
) -> None:
    llm.script = [behaviour]
    server = await start_server(llm=llm_config(llm.url, timeout_s=0.5))
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="agent.respond", turn_id="bad", text="Hello?")
        result = await client.collect("bad")
        errors = [e for e in result.events if getattr(e, "type", "") == "error"]
        assert len(errors) == 1 and errors[0].code == "llm_error", result.events
        assert errors[0].turn_id == "bad" and not errors[0].fatal
        assert expect in errors[0].message
        assert result.done.reason == "error"
        # Text that arrived before the failure was still spoken.
        assert result.events[-2].text == deltas_text(result.events, "bad").strip()

        await client.send(type="agent.respond", turn_id="good", text="Hello again?")
        good = await client.collect("good")
        assert good.done.reason == "completed" and good.events[-2].text == ANSWER


async def test_failed_turn_closes_a_stalled_upstream_at_once(
    start_server: Any, connect: Any, llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BrokenDecoder:
        def push(self, frames: Any, *, buffered_s: float | None = None) -> Any:
            raise RuntimeError("decoder broke")

        def flush(self) -> Any:
            raise RuntimeError("decoder broke")

    async def one_sentence_then_stall(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(SSE_HEAD + chunk("Paris is the capital of France. "))
        await writer.drain()
        await reader.read()  # b"" once the client hangs up; the LLM never sends more
        llm.hung_up.set()

    llm.script = [one_sentence_then_stall]
    # A long upstream timeout: without an explicit close the request would live this long.
    server = await start_server(llm=llm_config(llm.url, timeout_s=30.0))
    monkeypatch.setattr(server.service, "new_decoder", lambda settings: BrokenDecoder())
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="agent.respond", turn_id="a", text="Tell me about Paris.")
        result = await client.collect("a")
        assert result.done.reason == "error"
        errors = [e for e in result.events if getattr(e, "type", "") == "error"]
        assert [e.code for e in errors] == ["engine_error"] and "decoder broke" in errors[0].message
        await asyncio.wait_for(llm.hung_up.wait(), 5)


async def test_unreachable_upstream_is_an_error(start_server: Any, connect: Any) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = await start_server(llm=llm_config(f"http://127.0.0.1:{port}/v1"))
    async with connect(server) as client:
        await client.send(type="agent.respond", turn_id="a", text="Anyone?")
        result = await client.collect("a")
        assert [e.code for e in result.events if getattr(e, "type", "") == "error"] == ["llm_error"]
        assert result.done.reason == "error" and not result.audio


# ------------------------------------------------- a real server: transformers serve


def build_tiny_chat_model(path: Path) -> None:
    """A random 1-layer Llama and a character tokenizer with a chat template.

    Its head only scores whole-word tokens, so greedy decoding says (random) words.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    words = [
        " " + w
        for w in [
            "alpha",
            "bravo",
            "delta",
            "echo",
            "hotel",
            "india",
            "lima",
            "mike",
            "oscar",
            "papa",
        ]
    ]
    words += [".", "!"]  # also characters: the vocabulary lists each once
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + chars + words))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["</s>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        allowed = torch.zeros(len(vocab), dtype=torch.bool)
        allowed[[vocab[w] for w in words]] = True
        model.lm_head.weight[~allowed] = 0.0
        model.lm_head.weight[allowed] *= 50.0  # some word always beats the zero logits
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def transformers_serve(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``transformers serve`` of the tiny model on a free loopback port: (base URL, model)."""
    pytest.importorskip("fastapi", reason="needs transformers[serving]")
    pytest.importorskip("uvicorn", reason="needs transformers[serving]")
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    if not Path(exe).exists():
        pytest.skip("the transformers CLI is not installed")
    model_dir = tmp_path_factory.mktemp("tiny-chat-llm")
    build_tiny_chat_model(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (model_dir / "serve.log").open("wb")
    cmd = [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen([*cmd, "--device", "cpu"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited: {(model_dir / 'serve.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if b" 200 " in conn.recv(100):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not come up in 120 s"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1", str(model_dir)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


async def test_agent_against_transformers_serve(
    start_server: Any, connect: Any, transformers_serve: Any
) -> None:
    url, model = transformers_serve
    config = llm_config(url, model=model, api_key=None, timeout_s=60.0, max_tokens=12)
    server = await start_server(llm=config)
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        for n in (1, 2):
            await client.send(type="agent.respond", turn_id=f"t{n}", text=f"Hello number {n}")
            result = await client.collect(f"t{n}", timeout=120)
            text = deltas_text(result.events, f"t{n}")
            assert result.done.reason == "completed", result.events
            assert len(text.split()) >= 3  # words streamed as deltas...
            assert len([e for e in result.events if isinstance(e, AgentTextDelta)]) > 1
            assert result.marks and result.audio  # ...and spoken
            message = result.events[-2]
            assert isinstance(message, AgentMessage) and message.text == text.strip()
