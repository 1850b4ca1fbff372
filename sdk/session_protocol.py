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
import math
import re
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from voxlane.errors import (
    AudioFormatError,
    BadMessageError,
    DuplicateTurnError,
    DuplicateVoiceError,
    MessageTooLargeError,
    ProtocolError,
    TooManyTurnsError,
    TurnClosedError,
    UnknownMessageError,
    UnknownTurnError,
    UnknownVoiceError,
    VoxlaneError,
)
from voxlane.protocol import (
    BUILTIN_VOICES,
    MIN_CLONE_SECONDS,
    AgentInfo,
    AgentMessage,
    AgentRespond,
    AgentTextDelta,
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
    TurnPlayback,
    TurnStart,
    TurnStarted,
    VoiceClone,
    VoiceCloned,
    bytes_per_sample,
    decode_message,
    dump_message,
    is_identifier,
    parse_server_message,
    replace_lone_surrogates,
    validate_client_message,
)

__all__ = [
    "AgentOptions",
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
    "StartAgentResponse",
    "StartTurn",
    "Turn",
    "TurnPhase",
    "heard_text",
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
    """Clone a voice from reference audio; answer with ``voice_cloned`` or ``clone_failed``.

    The size, the name and (for ``pcm_s16le``) whole samples are checked; the I/O layer
    decodes ``audio`` and checks its content and duration against
    ``Limits.max_clone_seconds`` (raise :class:`AudioFormatError`). ``name`` stays
    reserved on the session until one of the two answers.
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
class StartAgentResponse:
    """Agent mode: ask the LLM to answer ``messages`` for the active turn ``turn_id``.

    ``messages`` is the dialogue in chat-completions form (system prompt first, the new user
    message last). Stream the answer's deltas into the turn's pipeline and through
    :meth:`ServerSession.send_text_delta`, end the turn's text when the stream ends, then
    call ``turn_done`` as for any turn (with an :class:`~voxlane.errors.LLMError` if the
    upstream failed). A ``CancelTurn`` of the turn must close the upstream request.
    """

    turn_id: str
    messages: tuple[dict[str, str], ...]


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
    | StartAgentResponse
    | CloseConnection
)


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """Agent mode of a :class:`ServerSession`: system prompt and dialogue history limits.

    History keeps user and assistant messages (the system prompt is not counted). When a
    request is built and the history exceeds ``max_history_messages`` messages or
    ``max_history_chars`` characters, the oldest messages are dropped, whole exchanges at a
    time (it always starts with a user message), but never the new user message.
    """

    model: str = ""
    system_prompt: str | None = None
    max_history_messages: int = 32
    max_history_chars: int = 32_000
    words_per_second: float = 2.5
    """Speaking rate assumed to place the cut inside a segment whose audio was still being
    generated when the turn stopped (no measured rate of an earlier segment of the turn)."""

    def __post_init__(self) -> None:
        if self.max_history_messages < 1 or self.max_history_chars < 1:
            raise ValueError("history limits must be at least 1")


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
    marks: list[tuple[int, int, int]] = field(default_factory=list)
    """``(sample, start, end)`` of every mark sent."""
    user_text: str | None = None
    """Agent turns: the user message this turn answers (``None``: a plain turn)."""
    text: str = ""
    """Agent turns: the LLM text received so far."""
    played: int | None = None
    """The client's last ``turn.playback`` position."""

    @property
    def agent(self) -> bool:
        """True for a turn answering ``agent.respond``."""
        return self.user_text is not None

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
        agent: AgentOptions | None = None,
    ) -> None:
        """``voices`` are the voice ids a client may pick (``None``: any, unchecked).

        ``agent`` enables agent mode (``agent.respond``); the session then keeps the
        dialogue history (:attr:`history`)."""
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
        # The next message answers a refused voice.clone: if binary, it is that clone's audio,
        # already answered by the refusal, and is dropped without a second error.
        self._refused_clone = False
        self._builtin_voices = set(BUILTIN_VOICES) | (self.voices or set())
        self._cloned: set[str] = set()  # voice ids cloned on this session
        self._clone_names: set[str] = set()  # names of clones in progress
        self._out: list[str | bytes] = []
        self.agent = agent
        self.history: list[dict[str, str]] = []
        """Agent mode: the dialogue, ``{"role": "user"|"assistant", "content": ...}`` in order
        (without the system prompt)."""
        self._last_agent: _AgentRecord | None = None  # may still be cut by turn.playback
        if self.voices is not None:
            self._check_voice(self.config.voice)
        self._send(
            SessionReady(
                session_id=self.session_id,
                server=server,
                config=self.config,
                limits=self.limits,
                voices=sorted(self.voices) if self.voices is not None else [],
                agent=None
                if agent is None
                else AgentInfo(
                    model=agent.model,
                    max_history_messages=agent.max_history_messages,
                    max_history_chars=agent.max_history_chars,
                ),
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
        self._refused_clone = False  # a refused clone's client sent no audio after all
        if self._clone is not None:
            clone, self._clone = self._clone, None
            self._clone_names.discard(clone.name or "")
            commands += self._client_error(
                BadMessageError("voice.clone must be followed by a binary message"),
                request_id=clone.request_id,
            )
            if self.closed:
                return commands
        try:
            obj = decode_message(data, max_bytes=self.limits.max_message_bytes)
        except MessageTooLargeError as exc:
            return commands + self._fatal(exc, CloseCode.MESSAGE_TOO_BIG)
        except ProtocolError as exc:
            return commands + self._client_error(exc)
        # Errors about a turn or a clone name it, as far as the message says which one.
        turn_id = obj.get("turn_id") if is_identifier(obj.get("turn_id")) else None
        request_id = obj.get("request_id") if is_identifier(obj.get("request_id")) else None
        try:
            commands += self._dispatch(validate_client_message(obj))
        except (ProtocolError, AudioFormatError) as exc:
            # Its client sends the audio right behind the announcement, before it can read
            # the refusal: that binary message is part of the refused request.
            self._refused_clone = obj["type"] == "voice.clone"
            commands += self._client_error(exc, turn_id=turn_id, request_id=request_id)
        return commands

    def receive_bytes(self, data: bytes) -> list[Command]:
        """Handle one binary message: only valid as the audio of a pending ``voice.clone``."""
        if self.closed:
            return []
        clone, self._clone = self._clone, None
        if self._refused_clone:
            self._refused_clone = False
            return []  # the audio of a refused voice.clone: answered already
        if clone is None:
            if len(data) > self.limits.max_message_bytes:
                return self._fatal(
                    MessageTooLargeError(f"binary message of {len(data)} bytes"),
                    CloseCode.MESSAGE_TOO_BIG,
                )
            return self._client_error(BadMessageError("unexpected binary message"))
        if len(data) != clone.audio_bytes:
            self._clone_names.discard(clone.name or "")
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
        if isinstance(message, TurnPlayback):
            return self._playback(message)
        if isinstance(message, AgentRespond):
            return self._respond(message)
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
        name = message.name
        if name is not None and name in self._builtin_voices:
            raise DuplicateVoiceError(
                f"voice.clone: name {name!r} is a built-in voice; pick another name"
            )
        if name is not None and (name in self._cloned or name in self._clone_names):
            raise DuplicateVoiceError(
                f"voice.clone: name {name!r} is already a cloned voice of this session; "
                "clone names are not reused, pick another name"
            )
        if message.audio_bytes > limits.max_clone_bytes:
            raise AudioFormatError(
                f"reference audio of {message.audio_bytes} bytes exceeds "
                f"{limits.max_clone_bytes} bytes"
            )
        if message.audio_format == "pcm_s16le":
            if message.sample_rate is None:
                raise BadMessageError("voice.clone with pcm_s16le audio needs sample_rate")
            if message.audio_bytes % 2:
                raise AudioFormatError(
                    f"pcm_s16le audio of {message.audio_bytes} bytes is not whole 2-byte samples"
                )
            seconds = message.audio_bytes / 2 / message.sample_rate
            if seconds < MIN_CLONE_SECONDS:
                raise AudioFormatError(
                    f"reference audio of {seconds * 1000:.0f} ms is too short; at least "
                    f"{MIN_CLONE_SECONDS:g} s is needed to clone a voice"
                )
            if seconds > limits.max_clone_seconds:
                raise AudioFormatError(
                    f"reference audio of {seconds:.1f} s exceeds {limits.max_clone_seconds} s"
                )
        if name is not None:
            self._clone_names.add(name)
        self._clone = message
        return []

    def voice_cloned(
        self, request_id: str | None, voice_id: str, duration_s: float, *, name: str | None = None
    ) -> None:
        """Report a finished clone: ``voice_id`` becomes usable on this session.

        ``name`` is the ``CloneVoice.name`` of the request (its reservation ends).
        """
        self._clone_names.discard(name or "")
        if self.closed:
            return
        self._cloned.add(voice_id)
        if self.voices is not None:
            self.voices.add(voice_id)
        self._send(VoiceCloned(request_id=request_id, voice_id=voice_id, duration_s=duration_s))

    def clone_failed(self, command: CloneVoice, error: VoxlaneError) -> None:
        """Report a failed clone: sends ``error`` with its request id; its name is free again."""
        self._clone_names.discard(command.name or "")
        self.send_error(error, request_id=command.request_id)

    # -------------------------------------------------------------- turn handlers

    def _start(
        self, message: TurnStart, user_text: str | None = None, leaving: int = 0
    ) -> list[Command]:
        # ``leaving``: open turns just cancelled by a barge-in, which do not count.
        if len(self._turns) - leaving >= self.limits.max_turns:
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
        if user_text is not None:
            self._check_text(0, user_text, turn_id)
            turn.user_text = user_text
            turn.input_closed = True  # its text comes from the LLM, not the client
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
        if turn.user_text is not None:
            commands.append(self._agent_request(turn, turn.user_text))
        return commands

    # ------------------------------------------------------------------ agent mode

    def _respond(self, message: AgentRespond) -> list[Command]:
        if self.agent is None:
            raise UnknownMessageError(
                "agent.respond: agent mode is off on this server (it has no LLM configured)"
            )
        if message.turn_id is not None and message.turn_id in self._used_ids:
            raise DuplicateTurnError(
                f"turn id {message.turn_id!r} was already used on this session"
            )
        # Refuse before interrupting: a message that is refused interrupts nothing.
        self._check_text(0, message.text, message.turn_id or "agent.respond")
        if message.voice is not None:
            self._check_voice(message.voice)
        # Barge-in: a new user message interrupts every answer still open.
        commands: list[Command] = []
        leaving = 0
        for turn in list(self._turns.values()):
            if turn.agent and turn.phase is not TurnPhase.CANCELLED:
                commands += self._cancel(TurnCancel(turn_id=turn.turn_id))
                leaving += turn.turn_id in self._turns  # active: open until its turn_done
        start = TurnStart(turn_id=message.turn_id, voice=message.voice, end=False)
        return commands + self._start(start, user_text=message.text, leaving=leaving)

    def _agent_request(self, turn: Turn, user_text: str) -> StartAgentResponse:
        assert self.agent is not None
        self._last_agent = None  # the previous answer is final once a new one is requested
        self.history.append({"role": "user", "content": user_text})
        self._trim_history()
        messages: list[dict[str, str]] = []
        if self.agent.system_prompt:
            messages.append({"role": "system", "content": self.agent.system_prompt})
        messages += (dict(m) for m in self.history)
        return StartAgentResponse(turn.turn_id, tuple(messages))

    def _trim_history(self) -> None:
        assert self.agent is not None
        limit_n, limit_chars = self.agent.max_history_messages, self.agent.max_history_chars
        history = self.history

        def over() -> bool:
            chars = sum(len(m["content"]) for m in history)
            return len(history) > limit_n or chars > limit_chars

        while len(history) > 1 and over():
            del history[0]
            # An answer without its question goes too: history starts with a user message.
            while len(history) > 1 and history[0]["role"] != "user":
                del history[0]

    def send_text_delta(self, turn_id: str, text: str) -> bool:
        """Agent mode: forward LLM text of the active agent turn (``agent.text_delta``).

        Returns False, sending nothing, if the turn is not speaking (cancelled, say): text
        that arrives after ``turn.cancelled`` is neither sent nor kept. Lone surrogates (an
        LLM's ``"\\ud800"`` escape) are sent and kept as U+FFFD: they cannot travel as JSON.
        """
        turn = self._turns.get(turn_id)
        if self.closed or turn is None or not turn.speaking or not turn.agent or not text:
            return False
        text = replace_lone_surrogates(text)
        self._send(AgentTextDelta(turn_id=turn_id, text=text, offset=len(turn.text)))
        turn.text += text
        return True

    def _playback(self, message: TurnPlayback) -> list[Command]:
        turn = self._turns.get(message.turn_id)
        if turn is not None:
            turn.played = message.sample
            return []
        record = self._last_agent
        if record is None or record.turn_id != message.turn_id:
            raise UnknownTurnError(
                f"turn {message.turn_id!r} is neither open nor the last agent turn"
            )
        if message.sample < record.heard:
            record.heard = message.sample
            self._record_answer(record)
        return []

    def _agent_finished(self, turn: Turn, reason: str) -> None:
        """Keep what was heard of the answer in the history (and tell the client)."""
        assert self.agent is not None
        heard = turn.samples if turn.played is None else min(turn.played, turn.samples)
        record = _AgentRecord(
            turn_id=turn.turn_id,
            text=turn.text,
            marks=list(turn.marks),
            # A failed turn still spoke all it had (an upstream error ends the text): only a
            # cancel leaves the last segment's end unknown.
            total=None if reason == "cancelled" else turn.samples,
            sample_rate=turn.config.sample_rate,
            heard=heard,
        )
        self._last_agent = record
        self._record_answer(record)

    def _record_answer(self, record: _AgentRecord) -> None:
        assert self.agent is not None
        text = heard_text(
            record.text,
            record.marks,
            heard=record.heard,
            total=record.total,
            samples_per_word=record.sample_rate / self.agent.words_per_second,
        )
        if record.entry is not None:
            if record.entry in self.history:
                self.history.remove(record.entry)
            record.entry = None
        if text:
            record.entry = {"role": "assistant", "content": text}
            self.history.append(record.entry)
        self._send(
            AgentMessage(
                turn_id=record.turn_id,
                text=text,
                truncated=text != record.text.strip(),
                sample=record.heard,
            )
        )

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
        turn.marks.append((turn.samples if sample is None else sample, start, end))
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
        if turn.agent:
            self._agent_finished(turn, reason)
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


# ------------------------------------------------------------------ agent truncation


@dataclass(eq=False)
class _AgentRecord:
    """The last finished agent turn: enough to cut its history entry again."""

    turn_id: str
    text: str
    marks: list[tuple[int, int, int]]
    total: int | None
    sample_rate: int
    heard: int
    entry: dict[str, str] | None = None


_WORD_RUN = re.compile(r"\S+")


def heard_text(
    text: str,
    marks: Sequence[tuple[int, int, int]],
    *,
    heard: int,
    total: int | None,
    samples_per_word: float,
) -> str:
    """The part of an answer a listener heard after ``heard`` samples of its audio.

    ``text`` is the turn's text; ``marks`` are ``(sample, start, end)`` per segment in order
    (``turn.mark``: the segment ``text[start:end]`` starts at output sample ``sample``);
    ``total`` is the sample count of the whole turn when its audio is complete, ``None``
    when it stopped early (cancelled).

    The rule (docs/agent.md): segments whose audio started before ``heard`` count; each is
    kept whole if its audio ended by ``heard``, otherwise it is cut by words, in proportion
    to how much of its audio was heard, rounding down (a word half heard is not kept). A
    segment's audio ends where the next one starts, or at ``total``; for the last segment
    of an interrupted turn that end is unknown, so its duration is estimated from
    ``samples_per_word`` (or, better, from the segments of the turn heard completely). Text
    never marked (still buffered when the turn stopped) was not heard. The result keeps the
    raw text (markdown included), stripped of surrounding whitespace.
    """
    kept = 0
    measured_words = 0
    measured_samples = 0
    for i, (sample, start, end) in enumerate(marks):
        if sample >= heard:
            break
        words = list(_WORD_RUN.finditer(text, start, end))
        next_sample = marks[i + 1][0] if i + 1 < len(marks) else total
        if next_sample is not None and heard >= next_sample:
            kept = end
            measured_words += len(words)
            measured_samples += next_sample - sample
            continue
        if next_sample is not None:
            fraction = (heard - sample) / max(1, next_sample - sample)
            n = math.floor(fraction * len(words))
        else:
            per_word = samples_per_word
            if measured_words and measured_samples:
                per_word = measured_samples / measured_words
            n = min(len(words), math.floor((heard - sample) / per_word))
        kept = words[n - 1].end() if n > 0 else start
        break
    return text[:kept].strip()


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
