"""LiveKit room bridge: join a room, take dialogue turns from chat, speak them with voxlane.

The bridge is one LiveKit participant. It publishes a mono audio track (24 kHz by default) fed
from voxlane turns through an ``rtc.AudioSource`` and listens for text::

    lk.chat text streams            (LiveKit's chat topic; any sender in the room)
    data packets on --data-topic    (optional: UTF-8 text, or JSON {"text"|"message": ...})

Each message is one dialogue turn. In *say* mode the bridge speaks the text itself; in
*agent* mode it sends the text to the voxlane server's LLM (:meth:`voxlane.Session.respond`)
and speaks the answer. A new message interrupts the one playing: the audio queued in the
source is dropped (``clear_queue``), the voxlane turn is cancelled and, in agent mode, the
server is told how much of the answer was heard (``turn.playback``) so the dialogue history
keeps only that. What is spoken is published as ``lk.transcription`` text streams (one per
turn, attributes ``lk.transcribed_track_id``, ``lk.segment_id``, ``lk.transcription_final``),
each segment's text written when its audio starts to play, the stream closed with
``lk.transcription_final=true`` when the turn's audio has played out or was interrupted.

Back-pressure: ``AudioSource.capture_frame`` waits while more than ``queue_ms`` of audio is
queued, so the bridge reads the voxlane turn only as fast as the room plays it; the playback
position is the samples captured minus ``AudioSource.queued_duration``.

The ``livekit`` (and ``livekit-api`` for minting tokens) packages of the ``livekit`` extra are
imported when a bridge runs; importing this module and building the ``voxlane livekit`` parser
stay light. See ``docs/livekit.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import voxlane
from voxlane.errors import VoxlaneError

if TYPE_CHECKING:
    from livekit import rtc

__all__ = [
    "TOPIC_CHAT",
    "TOPIC_TRANSCRIPTION",
    "LiveKitBridge",
    "LiveKitBridgeConfig",
    "Utterance",
    "add_livekit_arguments",
    "config_from_args",
    "mint_token",
    "parse_data_packet",
    "run_livekit",
]

log = logging.getLogger("voxlane.livekit")

TOPIC_CHAT = "lk.chat"
TOPIC_TRANSCRIPTION = "lk.transcription"
ATTR_TRACK_ID = "lk.transcribed_track_id"
ATTR_SEGMENT_ID = "lk.segment_id"
ATTR_FINAL = "lk.transcription_final"

Mode = Literal["say", "agent"]


def _import_rtc() -> Any:
    try:
        from livekit import rtc
    except ImportError as exc:
        raise ImportError(
            "the LiveKit bridge needs the livekit package: pip install 'voxlane[livekit]'"
        ) from exc
    return rtc


# ------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class LiveKitBridgeConfig:
    """Options of :class:`LiveKitBridge` (``voxlane livekit`` sets them from flags)."""

    url: str = "ws://127.0.0.1:7880"
    """The LiveKit server URL (``ws://`` or ``wss://``)."""
    room: str | None = None
    """Room to join; needed to mint a token (a given token names its room itself)."""
    token: str | None = None
    """A join token; if None one is minted from ``livekit_api_key``/``livekit_api_secret``."""
    livekit_api_key: str | None = None
    livekit_api_secret: str | None = None
    identity: str = "voxlane"
    """Participant identity of the bridge (for minted tokens)."""
    name: str | None = None
    """Display name (for minted tokens)."""
    server: str | None = None
    """The voxlane server URL (default ``$VOXLANE_URL``, then ``ws://127.0.0.1:8765``)."""
    api_key: str | None = None
    """The voxlane API key (default ``$VOXLANE_API_KEY``)."""
    mode: Mode = "say"
    """``say``: speak the message itself; ``agent``: speak the voxlane LLM's answer."""
    chat_topic: str | None = TOPIC_CHAT
    """Text-stream topic of incoming turns (None: no text streams)."""
    data_topic: str | None = None
    """Data-packet topic of incoming turns (None: data packets are ignored)."""
    senders: tuple[str, ...] = ()
    """Only take turns from these participant identities (empty: from everybody)."""
    sample_rate: int = 24000
    """Rate of the published track and of the voxlane session (8, 16, 24 or 48 kHz)."""
    queue_ms: int = 400
    """Audio the ``AudioSource`` queues before ``capture_frame`` waits (back-pressure); the
    queue is cleared on an interruption."""
    track_name: str = "voxlane"
    transcription: bool = True
    """Publish ``lk.transcription`` text streams of what is spoken."""
    max_text_chars: int = 4000
    """Longer messages are cut to this many characters."""
    session_options: Mapping[str, Any] = field(default_factory=dict)
    """Passed to :meth:`voxlane.Session.configure` (``voice``, ``chunk_ms``, ``max_frames``...)."""

    def __post_init__(self) -> None:
        if self.mode not in ("say", "agent"):
            raise ValueError(f"mode must be 'say' or 'agent', not {self.mode!r}")
        if self.sample_rate not in (8000, 16000, 24000, 48000):
            raise ValueError(
                f"sample_rate must be 8000, 16000, 24000 or 48000, not {self.sample_rate}"
            )
        if self.queue_ms < 20:
            raise ValueError("queue_ms must be at least 20")
        if self.token is None and not self.room:
            raise ValueError("a room is needed to mint a token (or give a token)")
        if self.chat_topic is None and self.data_topic is None:
            raise ValueError("chat_topic and data_topic are both off: no turn could arrive")


def mint_token(
    api_key: str,
    api_secret: str,
    *,
    room: str,
    identity: str,
    name: str | None = None,
    ttl_s: float = 6 * 3600,
) -> str:
    """A join token (JWT) for ``room`` that may publish audio and data and subscribe."""
    from livekit import api

    grants = api.VideoGrants(
        room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True
    )
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_grants(grants)
        .with_ttl(datetime.timedelta(seconds=ttl_s))
        .with_kind("agent")
    )
    if name:
        token = token.with_name(name)
    return token.to_jwt()


