"""The WebSocket server end to end: a real VoxlaneServer on loopback, the tiny demo LM and the
demo SNAC, raw protocol-v1 clients. Every test's teardown checks that nothing leaked."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import socket
import time
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voxlane.errors import EngineError
from voxlane.protocol import (
    CloseCode,
    Limits,
    TurnCancelled,
    TurnDone,
    TurnMark,
)
from voxlane.server.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME
from voxlane.session_protocol import AudioChunk

from .conftest import KEY, Client, wait_engine_idle

SHORT = {"max_frames": 4, "seed": 1}
TEXT = "Hello there, how are you today? I am fine, thanks."


async def configure(client: Client, **fields: Any) -> Any:
    await client.send(type="session.configure", **fields)
    return await client.expect("session.configured")


def engine_requests(server: Any) -> dict[int, Any]:
    return server.service.engine._core.requests


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A plain HTTP/1.1 GET (no upgrade): status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


# ------------------------------------------------------------------------------ streaming


async def test_turn_streamed_from_text_deltas(start_server: Any, connect: Any) -> None:
    server = await start_server()
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="turn.start", turn_id="t1")
        started = await client.expect("turn.started")
        assert (started.turn_number, started.queued, started.voice) == (1, False, "tara")
        # An LLM stream: words split into sub-word deltas.
        for word in TEXT.split(" "):
            for piece in (word[:2], word[2:] + " "):
                await client.send(type="turn.append", turn_id="t1", text=piece)
        await client.send(type="turn.end", turn_id="t1")
        result = await client.collect("t1")

    audio = result.audio
    assert audio, "no audio arrived"
    # Header fields: this turn's number (ClientSession mapped it to t1), gap-free sequence,
    # sample offsets that continue exactly where the previous frame ended.
    assert {a.turn_id for a in audio} == {"t1"}
    assert [a.sequence for a in audio] == list(range(len(audio)))
    offsets = np.cumsum([0] + [a.num_samples for a in audio[:-1]])
    assert [a.sample_offset for a in audio] == offsets.tolist()
    # 40 ms chunks at 24 kHz; only the very last may be shorter.
    assert all(a.num_samples == 960 for a in audio[:-1])
    assert 0 < audio[-1].num_samples <= 960
    done = result.done
    assert done.reason == "completed"
    m = done.metrics
    assert m.samples == result.samples
    assert m.audio_s == pytest.approx(result.samples / SAMPLE_RATE)
    # Every segment decodes to whole 2,048-sample frames at 24 kHz.
    assert result.samples % SAMPLES_PER_FRAME == 0
    assert m.segments == len(result.marks) == 2
    assert m.time_to_first_audio_s is not None and m.time_to_first_audio_s > 0
    assert m.rtf == pytest.approx(m.generation_s / m.audio_s)
    assert [mk.text for mk in result.marks] == [
        "Hello there, how are you today?",
        "I am fine, thanks.",
    ]


@pytest.mark.parametrize("sample_format", ["pcm_s16le", "pcm_f32le"])
async def test_chunk_sizes_exact_for_every_rate_and_chunk_length(
    start_server: Any, connect: Any, sample_format: str
) -> None:
    server = await start_server()
    width = 2 if sample_format == "pcm_s16le" else 4
    async with connect(server) as client:
        for rate in (8000, 16000, 24000, 48000):
            for chunk_ms in (20, 40, 80):
                await configure(
                    client,
                    sample_rate=rate,
                    chunk_ms=chunk_ms,
                    sample_format=sample_format,
                    sampling={"max_frames": 2, "seed": 3},
                )
                turn_id = f"r{rate}-c{chunk_ms}"
                result = await client.speak(turn_id, "Hi there.")
                per_chunk = rate * chunk_ms // 1000
                audio = result.audio
                assert audio, turn_id
                assert all(a.sample_format == sample_format for a in audio)
                assert all(len(a.pcm) % width == 0 for a in audio)
                assert [a.num_samples for a in audio[:-1]] == [per_chunk] * (len(audio) - 1)
                assert 0 < audio[-1].num_samples <= per_chunk
                assert result.done.metrics.samples == result.samples
                # Resampling keeps the duration: whole 24 kHz frames, scaled to the rate.
                frames = result.samples * SAMPLE_RATE / rate / SAMPLES_PER_FRAME
                assert abs(frames - round(frames)) * SAMPLES_PER_FRAME * rate / SAMPLE_RATE < 2


async def test_marks_carry_text_and_sample_offsets(start_server: Any, connect: Any) -> None:
    server = await start_server()
    raw = "First, a **short** one here. Then the second sentence comes. And a third one!"
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        result = await client.speak("m", raw)
        await configure(client, sample_rate=16000)
        resampled = await client.speak("m16", raw)

    marks = result.marks
    assert [m.segment for m in marks] == [0, 1, 2]
    assert [m.text for m in marks] == [
        "First, a short one here.",
        "Then the second sentence comes.",
        "And a third one!",
    ]
    # Offsets into the raw text (markdown included) that touch and cover it.
    assert marks[0].start == 0 and marks[-1].end == len(raw)
    assert all(a.end == b.start for a, b in itertools.pairwise(marks))
    # A mark precedes its segment's first frame and points inside the turn's audio.
    samples = [m.sample for m in marks]
    assert samples[0] == 0
    assert samples == sorted(samples) and len(set(samples)) == 3
    assert samples[-1] < result.samples
    assert all(s % SAMPLES_PER_FRAME == 0 for s in samples)  # segment = whole frames
    for mark in marks:
        index = result.events.index(mark)
        sent_before = sum(a.num_samples for a in result.events[:index] if isinstance(a, AudioChunk))
        assert sent_before <= mark.sample
    # Same seed and text at 16 kHz: the same frames, offsets scaled by 2/3.
    assert [m.sample for m in resampled.marks] == [round(s * 2 / 3) for s in samples]


# --------------------------------------------------------------------------------- cancel


async def test_cancel_stops_audio_and_generation(start_server: Any, connect: Any) -> None:
    server = await start_server()
    async with connect(server) as client:
        await configure(client, sampling={"max_frames": 400, "seed": 1})
        await client.send(type="turn.start", turn_id="long")
        await client.expect("turn.started")
        await configure(client, sampling=SHORT)  # for turns started from now on
        await client.send(type="turn.start", turn_id="next")
        assert (await client.expect("turn.started")).queued
        await client.send(type="turn.append", turn_id="long", text=TEXT)
        await client.send(type="turn.end", turn_id="long")
        received = 0
        while True:  # wait for audio to flow
            message = await client.recv()
            if isinstance(message, AudioChunk):
                received += message.num_samples
                break
        # Cancel, and at once give the queued turn its text: it becomes active when the
        # cancelled one is done, and none of its text may be lost on the way.
        await client.send(type="turn.cancel", turn_id="long")
        await client.send(type="turn.append", turn_id="next", text="And now something short.")
        await client.send(type="turn.end", turn_id="next")
        after_ack: list[Any] = []
        cancelled: TurnCancelled | None = None
        while True:
            message = await client.recv()
            if isinstance(message, TurnDone):
                assert message.turn_id == "long"
                done = message
                break
            if cancelled is not None:
                after_ack.append(message)
            elif isinstance(message, TurnCancelled):
                cancelled = message
            elif isinstance(message, AudioChunk):
                received += message.num_samples  # in flight before the ack
        assert cancelled is not None
        assert after_ack == [], "audio or marks of the turn followed turn.cancelled"
        assert cancelled.sample == received
        assert done.reason == "cancelled"
        assert done.metrics.samples == received
        # The engine dropped the request (it would otherwise run for 400 frames).
        deadline = time.monotonic() + 5
        while engine_requests(server):
            assert time.monotonic() < deadline, "the engine still runs the cancelled segment"
            await asyncio.sleep(0.01)
        states = list(server.service.engine._core.sessions.values())
        assert all(s.active is None and not s.queue for s in states)
        # Nothing of the old turn arrives later, and the next turn speaks all its text.
        result = await client.collect("next")
        assert result.done.reason == "completed" and result.audio
        assert {a.turn_id for a in result.audio} == {"next"}
        assert [m.text for m in result.marks] == ["And now something short."]


async def test_cancel_of_queued_turn_and_repeated_cancel(start_server: Any, connect: Any) -> None:
    server = await start_server()
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="turn.start", turn_id="a")  # active, waits for text
        await client.send(type="turn.start", turn_id="b", text="Queued text.", end=True)
        await client.expect("turn.started")
        assert (await client.expect("turn.started")).queued
        await client.send(type="turn.cancel", turn_id="b")
        assert (await client.expect("turn.cancelled")).sample == 0
        assert (await client.expect("turn.done")).reason == "cancelled"
        await client.send(type="turn.cancel", turn_id="b")
        assert (await client.expect("error")).code == "unknown_turn"
        await client.send(type="turn.cancel", turn_id="a")
        await client.expect("turn.cancelled")
        await client.send(type="turn.cancel", turn_id="a")  # before turn.done, maybe
        rest = [await client.recv(), await client.recv()]
        assert sorted(m.type for m in rest) == ["error", "turn.done"]
        assert next(m for m in rest if m.type == "error").code in ("turn_closed", "unknown_turn")


async def test_two_turns_are_spoken_in_order(start_server: Any, connect: Any) -> None:
    server = await start_server()
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="turn.start", turn_id="one", text="The first turn.", end=True)
        await client.send(type="turn.start", turn_id="two")
        await client.send(type="turn.append", turn_id="two", text="The second turn.")
        await client.send(type="turn.end", turn_id="two")
        events: list[Any] = []
        while not _is_done(events, "two"):
            events.append(await client.recv())

    started = [e for e in events if getattr(e, "type", None) == "turn.started"]
    assert [(s.turn_id, s.turn_number, s.queued) for s in started] == [
        ("one", 1, False),
        ("two", 2, True),
    ]
    done_one = next(i for i, e in enumerate(events) if _is_done([e], "one"))
    of_two = [
        i
        for i, e in enumerate(events)
        if (isinstance(e, AudioChunk) and e.turn_id == "two")
        or (isinstance(e, TurnMark) and e.turn_id == "two")
    ]
    assert of_two and min(of_two) > done_one, "turn two spoke before turn one was done"
    assert all(e.turn_id == "one" for e in events[:done_one] if isinstance(e, AudioChunk))
    assert [e.reason for e in events if isinstance(e, TurnDone)] == ["completed", "completed"]


def _is_done(events: list[Any], turn_id: str) -> bool:
    return bool(events) and isinstance(events[-1], TurnDone) and events[-1].turn_id == turn_id


# ---------------------------------------------------------------------------------- clone


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def test_clone_upload_then_speak_in_the_voice(start_server: Any, connect: Any) -> None:
    server = await start_server(limits=Limits(max_clone_seconds=2.0))
    async with connect(server) as client:
        wav = _wav(1.0)
        await client.send(
            type="voice.clone",
            request_id="r1",
            name="me",
            transcript="A test voice.",
            audio_bytes=len(wav),
        )
        await client.ws.send(wav)
        cloned = await client.expect("voice.cloned")
        assert (cloned.request_id, cloned.voice_id) == ("r1", "me")
        frames = -(-SAMPLE_RATE // SAMPLES_PER_FRAME)  # 1 s -> 12 whole frames
        assert cloned.duration_s == pytest.approx(frames * SAMPLES_PER_FRAME / SAMPLE_RATE)

        await configure(client, sampling=SHORT)
        result = await client.speak("c", "Now in my voice.", voice="me")
        assert result.events[0].voice == "me"
        assert result.done.reason == "completed" and result.audio

        # Too long (3 s > 2 s) and garbage: typed errors, the session lives on.
        for request_id, blob in (("long", _wav(3.0)), ("junk", b"RIFF" + bytes(range(256)) * 8)):
            await client.send(
                type="voice.clone", request_id=request_id, transcript="x", audio_bytes=len(blob)
            )
            await client.ws.send(blob)
            error = await client.expect("error")
            assert (error.code, error.request_id, error.fatal) == ("bad_audio", request_id, False)
        # A clone announcement followed by text instead of audio.
        await client.send(type="voice.clone", request_id="r9", transcript="x", audio_bytes=10)
        await client.send(type="session.configure", chunk_ms=20)
        error = await client.expect("error")
        assert (error.code, error.request_id) == ("bad_message", "r9")
        await client.expect("session.configured")
        assert (await client.speak("after", "Still alive.")).done.reason == "completed"


async def test_unexpected_clone_failure_names_the_request(
    start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server()

    def broken(command: Any, max_seconds: float) -> Any:
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(server.service, "_encode_reference", broken)
    async with connect(server) as client:
        wav = _wav(0.5)
        await client.send(type="voice.clone", request_id="r7", transcript="x", audio_bytes=len(wav))
        await client.ws.send(wav)
        error = await client.expect("error")
        # Without the request id a client would take this as the answer to another request.
        assert (error.code, error.request_id, error.fatal) == ("engine_error", "r7", False)
        assert "codec exploded" in error.message
        await configure(client, sampling=SHORT)
        assert (await client.speak("after", "Still alive.")).done.reason == "completed"


def _pcm16(seconds: float, rate: int = 16000) -> bytes:
    wav = sf.read(io.BytesIO(_wav(seconds, rate)), dtype="int16")[0]
    return wav.astype("<i2").tobytes()


async def _clone(client: Client, blob: bytes, request_id: str, **fields: Any) -> Any:
    """Announce and upload a clone; the answer (voice.cloned or error)."""
    fields = {"transcript": "A test voice.", **fields}
    await client.send(type="voice.clone", request_id=request_id, audio_bytes=len(blob), **fields)
    await client.ws.send(blob)
    return await client.recv()


async def test_clone_input_gets_bad_audio_that_says_what_is_wrong(
    start_server: Any, connect: Any
) -> None:
    server = await start_server()
    silence = io.BytesIO()
    sf.write(silence, np.zeros(32000, np.float32), 16000, format="WAV", subtype="PCM_16")
    truncated = _wav(2.0)[:30_000]
    cases = [
        ("truncated", truncated, {}, "WAV is truncated"),
        ("one-sample", _wav(1 / 16000), {}, "at least 1 s"),
        ("silence", silence.getvalue(), {}, "silent"),
        (
            "odd-pcm",
            _pcm16(2.0) + b"\x00",
            {"audio_format": "pcm_s16le", "sample_rate": 16000},
            "whole 2-byte samples",
        ),
        (
            "short-pcm",
            _pcm16(0.5),
            {"audio_format": "pcm_s16le", "sample_rate": 16000},
            "too short",
        ),
    ]
    async with connect(server) as client:
        for request_id, blob, fields, message in cases:
            error = await _clone(client, blob, request_id, **fields)
            assert (error.type, error.code, error.request_id, error.fatal) == (
                "error",
                "bad_audio",
                request_id,
                False,
            ), error
            assert message in error.message
        # Only the clone was refused: one error each, and the session goes on.
        await configure(client, sampling=SHORT)
        assert (await client.speak("after", "Still alive.")).done.reason == "completed"
        pcm = await _clone(client, _pcm16(1.5), "pcm", audio_format="pcm_s16le", sample_rate=16000)
        assert pcm.type == "voice.cloned" and pcm.voice_id.startswith("clone-")


async def test_clone_names_never_shadow_a_voice(start_server: Any, connect: Any) -> None:
    server = await start_server()
    spy: list[str] = []
    clone_voice = server.service.engine.clone_voice

    async def spying(transcript: str, frames: Any) -> Any:
        spy.append(transcript)
        return await clone_voice(transcript, frames)

    server.service.engine.clone_voice = spying
    async with connect(server) as client:
        error = await _clone(client, _wav(1.5), "r1", name="tara")
        assert (error.code, error.request_id, error.fatal) == ("duplicate_voice", "r1", False)
        transcript = "**Hello** <|eot_id|>there <custom_token_4>😀"
        cloned = await _clone(client, _wav(1.5), "r2", name="me", transcript=transcript)
        assert (cloned.type, cloned.voice_id) == ("voice.cloned", "me")
        assert spy == ["Hello there"]  # the transcript is cleaned like turn text
        error = await _clone(client, _wav(1.2), "r3", name="me")
        assert (error.code, error.request_id) == ("duplicate_voice", "r3")
        await configure(client, sampling=SHORT)
        # tara is still the built-in voice, me the first clone.
        tara = await client.speak("t", "Hi.", voice="tara")
        me = await client.speak("m", "Hi.", voice="me")
        assert tara.done.reason == me.done.reason == "completed"
        assert (tara.events[0].voice, me.events[0].voice) == ("tara", "me")
        assert len(spy) == 1


async def test_a_refused_clone_costs_one_error_and_never_the_session(
    start_server: Any, connect: Any
) -> None:
    limits = Limits(max_message_bytes=2048, max_clone_bytes=200_000, max_clone_seconds=2.0)
    server = await start_server(limits=limits)
    async with connect(server) as client:
        # Refused at the announcement (3 s > 2 s); its audio, far over max_message_bytes,
        # was already on its way and is dropped with it.
        too_long = _pcm16(3.0)
        assert len(too_long) > 2048
        error = await _clone(client, too_long, "long", audio_format="pcm_s16le", sample_rate=16000)
        assert (error.code, error.request_id, error.fatal) == ("bad_audio", "long", False)
        error = await _clone(client, b"\x00" * 200_001, "big")  # over max_clone_bytes
        assert (error.code, error.request_id, error.fatal) == ("bad_audio", "big", False)
        await configure(client, sampling=SHORT)  # the next message is the answer: no stray error
        assert (await client.speak("after", "Still alive.")).done.reason == "completed"


async def test_hostile_json_gets_a_typed_error_over_the_socket(
    start_server: Any, connect: Any
) -> None:
    server = await start_server()
    async with connect(server) as client:
        for data in (
            "[" * 1000 + "]" * 1000,
            "[" * 100_000 + "]" * 100_000,
            '{"type":"turn.start","text":' + "[" * 1000 + "]" * 1000 + "}",
            '{"type":"turn.start","turn_id":"s","text":"a \\ud800 b","end":true}',
        ):
            await client.ws.send(data)
            error = await client.expect("error")
            assert (error.code, error.fatal) == ("bad_message", False), error
        await configure(client, sampling=SHORT)
        assert (await client.speak("after", "Still alive.")).done.reason == "completed"


async def test_special_token_spellings_in_any_text_stay_text(
    start_server: Any, connect: Any
) -> None:
    server = await start_server()
    core = server.service.engine._core
    encode = core.encode
    prompts: list[list[int]] = []

    def spying(text: str) -> list[int]:
        ids = encode(text)
        prompts.append(ids)
        return ids

    core.encode = spying
    injected = (
        "Hi <custom_token_4><custom_token_5><custom_token_1> <|eot_id|><|start_header_id|> ok."
    )
    try:
        async with connect(server) as client:
            await configure(client, sampling=SHORT)
            result = await client.speak("x", injected)
            assert result.done.reason == "completed"
    finally:
        core.encode = encode
    assert prompts and all(ids[0] == 128000 and max(ids[1:]) < 128000 for ids in prompts), prompts


# ----------------------------------------------------------------------------------- auth


async def test_auth(start_server: Any, connect: Any) -> None:
    server = await start_server()
    url = f"ws://127.0.0.1:{server.port}/v1/ws"
    for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}):
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(url, **kwargs):
                pass
        assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        async with websockets.connect(url + "?token=wrong"):
            pass
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.ready"
    async with connect(server, token=KEY) as client:
        assert client.ready.protocol == 1
    # The X-API-Key header (docs/protocol.md, Connection).
    async with websockets.connect(url, additional_headers={"X-API-Key": KEY}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.ready"
    with pytest.raises(InvalidStatus):
        async with websockets.connect(url, additional_headers={"X-API-Key": "wrong"}):
            pass

    open_server = await start_server(auth=False, api_keys=())
    async with connect(open_server, token=None) as client:
        assert client.ready.session_id

    from voxlane.server.app import ServerConfig

    with pytest.raises(ValueError, match="no API key"):
        ServerConfig(auth=True, api_keys=())

    # Beyond max_sessions: refused at the handshake (503), the open session is unaffected.
    full = await start_server(max_sessions=1)
    async with connect(full) as client:
        with pytest.raises(InvalidStatus) as info:
            async with connect(full):
                pass
        assert info.value.response.status_code == 503
        assert (await configure(client, chunk_ms=20)).config.chunk_ms == 20


async def test_healthz_and_metrics(start_server: Any, connect: Any) -> None:
    server = await start_server()
    assert await http_get(server.port, "/healthz") == (200, "ok\n")
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        assert (await client.speak("t", "Metrics please.")).done.reason == "completed"
        status, text = await http_get(server.port, "/metrics")
    assert status == 200
    lines = text.splitlines()
    assert "voxlane_sessions 1.0" in lines
    assert 'voxlane_turns_total{reason="completed"} 1.0' in lines
    assert "voxlane_first_audio_seconds_count 1.0" in lines
    assert "voxlane_real_time_factor_count 1.0" in lines
    assert any(line.startswith("voxlane_audio_seconds_total ") for line in lines)
    # Metrics and health need no key; the WebSocket does.
    assert (await http_get(server.port, "/v1/ws"))[0] == 401


# ------------------------------------------------------------------------ malformed input


async def test_malformed_messages_get_typed_errors(start_server: Any, connect: Any) -> None:
    server = await start_server(limits=Limits(max_turns=2, max_turn_chars=50))
    cases: list[tuple[Any, str]] = [
        ("this is not json", "bad_message"),
        ("[1, 2]", "bad_message"),
        ({"type": "turn.dance"}, "unknown_type"),
        ({"type": "session.configure", "chunk_ms": 10}, "out_of_range"),
        ({"type": "session.configure", "chunk_ms": "40"}, "bad_message"),
        ({"type": "session.configure", "sampling": {"temperature": 9.0}}, "out_of_range"),
        ({"type": "session.configure", "voice": "nobody"}, "unknown_voice"),
        ({"type": "turn.append", "turn_id": "ghost", "text": "boo"}, "unknown_turn"),
        ({"type": "turn.start", "turn_id": "bad id!"}, "out_of_range"),
        (b"\x00\x01 stray binary", "bad_message"),
    ]
    async with connect(server) as client:
        for message, code in cases:
            if isinstance(message, dict):
                message = json.dumps(message)
            await client.ws.send(message)
            error = await client.expect("error")
            assert (error.code, error.fatal) == (code, False), message
        # Turn bookkeeping errors.
        await client.send(type="turn.start", turn_id="a")
        await client.expect("turn.started")
        await client.send(type="turn.start", turn_id="a")
        assert (await client.expect("error")).code == "duplicate_turn"
        await client.send(type="turn.start", turn_id="b")
        await client.expect("turn.started")
        await client.send(type="turn.start", turn_id="c")
        assert (await client.expect("error")).code == "too_many_turns"
        await client.send(type="turn.append", turn_id="a", text="x" * 51)
        error = await client.expect("error")
        assert (error.code, error.turn_id) == ("message_too_large", "a")
        await client.send(type="turn.end", turn_id="b")
        await client.send(type="turn.append", turn_id="b", text="late")
        assert (await client.expect("error")).code == "turn_closed"
        for turn_id in ("b", "a"):  # the queued one first, else it completes once a is done
            await client.send(type="turn.cancel", turn_id=turn_id)
        got = [await client.recv() for _ in range(4)]
        assert [(m.type, m.turn_id) for m in got] == [
            ("turn.cancelled", "b"),
            ("turn.done", "b"),
            ("turn.cancelled", "a"),
            ("turn.done", "a"),
        ]
        # The session survived all of it.
        assert (await configure(client, chunk_ms=80)).config.chunk_ms == 80


async def test_turn_errors_are_reported_and_the_session_survives(
    start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server()
    async with connect(server) as client:
        # 2,048 frames cannot fit the test engine's 4,096-token context, nor can the 756 a
        # segment of 250 characters may take (the text cap): the engine refuses the segment,
        # the turn ends with a typed error.
        await configure(client, sampling={"max_frames": 2048})
        result = await client.speak("big", "Too long " * 28)
        assert [e.type for e in result.events] == [
            "turn.started",
            "turn.mark",
            "error",
            "turn.done",
        ]
        error = result.events[2]
        assert (error.code, error.turn_id, error.fatal) == ("context_overflow", "big", False)
        assert result.done.reason == "error"

        # A turn whose engine session cannot even be opened.
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise EngineError("the engine is not running")

        monkeypatch.setattr(server.service.engine, "open_session", broken)
        await client.send(type="turn.start", turn_id="dead", text="Hello.", end=True)
        await client.expect("turn.started")
        error = await client.expect("error")
        assert (error.code, error.turn_id) == ("engine_error", "dead")
        assert (await client.expect("turn.done")).reason == "error"
        monkeypatch.undo()

        await configure(client, sampling=SHORT)
        assert (await client.speak("fine", "Back to normal.")).done.reason == "completed"
    _, text = await http_get(server.port, "/metrics")
    assert 'voxlane_turns_total{reason="error"} 2.0' in text.splitlines()


async def test_a_turn_beyond_measured_capacity_is_refused_as_overloaded(
    start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from voxlane.server.engine.core import StepStats

    server = await start_server()
    engine = server.service.engine
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        other = engine.open_session(engine.builtin_voice("leo"))  # another stream is open
        slow = StepStats()
        slow.record(1, 0.01)
        slow.record(2, 10.0)  # measured: one stream fits real time, two do not
        refuse = dataclasses.replace(engine.config, admission="refuse")
        monkeypatch.setattr(engine, "config", refuse)
        monkeypatch.setattr(engine._core, "stats", slow)
        await client.send(type="turn.start", turn_id="busy", text="Hello.", end=True)
        await client.expect("turn.started")
        error = await client.expect("error")
        assert (error.code, error.turn_id, error.fatal) == ("overloaded", "busy", False)
        assert (await client.expect("turn.done")).reason == "error"
        other.close()  # the other stream ended: room for this session's next turn
        assert (await client.speak("after", "Room again.")).done.reason == "completed"
        monkeypatch.undo()
        assert (await client.speak("fine", "Back to normal.")).done.reason == "completed"


async def test_a_turn_waits_for_room_then_is_refused_with_the_reason(
    start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from voxlane.server.engine import SamplingParams

    server = await start_server()
    engine = server.service.engine
    # Admission "wait" (the serve default), a capacity of one stream, a short bounded wait.
    wait = dataclasses.replace(engine.config, admission="wait", admission_wait_s=0.3)
    monkeypatch.setattr(engine, "config", wait)
    monkeypatch.setattr(engine._core, "config", wait)
    monkeypatch.setattr(engine._core.stats, "capacity", lambda headroom, limit=256: 1)
    other = engine.open_session(engine.builtin_voice("leo"))
    stream = other.generate(TEXT, SamplingParams(max_frames=400, seed=1))
    await stream.__anext__()  # the other stream is admitted and streaming

    async def read_all() -> None:
        async for _ in stream:
            pass

    reader = asyncio.create_task(read_all())  # a reading listener: never paused
    async with connect(server) as client:
        await configure(client, sampling=SHORT)
        await client.send(type="turn.start", turn_id="busy", text="Hello.", end=True)
        await client.expect("turn.started")
        error = await client.recv()
        if isinstance(error, TurnMark):  # the segment was announced, then held: no audio
            error = await client.recv()
        assert (error.code, error.turn_id, error.fatal) == ("overloaded", "busy", False)
        assert "waiting 0.3 s" in error.message
        assert (await client.expect("turn.done")).reason == "error"
        stream.cancel()
        await reader
        other.close()  # room again
        assert (await client.speak("after", "Room again.")).done.reason == "completed"


async def test_oversize_messages_close_with_1009(start_server: Any, connect: Any) -> None:
    server = await start_server(limits=Limits(max_message_bytes=2048, max_clone_bytes=4096))
    async with connect(server) as client:  # over the protocol limit: typed fatal error
        await client.send(type="turn.start", text="x" * 3000)
        error = await client.expect("error")
        assert (error.code, error.fatal) == ("message_too_large", True)
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert client.ws.close_code == 1009
    async with connect(server) as client:  # over the frame limit: websockets refuses it
        await client.ws.send("y" * 20_000)
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert client.ws.close_code == 1009


async def test_too_many_errors_close_with_1008(start_server: Any, connect: Any) -> None:
    server = await start_server(limits=Limits(max_errors=2))
    async with connect(server) as client:
        for _ in range(2):
            await client.ws.send("{")
            assert not (await client.expect("error")).fatal
        await client.ws.send("{")
        error = await client.expect("error")
        assert (error.code, error.fatal) == ("protocol_error", True)
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert client.ws.close_code == 1008


# ------------------------------------------------------------------- back-pressure, shutdown


def stuck_socket(server: Any) -> socket.socket:
    """A connected socket with a small receive buffer: a client on it that stops reading
    backs the server's writes up fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    return sock


