"""The LiveKit Agents TTS plugin, driven through the Agents' public stream API against a real
voxlane server on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit.agents import APIConnectionError, APIConnectOptions, APIError
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from livekit.agents.voice import io as agents_io

from voxlane.clients.livekit_agents import TTS

from .conftest import KEY

TEXT = "Hello there. How are you today?"
LONG = " ".join(f"Sentence number {n} is here." for n in range(1, 13))
NO_RETRY = APIConnectOptions(max_retry=0, timeout=5.0)


def voxlane_tts(server: Any, **kwargs: Any) -> TTS:
    options = {"max_frames": 3, "seed": 1}
    return TTS(url=server.url, api_key=KEY, session_options=options, **kwargs)


async def test_stream_pushes_pcm_segments_and_timed_transcripts(server: Any) -> None:
    tts = voxlane_tts(server)
    try:
        async with asyncio.timeout(60):
            stream = tts.stream()
            for piece in ("Hello th", "ere. How are ", "you today?"):  # LLM-like deltas
                stream.push_text(piece)
            stream.end_input()
            events = [event async for event in stream]
            await stream.aclose()
        (turn,) = stream.turns
        assert turn.done is not None and turn.done.reason == "completed"
        assert events and all(e.segment_id == turn.turn_id for e in events)
        assert [e.is_final for e in events] == [False] * (len(events) - 1) + [True]
        assert all(e.frame.sample_rate == 24000 and e.frame.num_channels == 1 for e in events)
        audio = np.concatenate([np.frombuffer(e.frame.data, np.int16) for e in events])
        assert np.any(audio != 0)
        # The sentences arrive as timed transcripts whose start times are sentence starts.
        timed = [t for e in events for t in e.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]
        assert "".join(timed) == TEXT
        starts = [t.start_time for t in timed]
        assert starts[0] == 0.0 and starts == sorted(starts) and starts[-1] < len(audio) / 24000
        # The session went back to the pool: the next utterance reuses it.
        assert len(tts._idle) == 1
        async with asyncio.timeout(60), tts.synthesize("One more.") as chunked:
            frame = await chunked.collect()
        assert frame.sample_rate == 24000 and frame.samples_per_channel > 0
        assert len(tts._idle) == 1
    finally:
        await tts.aclose()


async def test_closing_the_stream_cancels_the_voxlane_turn(server: Any) -> None:
    tts = voxlane_tts(server)
    try:
        async with asyncio.timeout(60):
            stream = tts.stream()
            stream.push_text(LONG)
            stream.end_input()
            first = await anext(stream)  # audio is flowing
            assert first.frame.samples_per_channel > 0
            await stream.aclose()  # what AgentSession does on an interruption
            (turn,) = stream.turns
            assert turn.cancelled
            done = await turn.wait()
            assert done is not None and done.reason == "cancelled"
            # Generation stopped: far fewer samples than the whole text needs were made.
            assert done.metrics.samples < 12 * 3 * 2048
    finally:
        await tts.aclose()


async def test_errors_map_to_agents_api_errors(server: Any) -> None:
    tts = voxlane_tts(server, voice="nobody")
    try:
        async with asyncio.timeout(60):
            stream = tts.stream(conn_options=NO_RETRY)
            stream.push_text(TEXT)
            stream.end_input()
            with pytest.raises(APIError, match="unknown_voice") as caught:
                async for _ in stream:
                    pass
            assert not caught.value.retryable
            await stream.aclose()
    finally:
        await tts.aclose()
    unreachable = TTS(url="ws://127.0.0.1:9/v1/ws", api_key=KEY)
    try:
        stream = unreachable.stream(conn_options=NO_RETRY)
        stream.push_text(TEXT)
        stream.end_input()
        with pytest.raises(APIConnectionError):
            async for _ in stream:
                pass
        await stream.aclose()
    finally:
        await unreachable.aclose()


class CollectingAudioOutput(agents_io.AudioOutput):
    """An audio sink for ``AgentSession`` that keeps the frames (and plays them instantly)."""

    def __init__(self) -> None:
        super().__init__(
            label="collect", capabilities=agents_io.AudioOutputCapabilities(pause=False)
        )
        self.frames: list[Any] = []
        self._pushed = 0.0

    async def capture_frame(self, frame: Any) -> None:
        await super().capture_frame(frame)
        self.frames.append(frame)
        self._pushed += frame.duration

    def flush(self) -> None:
        super().flush()
        self.on_playback_finished(playback_position=self._pushed, interrupted=False)
        self._pushed = 0.0

    def clear_buffer(self) -> None:
        self.on_playback_finished(playback_position=self._pushed, interrupted=True)
        self._pushed = 0.0


async def test_agent_session_speaks_through_the_plugin(server: Any) -> None:
    from livekit.agents import Agent, AgentSession

    tts = voxlane_tts(server)
    assert tts.capabilities.streaming and tts.capabilities.aligned_transcript
    assert (tts.sample_rate, tts.num_channels, tts.provider) == (24000, 1, "voxlane")
    session = AgentSession(tts=tts)
    sink = CollectingAudioOutput()
    session.output.audio = sink
    try:
        async with asyncio.timeout(60):
            await session.start(Agent(instructions="Say what you are told."), record=False)
            handle = session.say(TEXT)
            await handle.wait_for_playout()
        assert not handle.interrupted
        assert sink.frames and all(f.sample_rate == 24000 for f in sink.frames)
        audio = np.concatenate([np.frombuffer(f.data, np.int16) for f in sink.frames])
        assert np.any(audio != 0)
    finally:
        await session.aclose()
        await tts.aclose()
