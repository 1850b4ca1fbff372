"""The sans-I/O core of protocol v1: session and turn state, without a socket.

:class:`ServerSession` is what a WebSocket server drives, the way ``websockets``
drives its protocol objects::

    session = ServerSession(limits=..., voices=...)
    send(session.data_to_send())                # session.ready
    for message in websocket:                   # I/O layer
        if isinstance(message, str):
            commands = session.receive_text(message)
        else:
            commands = session.receive_bytes(message)
        for command in commands:                # StartTurn, AppendText, CancelTurn, ...
            run(command)                        # pipeline work, off this object
        send(session.data_to_send())

The pipeline reports back through :meth:`ServerSession.send_audio`,
:meth:`~ServerSession.send_mark`, :meth:`~ServerSession.turn_done`,
:meth:`~ServerSession.voice_cloned` and :meth:`~ServerSession.send_error`; each queues
outbound messages, and :meth:`~ServerSession.turn_done` returns the commands of the
next queued turn. Nothing here blocks, awaits or reads a clock.

:class:`ClientSession` is the small client-side counterpart: it turns received text
and binary messages into typed objects and checks audio frame continuity.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from voxlane.errors import (
    AudioFormatError,
    BadMessageError,
    DuplicateTurnError,
    MessageTooLargeError,
    ProtocolError,
    TooManyTurnsError,
    TurnClosedError,
    UnknownTurnError,
    UnknownVoiceError,
    VoxlaneError,
)
from voxlane.protocol import (
    BUILTIN_VOICES,
    AudioFrame,
    AudioHeader,
    CloseCode,
    ErrorMessage,
    Limits,
    SampleFormat,
    SampleFormatCode,
    ServerMessage,
    SessionConfig,
    SessionConfigure,
    SessionConfigured,
    SessionReady,
    TurnAppend,
    TurnCancel,
    TurnCancelled,
    TurnDone,
    TurnEnd,
    TurnFlush,
    TurnMark,
    TurnMetrics,
    TurnStart,
    TurnStarted,
    VoiceClone,
    VoiceCloned,
    bytes_per_sample,
    dump_message,
    parse_client_message,
    parse_server_message,
)

__all__ = [
    "AppendText",
    "AudioChunk",
    "CancelTurn",
    "ClientSession",
    "CloneVoice",
    "CloseConnection",
    "Command",
    "ConfigureSession",
    "EndTurn",
    "FlushTurn",
    "ServerSession",
    "StartTurn",
    "Turn",
    "TurnPhase",
]


# --------------------------------------------------------------------------- commands
# What the I/O layer must do. Turn commands only ever concern the active turn and
# arrive in the order the client sent them.


@dataclass(frozen=True, slots=True)
class ConfigureSession:
    """The session configuration changed (already validated and acknowledged)."""

    config: SessionConfig


@dataclass(frozen=True, slots=True)
class CloneVoice:
    """Clone a voice from reference audio; answer with ``voice_cloned`` or ``send_error``.

    The size is checked; the I/O layer decodes ``audio`` and checks its duration
    against ``Limits.max_clone_seconds`` (raise :class:`AudioFormatError`).
    """

    request_id: str | None
    name: str | None
    transcript: str
    audio: bytes
    audio_format: str
    sample_rate: int | None


@dataclass(frozen=True, slots=True)
class StartTurn:
    """A turn became active: set up its pipeline with ``config`` (voice already resolved)."""

    turn_id: str
    turn_number: int
    config: SessionConfig


@dataclass(frozen=True, slots=True)
class AppendText:
    """Text for the active turn; ``offset`` is where it starts in the turn's text."""

    turn_id: str
    text: str
    offset: int


@dataclass(frozen=True, slots=True)
class FlushTurn:
    """Speak the buffered text of the active turn now."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class EndTurn:
    """No more text: finish speaking, then call ``turn_done``."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class CancelTurn:
    """Stop generating for the turn, then call ``turn_done`` (audio is dropped already)."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Send ``data_to_send()``, then close the WebSocket with this code."""

    code: int
    reason: str


Command = (
    ConfigureSession
    | CloneVoice
    | StartTurn
    | AppendText
    | FlushTurn
    | EndTurn
    | CancelTurn
    | CloseConnection
)