async def start_flood(client: Client, turn_id: str = "flood", max_frames: int = 60) -> None:
    """Configure bulky audio and start a long turn (the client then stops reading)."""
    await configure(
        client,
        sample_rate=48000,
        sample_format="pcm_f32le",
        sampling={"max_frames": max_frames, "seed": 1},
    )
    await client.send(type="turn.start", turn_id=turn_id, text=TEXT * 3, end=True)


async def wait_metric(server: Any, line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in server.metrics.render():
        assert time.monotonic() < deadline, f"never saw {line}"
        await asyncio.sleep(0.01)


async def test_client_that_stops_reading_is_closed_with_4008(
    start_server: Any, connect: Any
) -> None:
    server = await start_server(send_timeout_s=0.3, send_buffer_bytes=8192)
    # No client-side queueing: the server's writes back up fast.
    async with connect(server, sock=stuck_socket(server), max_queue=1) as client:
        await start_flood(client)
        await wait_metric(server, 'voxlane_errors_total{code="slow_consumer"}')
        # The client reads again, a while later: what was buffered, then the 4008 close frame
        # (the server used to cut the connection after 1 s, and the client saw 1006).
        await asyncio.sleep(2.0)
        with pytest.raises(ConnectionClosed):
            while True:
                await client.recv(timeout=10)
        assert client.ws.close_code == CloseCode.SLOW_CONSUMER == 4008  # docs/protocol.md
    assert "voxlane_close_undelivered_total{" not in server.metrics.render()
    await wait_engine_idle(server.service, timeout=10)


async def test_a_close_code_that_cannot_reach_the_client_is_counted(
    start_server: Any, connect: Any
) -> None:
    server = await start_server(send_timeout_s=0.3, send_buffer_bytes=8192, close_timeout_s=0.3)
    async with connect(server, sock=stuck_socket(server), max_queue=1) as client:
        await start_flood(client)
        # It never reads again: the connection is cut, and the lost close code counted.
        await wait_metric(server, 'voxlane_close_undelivered_total{code="4008"} 1.0')
        with pytest.raises(ConnectionClosed):
            while True:
                await client.recv(timeout=10)
        assert client.ws.close_code == 1006  # abnormal closure: no close frame came
    await wait_engine_idle(server.service, timeout=10)


async def test_a_client_that_stopped_reading_does_not_take_a_stream_slot(
    start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    server = await start_server(send_buffer_bytes=8192)
    engine = server.service.engine
    # Capacity for one stream, admission "refuse": the stalled turn must not count.
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, admission="refuse"))
    monkeypatch.setattr(engine._core.stats, "capacity", lambda headroom, limit=256: 1)
    async with connect(server, sock=stuck_socket(server), max_queue=1) as stuck:
        await start_flood(stuck, max_frames=400)
        deadline = time.monotonic() + 30
        # Paused at max_frames_ahead, as the engine's last schedule saw it (what "refuse"
        # reads): a request that just reached the mark is not counted until then.
        while engine._core.stalled_sessions < 1:
            assert time.monotonic() < deadline, "the stuck turn never paused"  # max_frames_ahead
            await asyncio.sleep(0.01)
        async with connect(server) as other:
            await configure(other, sampling=SHORT)
            result = await other.speak("other", "Hello.")
            assert result.done.reason == "completed" and result.samples > 0
    await wait_engine_idle(server.service, timeout=10)