def parse_data_packet(payload: bytes) -> str:
    """The text of a data packet: UTF-8 text, or a JSON object's ``text`` (or ``message``,
    LiveKit's legacy chat format). Returns "" for a payload with nothing to speak."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            obj = json.loads(text)
            if isinstance(obj, dict):
                value = obj.get("text", obj.get("message"))
                return value if isinstance(value, str) else ""
    return text


# ---------------------------------------------------------------------------- turns


@dataclass
class Utterance:
    """What became of one incoming message (:attr:`LiveKitBridge.history`)."""

    text: str
    sender: str
    turn_id: str | None = None
    status: Literal["speaking", "completed", "interrupted", "failed"] = "speaking"
    reply: str = ""
    """Agent mode: the LLM's answer text received."""
    transcript: str = ""
    """The text published on ``lk.transcription`` (what was heard)."""
    samples: int = 0
    """Samples captured into the audio source."""
    played_samples: int = 0
    """Samples played when the turn ended (all of them unless interrupted)."""
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class _Transcript:
    """The ``lk.transcription`` stream of one turn: segments are written when they play."""

    def __init__(self, bridge: LiveKitBridge, utterance: Utterance) -> None:
        self._bridge = bridge
        self._utterance = utterance
        self._segment_id = f"VX_{uuid.uuid4().hex[:12]}"
        self._queue: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
        self._writer: Any = None
        self._task = asyncio.create_task(self._run(), name="voxlane-livekit-transcript")

    def schedule(self, text: str, delay_s: float) -> None:
        self._queue.put_nowait((time.monotonic() + max(0.0, delay_s), text))

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            due, text = item
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self._write(text)

    async def _write(self, text: str) -> None:
        piece = text if not self._utterance.transcript else " " + text
        try:
            if self._writer is None:
                attributes = {ATTR_FINAL: "false", ATTR_SEGMENT_ID: self._segment_id}
                if self._bridge.track_sid:
                    attributes[ATTR_TRACK_ID] = self._bridge.track_sid
                self._writer = await self._bridge.room.local_participant.stream_text(
                    topic=TOPIC_TRANSCRIPTION, attributes=attributes
                )
            await self._writer.write(piece)
            self._utterance.transcript += piece
        except Exception as exc:  # a transcript must never stop the audio
            log.warning("publishing the transcription failed: %s", exc)

    async def close(self, *, drain: bool) -> None:
        """Write what is due (``drain``) or drop what has not played yet, then end the stream."""
        if drain:
            self._queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await self._task
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        if self._writer is not None:
            attributes = {ATTR_FINAL: "true", ATTR_SEGMENT_ID: self._segment_id}
            if self._bridge.track_sid:
                attributes[ATTR_TRACK_ID] = self._bridge.track_sid
            try:
                await self._writer.aclose(attributes=attributes)
            except Exception as exc:
                log.warning("closing the transcription stream failed: %s", exc)


