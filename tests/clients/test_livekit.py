"""The LiveKit room bridge: the audio path with real ``rtc`` objects, the room and text-stream
logic against a stand-in for ``rtc.Room`` (no LiveKit server can run here), and voxlane turns
from a real server on loopback (agent mode: its LLM is a loopback SSE endpoint)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

rtc = pytest.importorskip("livekit.rtc")

from voxlane.clients.livekit import (  # noqa: E402
    ATTR_FINAL,
    ATTR_SEGMENT_ID,
    ATTR_TRACK_ID,
    TOPIC_CHAT,
    TOPIC_TRANSCRIPTION,
    LiveKitBridge,
    LiveKitBridgeConfig,
    add_livekit_arguments,
    config_from_args,
    mint_token,
    parse_data_packet,
)
from voxlane.server.agent import LLMConfig  # noqa: E402

from ..fake_llm import FakeLLM  # noqa: E402
from .conftest import KEY, free_port  # noqa: E402

RATE = 24000
LONG = " ".join(f"Sentence number {n} is here." for n in range(1, 13))


# ------------------------------------------------------------------- room stand-in


class FakeWriter:
    """A ``TextStreamWriter``: records the chunks and the closing attributes."""

    def __init__(self, topic: str, attributes: dict[str, str]) -> None:
        self.topic = topic
        self.attributes = attributes
        self.chunks: list[str] = []
        self.final_attributes: dict[str, str] | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    async def write(self, text: str) -> None:
        assert self.final_attributes is None, "write after close"
        self.chunks.append(text)

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        assert self.final_attributes is None, "closed twice"
        self.final_attributes = dict(attributes or {})


class FakeParticipant:
    identity = "voxlane"

    def __init__(self) -> None:
        self.tracks: list[tuple[Any, Any]] = []
        self.streams: list[FakeWriter] = []

    async def publish_track(self, track: Any, options: Any) -> Any:
        self.tracks.append((track, options))
        return SimpleNamespace(sid="TR_voxlane")

    async def stream_text(self, *, topic: str = "", attributes: Any = None, **_: Any) -> FakeWriter:
        writer = FakeWriter(topic, dict(attributes or {}))
        self.streams.append(writer)
        return writer


class FakeReader:
    def __init__(self, text: str, topic: str) -> None:
        self.info = SimpleNamespace(topic=topic, attributes={}, stream_id="ST_x")
        self._text = text

    async def read_all(self) -> str:
        return self._text


class FakeRoom:
    """The subset of ``rtc.Room`` the bridge uses; ``chat()``/``data()`` play remote peers."""

    def __init__(self) -> None:
        self.local_participant = FakeParticipant()
        self.handlers: dict[str, Any] = {}
        self.listeners: dict[str, list[Any]] = {}
        self.connected_with: tuple[str, str] | None = None
        self.disconnects = 0

    def on(self, event: str, callback: Any = None) -> Any:
        self.listeners.setdefault(event, []).append(callback)
        return callback

    def emit(self, event: str, *args: Any) -> None:
        for callback in self.listeners.get(event, []):
            callback(*args)

    async def connect(self, url: str, token: str, options: Any = None) -> None:
        self.connected_with = (url, token)

    async def disconnect(self) -> None:
        self.disconnects += 1

    def isconnected(self) -> bool:
        return self.connected_with is not None and not self.disconnects

    def register_text_stream_handler(self, topic: str, handler: Any) -> None:
        if topic in self.handlers:
            raise ValueError(f"text stream handler for topic '{topic}' already set")
        self.handlers[topic] = handler

    def unregister_text_stream_handler(self, topic: str) -> None:
        self.handlers.pop(topic, None)

    def chat(self, text: str, sender: str = "alice", topic: str = TOPIC_CHAT) -> None:
        self.handlers[topic](FakeReader(text, topic), sender)

    def data(self, payload: bytes, topic: str, sender: str = "alice") -> None:
        participant = SimpleNamespace(identity=sender)
        self.emit(
            "data_received", SimpleNamespace(data=payload, topic=topic, participant=participant)
        )

    def transcriptions(self) -> list[FakeWriter]:
        return [w for w in self.local_participant.streams if w.topic == TOPIC_TRANSCRIPTION]


class TrackListener:
    """Reads a local track back in process (``rtc.AudioStream``): counts audible samples."""

    def __init__(self, track: Any) -> None:
        self.stream = rtc.AudioStream.from_track(track=track, sample_rate=RATE, num_channels=1)
        self.audible = 0
        self.frames = 0
        self.heard = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.stream:
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            self.frames += 1
            if np.any(samples != 0):
                self.audible += len(samples)
                self.heard.set()

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self.stream.aclose()


def config(server: Any, **overrides: Any) -> LiveKitBridgeConfig:
    fields: dict[str, Any] = {
        "url": "ws://livekit.invalid:7880",
        "token": "test-token",
        "server": server.url,
        "api_key": KEY,
        "session_options": {"max_frames": 3, "seed": 1},
    }
    return LiveKitBridgeConfig(**(fields | overrides))


@contextlib.asynccontextmanager
async def bridge_in(room: FakeRoom, cfg: LiveKitBridgeConfig) -> AsyncIterator[LiveKitBridge]:
    async with asyncio.timeout(60):
        async with LiveKitBridge(cfg, room=room) as bridge:
            yield bridge


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- audio path (real rtc)


async def test_audio_source_to_track_reads_back_and_clear_queue_silences_it() -> None:
    source = rtc.AudioSource(RATE, 1, queue_size_ms=5000)
    track = rtc.LocalAudioTrack.create_audio_track("t", source)
    listener = TrackListener(track)
    tone = (np.sin(np.arange(RATE // 50) * 0.2) * 8000).astype(np.int16)  # 20 ms
    try:
        for _ in range(150):  # 3 s fit in the 5 s queue: capture returns without pacing
            await source.capture_frame(rtc.AudioFrame(tone.tobytes(), RATE, 1, len(tone)))
        await asyncio.wait_for(listener.heard.wait(), 10)
        source.clear_queue()
        assert source.queued_duration == 0.0
        frames = listener.frames
        await wait_for(lambda: listener.frames >= frames + 40)  # 400 ms more of the track
        after = listener.audible
        await wait_for(lambda: listener.frames >= frames + 80)
        # Audio arrived; after the clear the track is silence (it keeps producing frames).
        assert 0 < listener.audible < 150 * len(tone)
        assert listener.audible == after
    finally:
        await listener.aclose()
        await source.aclose()


# -------------------------------------------------------------------- helpers


def test_parse_data_packet_accepts_text_and_json() -> None:
    assert parse_data_packet(b"Hello there") == "Hello there"
    assert parse_data_packet(json.dumps({"text": "Hi"}).encode()) == "Hi"
    assert parse_data_packet(json.dumps({"message": "Yo", "id": "1"}).encode()) == "Yo"
    assert parse_data_packet(b"\xff\xfe") == ""
    assert parse_data_packet(b'{"other": 1}') == ""


def test_mint_token_grants_joining_the_room() -> None:
    import jwt

    token = mint_token("devkey", "secret" * 6, room="lobby", identity="vox", name="Vox")
    claims = jwt.decode(token, "secret" * 6, algorithms=["HS256"])
    assert claims["iss"] == "devkey" and claims["sub"] == "vox" and claims["name"] == "Vox"
    assert claims["video"]["room"] == "lobby" and claims["video"]["roomJoin"] is True
    assert claims["video"]["canPublish"] is True


def test_config_needs_a_room_or_a_token_and_cli_flags_map() -> None:
    with pytest.raises(ValueError, match="room"):
        LiveKitBridgeConfig()
    with pytest.raises(ValueError, match="mode"):
        LiveKitBridgeConfig(room="r", mode="shout")  # type: ignore[arg-type]
    import argparse

    parser = argparse.ArgumentParser()
    add_livekit_arguments(parser)
    args = parser.parse_args(
        [
            *("--url", "ws://lk:7880", "--room", "lobby", "--mode", "agent"),
            *("--data-topic", "say", "--voice", "leo", "--sender", "alice", "--no-transcription"),
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.url, cfg.room, cfg.mode, cfg.data_topic) == (
        "ws://lk:7880",
        "lobby",
        "agent",
        "say",
    )
    assert cfg.chat_topic == TOPIC_CHAT and cfg.senders == ("alice",) and not cfg.transcription
    assert cfg.session_options == {"voice": "leo"}


def test_cli_has_a_livekit_command() -> None:
    from voxlane.cli import _build_parser

    parser, handlers = _build_parser()
    args = parser.parse_args(["livekit", "--url", "ws://lk:7880", "--room", "lobby"])
    assert args.command == "livekit" and "livekit" in handlers
    assert config_from_args(args).room == "lobby"


# ---------------------------------------------------------- the bridge (stand-in room)


async def test_say_mode_speaks_a_chat_message_with_transcription_in_the_room(server: Any) -> None:
    room = FakeRoom()
    async with bridge_in(room, config(server)) as bridge:
        assert room.connected_with == ("ws://livekit.invalid:7880", "test-token")
        ((track, options),) = room.local_participant.tracks
        assert track is bridge.track and options.source == rtc.TrackSource.SOURCE_MICROPHONE
        listener = TrackListener(track)
        try:
            room.chat("Hello there. How are you?")
            await wait_for(lambda: bridge.history and bridge.history[0].done.is_set())
            await wait_for(lambda: listener.audible > 0, 10)
        finally:
            await listener.aclose()
        (utterance,) = bridge.history
        assert utterance.status == "completed" and utterance.sender == "alice"
        assert utterance.samples > 0 and utterance.played_samples == utterance.samples
        (writer,) = room.transcriptions()
        assert writer.attributes[ATTR_TRACK_ID] == "TR_voxlane"
        assert writer.attributes[ATTR_FINAL] == "false"
        assert writer.final_attributes is not None and writer.final_attributes[ATTR_FINAL] == "true"
        assert writer.attributes[ATTR_SEGMENT_ID] == writer.final_attributes[ATTR_SEGMENT_ID]
        assert writer.text == "Hello there. How are you?" == utterance.transcript
    assert room.disconnects == 1 and TOPIC_CHAT not in room.handlers


async def test_a_new_message_interrupts_the_turn_playing(server: Any) -> None:
    room = FakeRoom()
    async with bridge_in(room, config(server)) as bridge:
        clears = 0
        real_clear = bridge.source.clear_queue

        def clear() -> None:
            nonlocal clears
            clears += 1
            real_clear()

        bridge.source.clear_queue = clear  # type: ignore[method-assign]
        room.chat(LONG)
        await wait_for(
            lambda: bridge.history and bridge.history[0].transcript
        )  # its first sentence is playing
        room.chat("Stop.", sender="bob")
        await wait_for(lambda: len(bridge.history) == 2 and bridge.history[1].done.is_set())
        first, second = bridge.history
        assert first.status == "interrupted" and clears == 1
        assert second.status == "completed" and second.transcript == "Stop."
        # The first transcription stream ends final with only what was heard of it.
        interrupted, spoken = room.transcriptions()
        assert interrupted.final_attributes[ATTR_FINAL] == "true"
        assert interrupted.text == first.transcript and LONG.startswith(first.transcript)
        assert len(first.transcript) < len(LONG)
        assert spoken.text == "Stop."
        assert interrupted.attributes[ATTR_SEGMENT_ID] != spoken.attributes[ATTR_SEGMENT_ID]
        # The voxlane turn was cancelled: the session has nothing open any more.
        assert bridge.session is not None and not bridge.session._turns


async def test_data_packets_on_the_topic_are_turns_and_senders_filter(server: Any) -> None:
    room = FakeRoom()
    cfg = config(server, data_topic="voxlane.say", senders=("alice",), transcription=False)
    async with bridge_in(room, cfg) as bridge:
        room.data(b"Not this topic.", topic="other")
        room.data(json.dumps({"text": "Not this sender."}).encode(), "voxlane.say", sender="eve")
        room.chat("Nor this one.", sender="eve")
        room.data(json.dumps({"text": "From data."}).encode(), topic="voxlane.say")
        await wait_for(lambda: bridge.history and bridge.history[-1].done.is_set())
        (utterance,) = bridge.history
        assert utterance.text == "From data." and utterance.status == "completed"
        assert room.transcriptions() == []


async def test_a_lost_voxlane_server_fails_the_turn_and_the_next_message_reconnects(
    start_server: Any,
) -> None:
    port = free_port()
    server = await start_server(port=port)
    server.url = f"ws://127.0.0.1:{port}"
    room = FakeRoom()
    async with bridge_in(room, config(server)) as bridge:
        await server.close()
        await wait_for(lambda: bridge.session is not None and bridge.session.closed)
        room.chat("Nobody hears this.")
        await wait_for(lambda: bridge.history and bridge.history[0].done.is_set())
        assert bridge.history[0].status == "failed" and bridge.history[0].error
        await start_server(port=port)  # the server is back
        room.chat("Back again.")
        await wait_for(lambda: len(bridge.history) == 2 and bridge.history[1].done.is_set())
        assert bridge.history[1].status == "completed" and bridge.history[1].samples > 0
        assert not bridge.session.closed


# ----------------------------------------------------------------------- agent mode

ANSWER = "Hello! Nice to meet you."
ENDLESS = "One two three four five. "


async def test_agent_mode_speaks_the_answer_and_barge_in_keeps_what_was_heard(
    start_server: Any,
) -> None:
    async with FakeLLM.barge_in(ENDLESS, ANSWER) as llm:
        server = await start_server(llm=LLMConfig(base_url=llm.url, model="loopback"))
        room = FakeRoom()
        async with bridge_in(room, config(server, mode="agent")) as bridge:
            room.chat("Count for me.")
            # capture_frame waits while 400 ms are queued: 0.8 s captured = 0.4 s heard.
            await wait_for(lambda: bridge.history and bridge.history[0].samples >= 0.8 * RATE)
            room.chat("Hi!")
            await wait_for(lambda: len(bridge.history) == 2 and bridge.history[1].done.is_set())
        first, second = bridge.history
        assert first.status == "interrupted" and first.reply.startswith(ENDLESS)
        assert second.status == "completed" and second.reply == ANSWER
        assert second.transcript == ANSWER
        # The second request carries the first answer cut to what was heard.
        history = llm.requests[1]["messages"]
        assert [m["role"] for m in history[-3:]] == ["user", "assistant", "user"]
        heard = history[-2]["content"]
        assert heard and ENDLESS.strip().startswith(heard.split(".")[0])
        assert len(heard) < len(first.reply)
