"""The client SDK against a real voxlane server on loopback (demo weights)."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import voxlane
from voxlane.protocol import Limits

from .conftest import KEY, MAX_FRAMES

SENTENCES = "Hello there. How are you today? I am fine. Thanks for asking. See you soon."


async def deltas(text: str, size: int = 3) -> AsyncIterator[str]:
    """An LLM-like stream: fixed-size pieces that split words anywhere."""
    for i in range(0, len(text), size):
        yield text[i : i + size]
        await asyncio.sleep(0)


def audio_of(events: list[Any]) -> list[voxlane.AudioChunk]:
    return [e for e in events if isinstance(e, voxlane.AudioChunk)]


# ------------------------------------------------------------------ connect, configure


async def test_connect_reads_session_ready(server: Any) -> None:
    async with voxlane.connect(server.url, api_key=KEY) as session:
        assert session.ready is not None and session.ready.protocol == 1
        assert session.session_id
        assert "tara" in session.voices
        assert session.limits == Limits()
        assert session.config.voice == "tara"
        assert not session.closed
    assert session.closed


async def test_connect_is_awaitable_and_reads_env(server: Any, monkeypatch) -> None:
    monkeypatch.setenv("VOXLANE_URL", server.url)
    monkeypatch.setenv("VOXLANE_API_KEY", KEY)
    session = await voxlane.connect()
    try:
        assert session.url == server.url + "/v1/ws"  # a URL without a path gets /v1/ws
    finally:
        await session.close()


async def test_configure_updates_and_returns_the_config(session: voxlane.Session) -> None:
    config = await session.configure(voice="leo", chunk_ms=20, temperature=0.9)
    assert (config.voice, config.chunk_ms, config.sampling.temperature) == ("leo", 20, 0.9)
    assert config.sampling.max_frames == MAX_FRAMES  # untouched fields keep their value
    assert config.sampling.seed == 1
    assert session.config == config
    config = await session.configure(seed=None)  # back to random seeds
    assert config.sampling.seed is None and config.voice == "leo"


async def test_configure_out_of_range_fails_locally(session: voxlane.Session) -> None:
    with pytest.raises(voxlane.OutOfRangeError, match="chunk_ms"):
        await session.configure(chunk_ms=500)
    assert (await session.configure(chunk_ms=80)).chunk_ms == 80  # the session is fine


# -------------------------------------------------------------------------- speaking


async def test_speak_string_streams_marks_and_contiguous_audio(session: voxlane.Session) -> None:
    turn = session.speak("Hello there. How are you?")
    events = [event async for event in turn]
    assert isinstance(events[0], voxlane.Mark) and events[0].sample == 0
    chunks = audio_of(events)
    assert chunks, "no audio"
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    offsets = np.cumsum([0] + [c.num_samples for c in chunks])
    assert [c.sample_offset for c in chunks] == offsets[:-1].tolist()
    first = chunks[0]
    assert first.turn_id == turn.turn_id
    assert first.sample_rate == 24000 and first.sample_format == "pcm_s16le"
    assert first.samples.dtype == np.dtype("<i2")
    assert first.samples.tobytes() == first.pcm  # a view of the same bytes
    assert first.num_samples == 24000 * 40 // 1000  # chunk_ms 40
    # Every mark precedes the audio it starts and points into the turn's audio.
    marks = [e for e in events if isinstance(e, voxlane.Mark)]
    assert [m.segment for m in marks] == list(range(len(marks)))
    assert " ".join(m.text for m in marks) == "Hello there. How are you?"
    assert all(m.sample <= offsets[-1] for m in marks)
    # turn.done: metrics agree with what arrived.
    assert turn.done is not None and turn.done.reason == "completed"
    assert turn.metrics.samples == offsets[-1]
    assert turn.is_done and not turn.cancelled
    assert turn.time_to_first_audio_s is not None and turn.time_to_first_audio_s > 0


async def test_speak_async_iterator_of_deltas(session: voxlane.Session) -> None:
    turn = session.speak(deltas(SENTENCES, size=4))
    events = [event async for event in turn]
    marks = [e for e in events if isinstance(e, voxlane.Mark)]
    assert " ".join(m.text for m in marks) == SENTENCES
    # Marks' offsets index the concatenated deltas, and their ranges touch.
    assert marks[0].start == 0 and marks[-1].end == len(SENTENCES)
    assert all(a.end == b.start for a, b in itertools.pairwise(marks))
    assert turn.metrics.segments == len(marks)
    assert sum(c.num_samples for c in audio_of(events)) == turn.metrics.samples


async def test_float32_output_at_16khz(session: voxlane.Session) -> None:
    await session.configure(sample_format="pcm_f32le", sample_rate=16000)
    audio = await session.speak("Hello there.").collect()
    assert audio.dtype == np.dtype("<f4")
    assert len(audio) > 0 and np.all(np.abs(audio) <= 1.0)
    chunk = voxlane.AudioChunk("t", 0, 0, 16000, "pcm_f32le", audio[:320].tobytes())
    assert chunk.duration_s == pytest.approx(0.02)
    np.testing.assert_array_equal(chunk.to_float32(), audio[:320])


async def test_collect_returns_the_whole_turn(session: voxlane.Session) -> None:
    turn = session.speak("Hello there. How are you?")
    audio = await turn.collect()
    assert audio.dtype == np.int16 and len(audio) == turn.metrics.samples
    assert np.abs(audio).max() > 0


async def test_start_turn_send_flush_end(session: voxlane.Session) -> None:
    turn = await session.start_turn("Hello", turn_id="manual-1", voice="leo")
    assert turn.turn_id == "manual-1"
    assert turn.started is not None and turn.started.voice == "leo"
    assert turn.started.turn_number >= 1
    await turn.send(" there, my")
    await turn.flush()
    await turn.send(" friend.")
    await turn.end()
    with pytest.raises(voxlane.TurnClosedError):
        await turn.send("more")  # ended: refused locally, nothing sent
    events = [event async for event in turn]
    marks = [e for e in events if isinstance(e, voxlane.Mark)]
    assert "".join(m.text for m in marks).replace(" ", "") == "Hellothere,myfriend."
    assert turn.done.reason == "completed"


async def test_turns_are_spoken_in_order(session: voxlane.Session) -> None:
    first = await session.start_turn("First one.", end=True)
    second = await session.start_turn("Second one.", end=True)
    assert second.started.queued
    done_order: list[str] = []

    async def drain(turn: voxlane.Turn) -> None:
        async for _ in turn:
            pass
        done_order.append(turn.turn_id)

    await asyncio.gather(drain(second), drain(first))
    assert done_order == [first.turn_id, second.turn_id]
    assert first.metrics.samples > 0 and second.metrics.samples > 0


# ---------------------------------------------------------------------------- cancel


async def test_cancel_stops_audio_at_once(session: voxlane.Session) -> None:
    # Never ended: the turn cannot complete by itself, so only the cancel can end it.
    turn = await session.start_turn(SENTENCES)
    received = 0
    async for event in turn:
        if isinstance(event, voxlane.AudioChunk):
            received += event.num_samples
            await asyncio.sleep(0.3)  # let more frames arrive and queue up unread
            await turn.cancel()
            break
    assert turn.cancelled_at_sample is not None and turn.cancelled_at_sample >= received
    rest = [event async for event in turn]
    assert rest == []  # frames received before the cancel are dropped too
    assert turn.done.reason == "cancelled"
    await turn.cancel()  # cancelling a done turn is a no-op
    with pytest.raises(voxlane.TurnClosedError):
        await turn.send("more")


async def test_cancel_a_queued_turn(session: voxlane.Session) -> None:
    first = await session.start_turn("First one.", end=True)
    second = await session.start_turn("Second one.", end=True)
    await second.cancel()
    assert second.cancelled_at_sample == 0
    assert [e async for e in second] == []
    assert second.done.reason == "cancelled" and second.metrics.samples == 0
    assert audio_of([e async for e in first])
    assert first.done.reason == "completed"


async def test_leaving_the_turn_block_cancels_it(session: voxlane.Session) -> None:
    async with await session.start_turn(SENTENCES) as turn:
        async for event in turn:
            if isinstance(event, voxlane.AudioChunk):
                break
    assert turn.cancelled and turn.cancelled_at_sample is not None  # acknowledged
    assert (await turn.wait()).reason == "cancelled"
    # The session is usable afterwards.
    assert len(await session.speak("Next.").collect()) > 0


async def test_cancel_before_anything_was_sent(session: voxlane.Session) -> None:
    turn = session.speak(deltas(SENTENCES))
    await turn.cancel()  # the background start has not run yet
    assert [e async for e in turn] == [] and turn.cancelled and turn.is_done
    assert len(await session.speak("Still fine.").collect()) > 0


async def test_closing_stops_a_waiting_text_feeder(server: Any) -> None:
    never = asyncio.Event()

    async def slow_llm() -> AsyncIterator[str]:
        yield "Hello"
        await never.wait()  # the LLM hangs
        yield "never sent"

    session = await voxlane.connect(server.url, api_key=KEY)
    turn = session.speak(slow_llm())
    await turn.wait_started()
    await session.close()
    with pytest.raises(voxlane.ConnectionClosedError):
        async for _ in turn:
            pass
    # The start_server fixture fails the test if the feeder task is left behind.


async def test_failing_text_iterator_cancels_the_turn(session: voxlane.Session) -> None:
    async def llm() -> AsyncIterator[str]:
        yield "Hello there, "
        raise RuntimeError("the LLM went away")

    turn = session.speak(llm())
    with pytest.raises(RuntimeError, match="went away"):
        async for _ in turn:
            pass
    await turn.wait()
    assert turn.done.reason == "cancelled"


# ------------------------------------------------------------------------ voice clone


def _reference(seconds: float = 1.0, rate: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


async def test_clone_from_wav_path_and_speak_with_it(
    session: voxlane.Session, tmp_path: Path
) -> None:
    import soundfile as sf

    path = tmp_path / "me.wav"
    sf.write(path, _reference(), 24000, subtype="PCM_16")
    cloned = await session.clone_voice(path, "This is my voice.", name="me")
    assert cloned.voice_id == "me" and cloned.duration_s > 0.5
    assert "me" in session.voices
    turn = session.speak("Now I sound like you.", voice="me")
    assert audio_of([e async for e in turn])
    assert turn.started.voice == "me"
    await session.configure(voice="me")  # usable as the session voice too
    assert session.config.voice == "me"


async def test_clone_from_arrays(session: voxlane.Session, tmp_path: Path) -> None:
    mono = await session.clone_voice(_reference(rate=16000), "Hello.", sample_rate=16000)
    assert mono.voice_id in session.voices and mono.duration_s > 0.5
    stereo = (np.stack([_reference(), _reference()], axis=1) * 32767).astype(np.int16)
    cloned = await session.clone_voice(stereo, "Hello.", sample_rate=24000)
    assert cloned.voice_id in session.voices
    with pytest.raises(voxlane.AudioFormatError, match="sample_rate"):
        await session.clone_voice(_reference(), "Hello.")


async def test_clone_from_another_format_decodes_locally(
    session: voxlane.Session, tmp_path: Path
) -> None:
    import soundfile as sf

    path = tmp_path / "me.flac"
    sf.write(path, _reference(), 24000)
    cloned = await session.clone_voice(path, "This is my voice.")
    assert cloned.voice_id.startswith("clone-")


async def test_clone_refusals_raise_their_classes(session: voxlane.Session) -> None:
    with pytest.raises(voxlane.DuplicateVoiceError, match="built-in"):
        await session.clone_voice(_reference(), "Hello.", name="tara", sample_rate=24000)
    with pytest.raises(voxlane.AudioFormatError, match="silent"):
        await session.clone_voice(np.zeros(24000, np.float32), "Hello.", sample_rate=24000)
    with pytest.raises(voxlane.AudioFormatError, match="at least 1 s"):
        await session.clone_voice(_reference(0.5), "Hello.", sample_rate=24000)
    cloned = await session.clone_voice(_reference(), "Hello.", name="me", sample_rate=24000)
    with pytest.raises(voxlane.DuplicateVoiceError, match="already"):
        await session.clone_voice(_reference(), "Hello.", name="me", sample_rate=24000)
    assert cloned.voice_id == "me" and "me" in session.voices


# ------------------------------------------------------------------- error mapping


async def test_server_errors_map_to_exception_classes(start_server: Any) -> None:
    server = await start_server(limits=Limits(max_turns=1, max_turn_chars=40))
    async with voxlane.connect(server.url, api_key=KEY) as session:
        await session.configure(max_frames=MAX_FRAMES, seed=1)
        with pytest.raises(voxlane.UnknownVoiceError, match="nobody"):
            await session.configure(voice="nobody")
        with pytest.raises(voxlane.UnknownVoiceError):
            await session.start_turn("Hi.", voice="nobody")
        with pytest.raises(voxlane.UnknownVoiceError):  # speak: raised by the iterator
            async for _ in session.speak("Hi.", voice="nobody"):
                pass
        with pytest.raises(voxlane.AudioFormatError):
            await session.clone_voice(b"RIFF not really a wav file", "Hello.")

        turn = await session.start_turn("Hello there.", turn_id="only")
        with pytest.raises(voxlane.TooManyTurnsError):
            await session.start_turn("One too many.")
        await turn.send(" This sentence is far too long for the limit.")
        with pytest.raises(voxlane.MessageTooLargeError):  # the turn's iterator raises it
            async for _ in turn:
                pass
        await turn.end()  # a non-fatal error: the turn goes on
        assert audio_of([e async for e in turn]) and turn.done.reason == "completed"

        with pytest.raises(voxlane.DuplicateTurnError):  # ids are never reused
            await session.start_turn("Again.", turn_id="only")
        assert session.ready.limits.max_turns == 1 and not session.closed


async def test_fatal_error_closes_the_session(start_server: Any) -> None:
    server = await start_server(limits=Limits(max_errors=1))
    async with voxlane.connect(server.url, api_key=KEY) as session:
        with pytest.raises(voxlane.UnknownVoiceError):
            await session.configure(voice="nobody")
        with pytest.raises(voxlane.ProtocolError, match="too many protocol errors"):
            await session.configure(voice="nobody")
        await asyncio.wait_for(session._reader, 10)
        assert session.closed
        with pytest.raises(voxlane.ConnectionClosedError) as info:
            session.speak("Hello.")
        assert info.value.close_code == 1008
        assert isinstance(info.value.__cause__, voxlane.ProtocolError)


async def test_wrong_or_missing_api_key(server: Any) -> None:
    with pytest.raises(voxlane.AuthenticationError, match="API key"):
        await voxlane.connect(server.url, api_key="wrong")
    with pytest.raises(voxlane.AuthenticationError):
        await voxlane.connect(server.url, api_key="")
    # A browser-style token in the query string works too.
    session = await voxlane.connect(f"{server.url}/v1/ws?token={KEY}", api_key="")
    await session.close()


async def test_unreachable_server() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(voxlane.ConnectionClosedError, match="cannot connect"):
        await voxlane.connect(f"ws://127.0.0.1:{port}", api_key=KEY, open_timeout=5)
    with pytest.raises(ValueError, match="ws://"):
        voxlane.connect("http://127.0.0.1:1")


async def test_server_shutdown_ends_open_turns(start_server: Any) -> None:
    server = await start_server(drain_timeout_s=0.5)
    session = await voxlane.connect(server.url, api_key=KEY)
    turn = await session.start_turn(SENTENCES)  # never ended: still open when the drain ends
    await server.close()
    with pytest.raises(voxlane.ShuttingDownError):  # the turn learns why it ended
        async for _ in turn:
            pass
    with pytest.raises(voxlane.ConnectionClosedError) as info:
        await session.configure(chunk_ms=20)
    assert info.value.close_code == 1001
    assert session.closed
    await session.close()


# ------------------------------------------------------------------------- reconnect


async def test_reconnect_restores_clones_and_config(start_server: Any) -> None:
    server = await start_server(drain_timeout_s=0.5)
    port = server.port
    session = await voxlane.connect(server.url, api_key=KEY)
    try:
        await session.configure(max_frames=MAX_FRAMES, seed=3, chunk_ms=20)
        cloned = await session.clone_voice(_reference(), "Hello.", sample_rate=24000)
        await session.configure(voice=cloned.voice_id)
        in_flight = await session.start_turn(SENTENCES)
        old_id = session.session_id

        await server.close()  # the server goes away, then comes back on the same port
        # The open turn outlives the drain: shutting_down (or the close, if it came first).
        with pytest.raises((voxlane.ShuttingDownError, voxlane.ConnectionClosedError)):
            async for _ in in_flight:
                pass
        await start_server(port=port)
        await session.reconnect()

        assert session.session_id != old_id and not session.closed
        assert cloned.voice_id in session.voices  # cloned again under the same id
        assert session.config.voice == cloned.voice_id
        assert (session.config.chunk_ms, session.config.sampling.seed) == (20, 3)
        turn = session.speak("Back again.")
        assert audio_of([e async for e in turn])
        assert turn.started.voice == cloned.voice_id
    finally:
        await session.close()


# ---------------------------------------------------------------------------- import


def test_import_voxlane_stays_light() -> None:
    code = (
        "import sys, voxlane; "
        "print(sorted(m for m in ('torch', 'sounddevice', 'soundfile') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_is_exported() -> None:
    for name in voxlane.__all__:
        assert getattr(voxlane, name) is not None, name
    assert voxlane.Player.__module__ == "voxlane.playback"