# ------------------------------------------------------------------------------ turns


class TurnPhase(Enum):
    """``QUEUED -> ACTIVE -> ENDED -> DONE``; ``CANCELLED`` from any open phase.

    ``ENDED`` means the client sent ``turn.end`` to an active turn; a queued turn that
    was ended becomes ``ENDED`` when it is activated.
    """

    QUEUED = "queued"
    ACTIVE = "active"
    ENDED = "ended"
    CANCELLED = "cancelled"
    DONE = "done"


@dataclass
class Turn:
    """Book-keeping of one turn (read it; the session changes it)."""

    turn_id: str
    number: int
    config: SessionConfig
    phase: TurnPhase = TurnPhase.QUEUED
    input_closed: bool = False
    chars: int = 0
    """Characters of text received."""
    sequence: int = 0
    """Sequence number of the next audio frame."""
    samples: int = 0
    """Samples sent so far (the sample offset of the next frame)."""
    segments: int = 0
    """Marks sent so far."""
    pending: list[Command] = field(default_factory=list)
    """Commands held while the turn is queued."""

    @property
    def speaking(self) -> bool:
        """True while audio of this turn may be sent."""
        return self.phase in (TurnPhase.ACTIVE, TurnPhase.ENDED)


# ---------------------------------------------------------------------------- server