# ------------------------------------------------------------------------------ bridge


class LiveKitBridge:
    """Speaks voxlane turns into a LiveKit room: ``await bridge.run()`` until :meth:`stop`.

    ``room`` defaults to a new ``rtc.Room()``; tests pass a stand-in implementing the subset
    used (``connect``, ``disconnect``, ``isconnected``, ``on``, ``register_text_stream_handler``,
    ``unregister_text_stream_handler``, and on ``local_participant``: ``identity``,
    ``publish_track``, ``stream_text``). ``async with LiveKitBridge(config) as bridge:`` runs it
    in the background for the block; :attr:`ready` is set once it is in the room.
    """

    def __init__(self, config: LiveKitBridgeConfig, *, room: Any = None) -> None:
        self.config = config
        self.room: Any = room
        self.source: rtc.AudioSource | None = None
        self.track: rtc.LocalAudioTrack | None = None
        self.track_sid: str = ""
        """Sid of the published audio track (``lk.transcribed_track_id``)."""
        self.session: voxlane.Session | None = None
        self.ready = asyncio.Event()
        """Set once the bridge is in the room with its track published."""
        self.history: list[Utterance] = []
        """Every message taken as a turn, oldest first (the bridge keeps the last 100)."""
        self._inbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._speech: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._readers: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._rtc: Any = None

    # ----------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to finish: the turn playing is interrupted, the room left."""
        self._stopping.set()

    async def __aenter__(self) -> LiveKitBridge:
        self._task = asyncio.create_task(self.run(), name="voxlane-livekit-bridge")
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()  # raises why it could not start
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._task is not None:
            await self._task

    def token(self) -> str:
        """The join token: the configured one, or one minted from the API key and secret."""
        config = self.config
        if config.token:
            return config.token
        key = config.livekit_api_key or os.environ.get("LIVEKIT_API_KEY")
        secret = config.livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET")
        if not key or not secret:
            raise ValueError(
                "no LiveKit token: give one, or an API key and secret to mint one "
                "($LIVEKIT_API_KEY / $LIVEKIT_API_SECRET)"
            )
        assert config.room is not None
        return mint_token(key, secret, room=config.room, identity=config.identity, name=config.name)

    async def run(self) -> None:
        """Join the room and serve turns until :meth:`stop` or the room disconnects."""
        self._rtc = rtc = _import_rtc()
        config = self.config
        token = self.token()
        self.session = await self._connect_voxlane()
        if self.room is None:
            self.room = rtc.Room()
        room = self.room
        disconnected = asyncio.Event()
        room.on("disconnected", lambda *_: disconnected.set())
        if config.data_topic is not None:
            room.on("data_received", self._on_data)
        worker: asyncio.Task[None] | None = None
        try:
            await room.connect(config.url, token, rtc.RoomOptions(auto_subscribe=False))
            self.source = rtc.AudioSource(config.sample_rate, 1, queue_size_ms=config.queue_ms)
            self.track = rtc.LocalAudioTrack.create_audio_track(config.track_name, self.source)
            publication = await room.local_participant.publish_track(
                self.track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            )
            self.track_sid = getattr(publication, "sid", "") or ""
            if config.chat_topic is not None:
                room.register_text_stream_handler(config.chat_topic, self._on_text_stream)
            worker = asyncio.create_task(self._serve(), name="voxlane-livekit-worker")
            self.ready.set()
            log.info("in room %s as %s (%s mode)", config.room or "?", config.identity, config.mode)
            waits = [asyncio.create_task(e.wait()) for e in (self._stopping, disconnected)]
            try:
                await asyncio.wait({worker, *waits}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
            if worker.done():
                worker.result()  # a bug in the worker: surface it
        finally:
            self.ready.clear()
            if worker is not None:
                worker.cancel()
                with contextlib.suppress(BaseException):
                    await worker
            await self._interrupt()
            for task in list(self._readers):
                task.cancel()
            if config.chat_topic is not None:
                with contextlib.suppress(Exception):
                    room.unregister_text_stream_handler(config.chat_topic)
            with contextlib.suppress(Exception):
                await room.disconnect()
            if self.source is not None:
                with contextlib.suppress(Exception):
                    await self.source.aclose()
            if self.session is not None:
                await self.session.close()

    async def _connect_voxlane(self) -> voxlane.Session:
        session = await voxlane.connect(self.config.server, api_key=self.config.api_key)
        try:
            await session.configure(
                sample_rate=self.config.sample_rate,
                sample_format="pcm_s16le",
                **dict(self.config.session_options),
            )
        except BaseException:
            await session.close()
            raise
        return session

    # ------------------------------------------------------------------- input

    def submit(self, text: str, sender: str = "") -> None:
        """Take ``text`` as a new turn (interrupting the one playing), as if sent by ``sender``."""
        if self.config.senders and sender not in self.config.senders:
            log.debug("ignoring a message from %r (not in senders)", sender)
            return
        text = text.strip()[: self.config.max_text_chars]
        if text:
            self._inbox.put_nowait((text, sender))

    def _on_text_stream(self, reader: Any, participant_identity: str) -> None:
        task = asyncio.create_task(self._read_stream(reader, participant_identity))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read_stream(self, reader: Any, sender: str) -> None:
        try:
            text = await reader.read_all()
        except Exception as exc:  # aborted by the sender, or the room went away
            log.info("chat stream from %s failed: %s", sender, exc)
            return
        self.submit(text, sender)

    def _on_data(self, packet: Any) -> None:
        if packet.topic != self.config.data_topic:
            return
        participant = getattr(packet, "participant", None)
        sender = getattr(participant, "identity", "") if participant is not None else ""
        self.submit(parse_data_packet(bytes(packet.data)), sender)

    # ------------------------------------------------------------------ speaking

    async def _serve(self) -> None:
        # One message at a time; a new one interrupts the turn playing.
        while True:
            text, sender = await self._inbox.get()
            await self._interrupt()
            utterance = Utterance(text=text, sender=sender)
            self.history.append(utterance)
            del self.history[:-100]
            self._speech = asyncio.create_task(self._speak(utterance), name="voxlane-livekit-turn")

    async def _interrupt(self) -> None:
        speech, self._speech = self._speech, None
        if speech is not None and not speech.done():
            speech.cancel()
        if speech is not None:
            with contextlib.suppress(BaseException):
                await speech

    async def _session(self) -> voxlane.Session:
        if self.session is None or self.session.closed:
            log.info("voxlane connection lost: reconnecting")
            old, self.session = self.session, None
            if old is not None:
                await old.close()
            self.session = await self._connect_voxlane()
        return self.session

    def _played(self, utterance: Utterance) -> int:
        assert self.source is not None
        queued = round(self.source.queued_duration * self.config.sample_rate)
        return max(0, utterance.samples - queued)

    async def _speak(self, utterance: Utterance) -> None:
        rtc = self._rtc
        source = self.source
        assert source is not None
        rate = self.config.sample_rate
        turn: voxlane.Turn | None = None
        transcript = _Transcript(self, utterance) if self.config.transcription else None
        finished = False
        try:
            session = await self._session()
            if self.config.mode == "agent":
                turn = await session.respond(utterance.text)
            else:
                turn = session.speak(utterance.text)
            utterance.turn_id = turn.turn_id
            async for event in turn:
                if isinstance(event, voxlane.AudioChunk):
                    if event.sample_format != "pcm_s16le":
                        raise VoxlaneError(f"expected pcm_s16le audio, got {event.sample_format}")
                    frame = rtc.AudioFrame(event.pcm, event.sample_rate, 1, event.num_samples)
                    await source.capture_frame(frame)  # waits while the queue is full
                    utterance.samples += event.num_samples
                elif isinstance(event, voxlane.Mark):
                    if transcript is not None:
                        # The segment starts once the audio captured before it has played.
                        ahead = max(0, event.sample - self._played(utterance))
                        transcript.schedule(event.text, ahead / rate)
                else:  # agent turns: the LLM's text
                    utterance.reply += getattr(event, "text", "")
            await source.wait_for_playout()
            finished = True
            utterance.played_samples = utterance.samples
            utterance.status = "completed"
        except asyncio.CancelledError:
            utterance.status = "interrupted"
            raise
        except (VoxlaneError, OSError) as exc:
            utterance.status, utterance.error = "failed", str(exc)
            log.warning("turn %r failed: %s", utterance.text[:40], exc)
        except Exception as exc:  # a bug must not stop the bridge: the next message is served
            utterance.status, utterance.error = "failed", repr(exc)
            log.exception("turn %r failed", utterance.text[:40])
        finally:
            if not finished:
                utterance.played_samples = self._played(utterance)
                source.clear_queue()  # what was not heard is not played
            if turn is not None and not turn.is_done:
                with contextlib.suppress(VoxlaneError, asyncio.CancelledError):
                    if turn.agent:
                        # Before the cancel: the history keeps only what was heard.
                        await turn.report_playback(utterance.played_samples)
                    await turn.cancel()
            elif turn is not None and turn.agent and not finished:
                with contextlib.suppress(VoxlaneError):
                    await turn.report_playback(utterance.played_samples)
            if transcript is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await transcript.close(drain=finished)
            utterance.done.set()


# -------------------------------------------------------------------------------- CLI


def add_livekit_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``voxlane livekit``."""
    p.add_argument(
        "--url",
        default=os.environ.get("LIVEKIT_URL", "ws://127.0.0.1:7880"),
        help="LiveKit server URL (default $LIVEKIT_URL or ws://127.0.0.1:7880)",
    )
    p.add_argument("--room", help="room to join (needed unless --token names it)")
    p.add_argument("--token", default=os.environ.get("LIVEKIT_TOKEN"), help="join token")
    p.add_argument("--livekit-api-key", help="mint a token with this key ($LIVEKIT_API_KEY)")
    p.add_argument("--livekit-api-secret", help="... and secret ($LIVEKIT_API_SECRET)")
    p.add_argument("--identity", default="voxlane", help="participant identity (default voxlane)")
    p.add_argument("--name", help="participant display name")
    p.add_argument("--server", help="voxlane server URL (default $VOXLANE_URL)")
    p.add_argument("--api-key", help="voxlane API key (default $VOXLANE_API_KEY)")
    p.add_argument(
        "--mode",
        choices=["say", "agent"],
        default="say",
        help="say: speak each chat message; agent: speak the voxlane LLM's answer to it",
    )
    p.add_argument("--chat-topic", default=TOPIC_CHAT, help="text-stream topic (default lk.chat)")
    p.add_argument("--no-chat", action="store_true", help="ignore text streams")
    p.add_argument("--data-topic", help="also take turns from data packets on this topic")
    p.add_argument(
        "--sender",
        action="append",
        dest="senders",
        default=[],
        metavar="IDENTITY",
        help="only take turns from this participant (repeatable)",
    )
    p.add_argument("--sample-rate", type=int, choices=[8000, 16000, 24000, 48000], default=24000)
    p.add_argument("--queue-ms", type=int, default=400, help="AudioSource queue (ms)")
    p.add_argument("--no-transcription", action="store_true", help="no lk.transcription streams")
    p.add_argument("--voice", help="voxlane voice")
    p.add_argument("--chunk-ms", type=int, help="voxlane audio chunk length, 20-80 ms")
    p.add_argument("--max-frames", type=int, help="cap on audio frames per segment (85 ms)")
    p.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> LiveKitBridgeConfig:
    """The bridge configuration the ``voxlane livekit`` flags describe."""
    from voxlane.cli import session_options

    options = session_options(args, ("voice", "chunk_ms", "max_frames"))
    return LiveKitBridgeConfig(
        url=args.url,
        room=args.room,
        token=args.token,
        livekit_api_key=args.livekit_api_key,
        livekit_api_secret=args.livekit_api_secret,
        identity=args.identity,
        name=args.name,
        server=args.server,
        api_key=args.api_key,
        mode=args.mode,
        chat_topic=None if args.no_chat else args.chat_topic,
        data_topic=args.data_topic,
        senders=tuple(args.senders),
        sample_rate=args.sample_rate,
        queue_ms=args.queue_ms,
        transcription=not args.no_transcription,
        session_options=options,
    )


def run_livekit(args: argparse.Namespace) -> int:
    """``voxlane livekit``: run the bridge until SIGINT/SIGTERM or the room disconnects."""
    from voxlane.cli import configure_logging, run_until_signal

    configure_logging(args.log_level)
    config = config_from_args(args)
    _import_rtc()  # a clear message before anything starts
    return run_until_signal(LiveKitBridge(config))