async def test_shutdown_drains_active_turns_then_closes_with_1001(
    start_server: Any, connect: Any
) -> None:
    server = await start_server(drain_timeout_s=60)
    async with connect(server) as client, connect(server) as idle:
        await configure(client, sampling={"max_frames": 8, "seed": 1})
        await client.send(type="turn.start", turn_id="t", text="Hello there.")  # still open
        while not isinstance(await client.recv(), AudioChunk):
            pass
        closing = asyncio.create_task(server.close())
        # Draining: the instance answers 503 (health check, new handshakes), still listening.
        deadline = time.monotonic() + 10
        while (await http_get(server.port, "/healthz"))[0] != 503:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(InvalidStatus) as info:
            async with connect(server):
                pass
        assert info.value.response.status_code == 503
        # A turn asked for during the drain is refused, once the active one is done.
        await client.send(type="turn.start", turn_id="late", text="Too late.", end=True)
        await client.send(type="turn.end", turn_id="t")
        result = await client.collect("t")
        assert result.done.reason == "completed" and result.samples > 0
        error = await client.expect("error")
        assert (error.code, error.turn_id, error.fatal) == ("shutting_down", "late", False)
        assert (await client.expect("turn.done")).reason == "error"
        for ws in (client, idle):
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv(timeout=10)
            assert ws.ws.close_code == 1001
        await closing
    assert (await http_get_or_refused(server.port)) is None
    await wait_engine_idle(server.service)