class ServerSession:
    """Protocol state of one server-side WebSocket session.

    Feed it every received message with :meth:`receive_text` / :meth:`receive_bytes`,
    execute the returned commands, and send :meth:`data_to_send` after every call.
    Client mistakes are answered with ``error`` messages and the session lives on;
    an oversize message, too many errors, or :meth:`fail` close it: the returned
    :class:`CloseConnection` says with which code.

    Not thread-safe: call it from the event loop only (pipeline threads hand their
    results to the loop first). Send :meth:`data_to_send` in order and nothing else:
    that order is what guarantees no audio of a turn follows its ``turn.cancelled``.
    """

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        config: SessionConfig | None = None,
        voices: Iterable[str] | None = BUILTIN_VOICES,
        session_id: str | None = None,
        server: str = "voxlane",
    ) -> None:
        """``voices`` are the voice ids a client may pick (``None``: any, unchecked)."""
        self.limits = limits or Limits()
        self.config = config or SessionConfig()
        self.session_id = session_id or uuid.uuid4().hex
        self.voices: set[str] | None = None if voices is None else set(voices)
        self.close_code: int | None = None
        """Set once the session is closed (``None`` if the connection was just lost)."""
        self.closed = False
        self.errors = 0
        """Protocol errors caused by the client so far."""
        self._turns: dict[str, Turn] = {}  # open turns, in start order
        self._queue: deque[Turn] = deque()
        self._active: Turn | None = None
        self._used_ids: set[str] = set()
        self._numbers = itertools.count(1)
        self._clone: VoiceClone | None = None  # waiting for its binary audio
        self._out: list[str | bytes] = []
        if self.voices is not None:
            self._check_voice(self.config.voice)
        self._send(
            SessionReady(
                session_id=self.session_id,
                server=server,
                config=self.config,
                limits=self.limits,
                voices=sorted(self.voices) if self.voices is not None else [],
            )
        )

    # ------------------------------------------------------------------ inspection

    @property
    def active_turn(self) -> Turn | None:
        """The turn being spoken (or being cancelled), if any."""
        return self._active

    @property
    def open_turns(self) -> list[Turn]:
        """Turns not yet done: the active one first, then the queue in order."""
        return list(self._turns.values())

    def turn(self, turn_id: str) -> Turn:
        """The open turn ``turn_id``; raises :class:`UnknownTurnError`."""
        try:
            return self._turns[turn_id]
        except KeyError:
            raise UnknownTurnError(f"turn {turn_id!r} is not open on this session") from None

    def data_to_send(self) -> list[str | bytes]:
        """Outbound messages queued since the last call, in order (text is JSON)."""
        out, self._out = self._out, []
        return out

    # --------------------------------------------------------------------- receive

    def receive_text(self, data: str) -> list[Command]:
        """Handle one text message; returns the commands it causes."""
        if self.closed:
            return []
        commands: list[Command] = []
        if self._clone is not None:
            clone, self._clone = self._clone, None
            commands += self._client_error(
                BadMessageError("voice.clone must be followed by a binary message"),
                request_id=clone.request_id,
            )
            if self.closed:
                return commands
        try:
            message = parse_client_message(data, max_bytes=self.limits.max_message_bytes)
        except MessageTooLargeError as exc:
            return commands + self._fatal(exc, CloseCode.MESSAGE_TOO_BIG)
        except ProtocolError as exc:
            return commands + self._client_error(exc)
        try:
            commands += self._dispatch(message)
        except (ProtocolError, AudioFormatError) as exc:
            commands += self._client_error(
                exc,
                turn_id=getattr(message, "turn_id", None),
                request_id=getattr(message, "request_id", None),
            )
        return commands

    def receive_bytes(self, data: bytes) -> list[Command]:
        """Handle one binary message: only valid as the audio of a pending ``voice.clone``."""
        if self.closed:
            return []
        clone, self._clone = self._clone, None
        if clone is None:
            if len(data) > self.limits.max_message_bytes:
                return self._fatal(
                    MessageTooLargeError(f"binary message of {len(data)} bytes"),
                    CloseCode.MESSAGE_TOO_BIG,
                )
            return self._client_error(BadMessageError("unexpected binary message"))
        if len(data) != clone.audio_bytes:
            return self._client_error(
                AudioFormatError(
                    f"voice.clone announced {clone.audio_bytes} bytes, received {len(data)}"
                ),
                request_id=clone.request_id,
            )
        return [
            CloneVoice(
                request_id=clone.request_id,
                name=clone.name,
                transcript=clone.transcript,
                audio=bytes(data),
                audio_format=clone.audio_format,
                sample_rate=clone.sample_rate,
            )
        ]

    def _dispatch(self, message: object) -> list[Command]:
        if isinstance(message, SessionConfigure):
            return self._configure(message)
        if isinstance(message, VoiceClone):
            return self._announce_clone(message)
        if isinstance(message, TurnStart):
            return self._start(message)
        if isinstance(message, TurnAppend):
            return self._append(message)
        if isinstance(message, TurnFlush):
            turn = self._open_for_text(message.turn_id)
            return self._route(turn, FlushTurn(turn.turn_id))
        if isinstance(message, TurnEnd):
            return self._end(message)
        if isinstance(message, TurnCancel):
            return self._cancel(message)
        raise BadMessageError(f"unhandled message {type(message).__name__}")  # pragma: no cover

    # ----------------------------------------------------------- session handlers

    def _check_voice(self, voice: str) -> None:
        if self.voices is not None and voice not in self.voices:
            raise UnknownVoiceError(
                f"unknown voice {voice!r}; known: {', '.join(sorted(self.voices))}"
            )

    def _configure(self, message: SessionConfigure) -> list[Command]:
        config = self.config.updated(message)
        self._check_voice(config.voice)
        self.config = config
        self._send(SessionConfigured(config=config))
        return [ConfigureSession(config)]

    def _announce_clone(self, message: VoiceClone) -> list[Command]:
        limits = self.limits
        if message.audio_bytes > limits.max_clone_bytes:
            raise AudioFormatError(
                f"reference audio of {message.audio_bytes} bytes exceeds "
                f"{limits.max_clone_bytes} bytes"
            )
        if message.audio_format == "pcm_s16le":
            if message.sample_rate is None:
                raise BadMessageError("voice.clone with pcm_s16le audio needs sample_rate")
            seconds = message.audio_bytes / 2 / message.sample_rate
            if seconds > limits.max_clone_seconds:
                raise AudioFormatError(
                    f"reference audio of {seconds:.1f} s exceeds {limits.max_clone_seconds} s"
                )
        self._clone = message
        return []

    def voice_cloned(self, request_id: str | None, voice_id: str, duration_s: float) -> None:
        """Report a finished clone: ``voice_id`` becomes usable on this session."""
        if self.closed:
            return
        if self.voices is not None:
            self.voices.add(voice_id)
        self._send(VoiceCloned(request_id=request_id, voice_id=voice_id, duration_s=duration_s))

    # -------------------------------------------------------------- turn handlers

    def _start(self, message: TurnStart) -> list[Command]:
        if len(self._turns) >= self.limits.max_turns:
            raise TooManyTurnsError(
                f"{len(self._turns)} turns are open, the limit is {self.limits.max_turns}"
            )
        turn_id = message.turn_id
        if turn_id is None:
            turn_id = next(
                f"turn-{n}" for n in itertools.count(1) if f"turn-{n}" not in self._used_ids
            )
        elif turn_id in self._used_ids:
            raise DuplicateTurnError(f"turn id {turn_id!r} was already used on this session")
        config = self.config
        if message.voice is not None:
            self._check_voice(message.voice)
            config = config.model_copy(update={"voice": message.voice})
        self._check_text(0, message.text, turn_id)

        turn = Turn(turn_id=turn_id, number=next(self._numbers), config=config)
        self._used_ids.add(turn_id)
        self._turns[turn_id] = turn
        self._send(
            TurnStarted(
                turn_id=turn_id,
                turn_number=turn.number,
                queued=self._active is not None,
                voice=config.voice,
                sample_rate=config.sample_rate,
                sample_format=config.sample_format,
            )
        )
        if message.text:
            turn.pending.append(AppendText(turn_id, message.text, 0))
            turn.chars = len(message.text)
        if message.end:
            turn.pending.append(EndTurn(turn_id))
            turn.input_closed = True
        self._queue.append(turn)
        return self._activate_next()

    def _check_text(self, already: int, text: str, turn_id: str) -> None:
        if already + len(text) > self.limits.max_turn_chars:
            raise MessageTooLargeError(
                f"turn {turn_id!r} would hold {already + len(text)} characters, "
                f"the limit is {self.limits.max_turn_chars}"
            )

    def _open_for_text(self, turn_id: str) -> Turn:
        turn = self.turn(turn_id)
        if turn.phase is TurnPhase.CANCELLED:
            raise TurnClosedError(f"turn {turn_id!r} was cancelled")
        if turn.input_closed:
            raise TurnClosedError(f"turn {turn_id!r} was ended: it takes no more text")
        return turn

    def _append(self, message: TurnAppend) -> list[Command]:
        turn = self._open_for_text(message.turn_id)
        self._check_text(turn.chars, message.text, turn.turn_id)
        if not message.text:
            return []
        command = AppendText(turn.turn_id, message.text, turn.chars)
        turn.chars += len(message.text)
        return self._route(turn, command)

    def _end(self, message: TurnEnd) -> list[Command]:
        turn = self._open_for_text(message.turn_id)
        turn.input_closed = True
        if turn.phase is TurnPhase.ACTIVE:
            turn.phase = TurnPhase.ENDED
        return self._route(turn, EndTurn(turn.turn_id))

    def _cancel(self, message: TurnCancel) -> list[Command]:
        turn = self.turn(message.turn_id)
        if turn.phase is TurnPhase.CANCELLED:
            raise TurnClosedError(f"turn {turn.turn_id!r} is already cancelled")
        # From here on send_audio drops this turn's audio: the ack is the cut-off.
        self._send(TurnCancelled(turn_id=turn.turn_id, sample=turn.samples))
        if turn.phase is TurnPhase.QUEUED:
            self._queue.remove(turn)
            turn.phase = TurnPhase.CANCELLED
            self._finish(turn, "cancelled", TurnMetrics())
            return []
        turn.phase = TurnPhase.CANCELLED
        return [CancelTurn(turn.turn_id)]

    def _route(self, turn: Turn, command: Command) -> list[Command]:
        if turn.phase is TurnPhase.QUEUED:
            turn.pending.append(command)
            return []
        return [command]

    def _activate_next(self) -> list[Command]:
        if self._active is not None or not self._queue or self.closed:
            return []
        turn = self._queue.popleft()
        self._active = turn
        turn.phase = TurnPhase.ENDED if turn.input_closed else TurnPhase.ACTIVE
        commands: list[Command] = [StartTurn(turn.turn_id, turn.number, turn.config)]
        commands += turn.pending
        turn.pending = []
        return commands

    # ----------------------------------------------------------- pipeline output

    def send_audio(self, turn_id: str, pcm: bytes) -> bool:
        """Queue one audio frame of the active turn (PCM in the turn's sample format).

        Returns False, sending nothing, if the turn is cancelled, done or not active:
        once ``turn.cancelled`` is queued no audio of that turn ever follows it.
        """
        turn = self._turns.get(turn_id)
        if self.closed or turn is None or not turn.speaking:
            return False
        width = bytes_per_sample(turn.config.sample_format)
        if len(pcm) % width:
            raise AudioFormatError(
                f"{len(pcm)} bytes are not whole {turn.config.sample_format} samples"
            )
        header = AudioHeader(
            turn_number=turn.number,
            sequence=turn.sequence,
            sample_offset=turn.samples,
            sample_format=SampleFormatCode.of(turn.config.sample_format),
        )
        self._out.append(header.pack() + pcm)
        turn.sequence += 1
        turn.samples += len(pcm) // width
        return True

    def send_mark(
        self, turn_id: str, *, start: int, end: int, text: str, sample: int | None = None
    ) -> bool:
        """Announce that segment ``text`` of the turn starts at output sample ``sample``.

        ``start``/``end`` are the segment's offsets in the turn's text. ``sample`` defaults
        to the turn's current sample offset (the next audio frame); a pipeline that buffers
        audio into fixed-size chunks passes the exact offset, which may fall inside a chunk
        already queued or still to come. Returns False, sending nothing, if the turn is not
        speaking (cancelled, say).
        """
        turn = self._turns.get(turn_id)
        if self.closed or turn is None or not turn.speaking:
            return False
        self._send(
            TurnMark(
                turn_id=turn_id,
                segment=turn.segments,
                sample=turn.samples if sample is None else sample,
                start=start,
                end=end,
                text=text,
            )
        )
        turn.segments += 1
        return True

    def turn_done(
        self,
        turn_id: str,
        *,
        time_to_first_audio_s: float | None = None,
        generation_s: float = 0.0,
        underruns: int = 0,
        error: VoxlaneError | None = None,
    ) -> list[Command]:
        """The pipeline finished the active turn (completed, cancelled, or failed).

        Sends ``error`` (if given) and ``turn.done`` with metrics; audio seconds, sample
        and segment counts come from what was actually sent. Returns the commands of
        the next queued turn, which becomes active.
        """
        turn = self.turn(turn_id)
        if turn is not self._active:
            raise UnknownTurnError(f"turn {turn_id!r} is not the active turn")
        self._active = None
        if self.closed:
            turn.phase = TurnPhase.DONE
            del self._turns[turn_id]
            return []
        if turn.phase is TurnPhase.CANCELLED:
            reason = "cancelled"
        elif error is not None:
            reason = "error"
            self._send_error(error, turn_id=turn_id)
        else:
            reason = "completed"
        audio_s = turn.samples / turn.config.sample_rate
        metrics = TurnMetrics(
            time_to_first_audio_s=time_to_first_audio_s,
            audio_s=audio_s,
            generation_s=generation_s,
            rtf=generation_s / audio_s if audio_s > 0 else None,
            underruns=underruns,
            segments=turn.segments,
            samples=turn.samples,
        )
        self._finish(turn, reason, metrics)
        return self._activate_next()

    def _finish(self, turn: Turn, reason: str, metrics: TurnMetrics) -> None:
        turn.phase = TurnPhase.DONE
        del self._turns[turn.turn_id]
        self._send(TurnDone(turn_id=turn.turn_id, reason=reason, metrics=metrics))

    # ---------------------------------------------------------------- errors, close

    def send_error(
        self, error: VoxlaneError, *, turn_id: str | None = None, request_id: str | None = None
    ) -> None:
        """Send a non-fatal ``error`` caused by the server side (a failed clone, say)."""
        if not self.closed:
            self._send_error(error, turn_id=turn_id, request_id=request_id)

    def fail(self, error: VoxlaneError, code: int = CloseCode.INTERNAL_ERROR) -> list[Command]:
        """Send a fatal ``error`` and close: cancels the active turn, drops the queue."""
        if self.closed:
            return []
        return self._fatal(error, code)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> list[Command]:
        """Close the session (server shutdown: ``GOING_AWAY``) without an error message."""
        if self.closed:
            return []
        return self._shutdown(code, reason)

    def connection_lost(self) -> list[Command]:
        """The socket is gone: returns the cancel of the active turn, if any."""
        if self.closed:
            return []
        commands = self._shutdown(None, "")
        return [c for c in commands if not isinstance(c, CloseConnection)]

    def _client_error(
        self,
        error: ProtocolError | AudioFormatError,
        *,
        turn_id: str | None = None,
        request_id: str | None = None,
    ) -> list[Command]:
        self.errors += 1
        if self.errors > self.limits.max_errors:
            return self._fatal(
                ProtocolError(f"too many protocol errors ({self.errors}); last: {error}"),
                CloseCode.POLICY_VIOLATION,
            )
        self._send_error(error, turn_id=turn_id, request_id=request_id)
        return []

    def _fatal(self, error: VoxlaneError, code: int) -> list[Command]:
        self._send_error(error, fatal=True)
        return self._shutdown(code, str(error)[:120])

    def _shutdown(self, code: int | None, reason: str) -> list[Command]:
        self.closed = True
        self.close_code = code
        self._clone = None
        commands: list[Command] = []
        active = self._active
        if active is not None and active.phase is not TurnPhase.CANCELLED:
            active.phase = TurnPhase.CANCELLED
            commands.append(CancelTurn(active.turn_id))
        for turn in self._queue:
            turn.phase = TurnPhase.DONE
            del self._turns[turn.turn_id]
        self._queue.clear()
        if code is not None:
            commands.append(CloseConnection(int(code), reason))
        return commands

    def _send_error(
        self,
        error: VoxlaneError,
        *,
        turn_id: str | None = None,
        request_id: str | None = None,
        fatal: bool = False,
    ) -> None:
        self._send(
            ErrorMessage(
                code=error.code,
                message=error.message,
                turn_id=turn_id,
                request_id=request_id,
                fatal=fatal,
            )
        )

    def _send(self, message: object) -> None:
        self._out.append(dump_message(message))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Received audio of one turn, in the turn's sample format."""

    turn_id: str
    sequence: int
    sample_offset: int
    sample_format: SampleFormat
    pcm: bytes

    @property
    def num_samples(self) -> int:
        """Samples in ``pcm``."""
        return len(self.pcm) // bytes_per_sample(self.sample_format)


