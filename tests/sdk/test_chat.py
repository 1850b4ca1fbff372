"""Agent mode from the client side: ``Session.respond`` / ``Turn.report_playback`` in process,
and ``voxlane chat`` as a process, against a real server whose LLM is a loopback
OpenAI-compatible SSE endpoint (the wire format of ``chat.completion.chunk`` streams)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

import voxlane
from voxlane.client import TextDelta
from voxlane.server.agent import LLMConfig

from ..fake_llm import FakeLLM
from .conftest import KEY

ANSWER = "Hello! Nice to meet you."
ENDLESS = "One two three four five. "


@pytest.fixture
async def agent_server(start_server: Any) -> AsyncIterator[tuple[Any, FakeLLM]]:
    async with FakeLLM.barge_in(ENDLESS, ANSWER) as llm:
        server = await start_server(llm=LLMConfig(base_url=llm.url, model="loopback"))
        yield server, llm
        await server.close()


async def test_respond_yields_text_and_audio_and_barge_in_keeps_what_was_played(
    agent_server: Any,
) -> None:
    server, llm = agent_server
    async with voxlane.connect(server.url, api_key=KEY) as session:
        assert session.ready is not None and session.ready.agent is not None
        first = await session.respond("Count for me.")
        played = 0
        async for event in first:
            if isinstance(event, voxlane.AudioChunk):
                played += event.num_samples
            if first.text.count(".") >= 2 and played:
                break  # the user speaks up
        # Only the first 10 ms were played: nothing whole was heard.
        await first.report_playback(240)
        second = await session.respond("Stop. Say hello.")
        events = [event async for event in second]
        assert first.is_done and first.done is not None and first.done.reason == "cancelled"
        assert first.message is not None and first.message.truncated
        assert (first.message.text, first.message.sample) == ("", 240)
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == ANSWER
        assert second.text == ANSWER and any(isinstance(e, voxlane.AudioChunk) for e in events)
        assert second.message is not None and second.message.text == ANSWER
        await asyncio.wait_for(llm.hung_up.wait(), 10)
        # The answer nobody heard is not in the dialogue the LLM sees next.
        assert [m["content"] for m in llm.requests[1]["messages"]] == [
            "Count for me.",
            "Stop. Say hello.",
        ]
        # Played after the fact (generation ran ahead of playback): the history shrinks.
        await second.report_playback(0)
        for _ in range(100):
            if second.message.text == "":
                break
            await asyncio.sleep(0.02)
        assert second.message.text == "" and second.message.truncated


async def test_respond_without_agent_mode_raises(server: Any) -> None:
    async with voxlane.connect(server.url, api_key=KEY) as session:
        turn = await session.respond("Hi?")
        with pytest.raises(voxlane.UnknownMessageError, match="agent mode is off"):
            async for _ in turn:
                pass


async def test_chat_command_answers_and_is_interrupted_by_typing(
    agent_server: Any, tmp_path: Path
) -> None:
    server, llm = agent_server
    args = ["-m", "voxlane.cli", "chat", "--url", server.url, "--api-key", KEY]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        "--out-dir",
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(b"Count for me.\n")
        await process.stdin.drain()
        seen = b""
        while seen.count(b".") < 3:  # the endless answer is streaming
            seen += await asyncio.wait_for(process.stdout.read(64), 60)
        process.stdin.write(b"Stop. Say hello.\n")
        await process.stdin.drain()
        process.stdin.close()
        out, err = await asyncio.wait_for(process.communicate(), 120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    stdout = (seen + out).decode()
    assert process.returncode == 0, err.decode()
    assert stdout.startswith("assistant: One two three four five.")
    assert "[interrupted]" in stdout
    assert stdout.rstrip().endswith(f"assistant: {ANSWER}")
    assert llm.hung_up.is_set()
    # Written instead of played: the cut is the audio the server sent (how much of it
    # there was depends on timing), never more than the text printed before the interrupt.
    history = llm.requests[1]["messages"]
    assert history[0] == {"role": "user", "content": "Count for me."}
    assert history[-1] == {"role": "user", "content": "Stop. Say hello."}
    interrupted = stdout.split("[interrupted]")[0].removeprefix("assistant: ")
    assert all(interrupted.startswith(m["content"]) for m in history[1:-1])
    assert (tmp_path / "answer-1.wav").exists()  # what arrived before the interrupt, maybe none
    assert sf.info(tmp_path / "answer-2.wav").frames > 0