async def test_a_turn_still_speaking_when_the_drain_ends_gets_turn_done(
    start_server: Any, connect: Any
) -> None:
    server = await start_server(drain_timeout_s=0.2)
    async with connect(server) as client:
        await configure(client, sampling={"max_frames": 400, "seed": 1})
        await client.send(type="turn.start", turn_id="t", text=TEXT)  # never ended
        await client.send(type="turn.start", turn_id="next", text="Queued.", end=True)
        while not isinstance(await client.recv(), AudioChunk):
            pass
        closing = asyncio.create_task(server.close())
        seen = []
        with pytest.raises(ConnectionClosed):
            while True:
                message = await client.recv(timeout=10)
                if not isinstance(message, AudioChunk):
                    seen.append((message.type, getattr(message, "code", None)))
                    if isinstance(message, TurnDone):
                        seen[-1] = (message.type, message.turn_id, message.reason)
        assert seen[-4:] == [
            ("error", "shutting_down"),
            ("turn.done", "t", "error"),
            ("error", "shutting_down"),
            ("turn.done", "next", "error"),
        ]
        assert client.ws.close_code == 1001
        await closing
    await wait_engine_idle(server.service)


async def test_shutdown_cuts_a_client_that_stopped_reading(start_server: Any, connect: Any) -> None:
    # Its writer would wait send_timeout_s (2 minutes here): shutdown gives it close_timeout_s.
    server = await start_server(
        send_timeout_s=120, send_buffer_bytes=8192, close_timeout_s=0.3, drain_timeout_s=0.2
    )
    async with connect(server, sock=stuck_socket(server), max_queue=1) as stuck:
        await start_flood(stuck, max_frames=400)
        deadline = time.monotonic() + 30
        ahead = server.service.engine.config.max_frames_ahead
        while not any(r.frames - r.consumed() >= ahead for r in engine_requests(server).values()):
            assert time.monotonic() < deadline, "the stuck turn never paused"
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.close(), 60)
        assert 'voxlane_close_undelivered_total{code="1001"} 1.0' in server.metrics.render()
        with pytest.raises(ConnectionClosed):
            while True:
                await stuck.recv(timeout=10)
        assert stuck.ws.close_code == 1006
    await wait_engine_idle(server.service)


async def http_get_or_refused(port: int) -> int | None:
    try:
        return (await http_get(port, "/healthz"))[0]
    except OSError:
        return None