class ClientSession:
    """Client-side decoding of a server's messages.

    Maps audio frames to turn ids (via ``turn.started``) and checks that each turn's
    frames arrive in sequence without gaps; raises :class:`BadMessageError` otherwise.
    """

    def __init__(self) -> None:
        self._turn_ids: dict[int, str] = {}
        self._next: dict[int, tuple[int, int]] = {}  # turn number -> (sequence, sample)
        self.ready: SessionReady | None = None
        """The ``session.ready`` message once received."""

    def receive_text(self, data: str) -> ServerMessage:
        """Parse one text message (raises :class:`UnknownMessageError` for new types)."""
        message = parse_server_message(data)
        if isinstance(message, SessionReady):
            self.ready = message
        elif isinstance(message, TurnStarted):
            self._turn_ids[message.turn_number] = message.turn_id
            self._next[message.turn_number] = (0, 0)
        elif isinstance(message, TurnDone):
            for number, turn_id in list(self._turn_ids.items()):
                if turn_id == message.turn_id:
                    del self._turn_ids[number], self._next[number]
        return message

    def receive_bytes(self, data: bytes) -> AudioChunk:
        """Parse one audio frame of a started turn."""
        frame = AudioFrame.unpack(data)
        header = frame.header
        turn_id = self._turn_ids.get(header.turn_number)
        if turn_id is None:
            raise BadMessageError(f"audio for unknown turn number {header.turn_number}")
        expected = self._next[header.turn_number]
        if (header.sequence, header.sample_offset) != expected:
            raise BadMessageError(
                f"turn {turn_id!r}: frame (sequence, sample_offset) "
                f"{(header.sequence, header.sample_offset)}, expected {expected}"
            )
        self._next[header.turn_number] = (
            header.sequence + 1,
            header.sample_offset + frame.num_samples,
        )
        return AudioChunk(
            turn_id=turn_id,
            sequence=header.sequence,
            sample_offset=header.sample_offset,
            sample_format=header.sample_format.sample_format,
            pcm=frame.pcm,
        )
