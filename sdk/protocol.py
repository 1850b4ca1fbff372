"""Protocol v1 of the voxlane WebSocket API: message models and the audio frame header.

Shared by the server and the client SDK. Pure pydantic v2 plus :mod:`struct`; importing
it never pulls in torch or numpy. ``docs/protocol.md`` is the prose description of the
same protocol; this module is the executable one.

Two kinds of WebSocket messages travel:

* **text** messages are JSON objects with a ``type`` field. Client to server:
  :data:`ClientMessage`; server to client: :data:`ServerMessage`.
* **binary** messages from the server are audio: a 20-byte :class:`AudioHeader` followed
  by PCM samples. The only binary message a client sends is the reference audio that
  follows a ``voice.clone`` message.

Parsing goes through :func:`parse_client_message` / :func:`parse_server_message`, which
turn every failure into a typed :class:`~voxlane.errors.ProtocolError` whose ``code``
travels back in an ``error`` message.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from voxlane.errors import (
    BadMessageError,
    MessageTooLargeError,
    OutOfRangeError,
    UnknownMessageError,
)

__all__ = [
    "AUDIO_HEADER_SIZE",
    "BUILTIN_VOICES",
    "EMOTION_TAGS",
    "MAX_JSON_DEPTH",
    "MIN_CLONE_SECONDS",
    "PROTOCOL_VERSION",
    "AgentInfo",
    "AgentMessage",
    "AgentRespond",
    "AgentTextDelta",
    "AudioFrame",
    "AudioHeader",
    "ClientMessage",
    "CloseCode",
    "ErrorMessage",
    "Limits",
    "SampleFormat",
    "SampleFormatCode",
    "SamplingParams",
    "ServerMessage",
    "SessionConfig",
    "SessionConfigure",
    "SessionConfigured",
    "SessionReady",
    "TurnAppend",
    "TurnCancel",
    "TurnCancelled",
    "TurnDone",
    "TurnEnd",
    "TurnFlush",
    "TurnMark",
    "TurnMetrics",
    "TurnPlayback",
    "TurnStart",
    "TurnStarted",
    "VoiceClone",
    "VoiceCloned",
    "bytes_per_sample",
    "decode_message",
    "dump_message",
    "is_identifier",
    "parse_client_message",
    "parse_server_message",
    "replace_lone_surrogates",
    "validate_client_message",
]

PROTOCOL_VERSION = 1

#: The eight built-in voices of the fine-tuned Orpheus checkpoint.
BUILTIN_VOICES: tuple[str, ...] = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")

#: Orpheus emotion tags: kept in spoken text, the speech LM renders them as sounds.
EMOTION_TAGS: tuple[str, ...] = (
    "laugh",
    "sigh",
    "chuckle",
    "cough",
    "sniffle",
    "groan",
    "yawn",
    "gasp",
)

# ---------------------------------------------------------------------------- bounds
# One definition per bound, used by every model that carries the field.

SampleFormat = Literal["pcm_s16le", "pcm_f32le"]
SampleRate = Literal[8000, 16000, 24000, 48000]
ChunkMs = Annotated[int, Field(ge=20, le=80, description="Audio chunk length in ms.")]
Temperature = Annotated[float, Field(gt=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(ge=1.0, le=2.0)]
MaxFrames = Annotated[int, Field(ge=1, le=2048, description="Frames of 2,048 samples at 24 kHz.")]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
ContextWindow = Annotated[int, Field(ge=0, le=8)]
_IDENTIFIER = r"^[A-Za-z0-9_.:\-]{1,64}$"
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=_IDENTIFIER)]
VoiceId = Identifier

#: Shortest reference audio ``voice.clone`` accepts (a voice cannot be heard in less).
MIN_CLONE_SECONDS = 1.0

#: Deepest nesting of arrays and objects a message may have (v1 messages need 2).
MAX_JSON_DEPTH = 32


def is_identifier(value: object) -> bool:
    """True if ``value`` is a valid identifier (turn id, request id, voice id, clone name)."""
    return isinstance(value, str) and re.fullmatch(_IDENTIFIER, value) is not None


def bytes_per_sample(sample_format: SampleFormat) -> int:
    """Bytes per (mono) sample of a wire sample format: 2 for s16le, 4 for f32le."""
    return 2 if sample_format == "pcm_s16le" else 4


# ---------------------------------------------------------------------------- models


class _Model(BaseModel):
    # strict: "0.5" is not a float and 1.0 is not an int; forbid: a typo ("temprature")
    # is an error rather than a silently ignored field.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class SamplingParams(_Model):
    """Sampling of the speech LM. Defaults follow the Orpheus reference settings."""

    temperature: Temperature = 0.6
    top_p: TopP = 0.8
    repetition_penalty: RepetitionPenalty = 1.3
    max_frames: MaxFrames = 512
    """Upper bound of audio frames per text segment (512 frames = 43.7 s)."""
    seed: Seed | None = None
    """Fixed seed for reproducible audio; ``None`` draws a fresh one per segment."""


class SessionConfig(_Model):
    """The configuration of one session. Every field has a default.

    A turn takes a snapshot of the configuration when it is started; reconfiguring
    the session affects turns started afterwards.
    """

    voice: VoiceId = "tara"
    chunk_ms: ChunkMs = 40
    sample_rate: SampleRate = 24000
    """Output rate in Hz; the model's 24 kHz audio is resampled to it."""
    sample_format: SampleFormat = "pcm_s16le"
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    context_window: ContextWindow = 1
    """Previous segments of the same turn (text and audio tokens) kept as speech-LM
    context so prosody and voice carry over; 0 makes every segment stand alone."""

    @property
    def chunk_samples(self) -> int:
        """Samples per audio chunk at the output rate."""
        return self.sample_rate * self.chunk_ms // 1000

    def updated(self, update: SessionConfigure) -> SessionConfig:
        """Return this configuration with the fields set in ``update`` replaced.

        ``sampling`` merges field by field, so ``{"sampling": {"seed": 7}}`` keeps the
        other sampling parameters.
        """
        data = self.model_dump()
        for key, value in update.model_dump(exclude_unset=True, exclude={"type"}).items():
            if key == "sampling" and value is not None:
                # An explicit null seed means "random again"; other nulls mean "keep".
                value = {k: v for k, v in value.items() if v is not None or k == "seed"}
                data["sampling"] = {**data["sampling"], **value}
            elif value is not None:
                data[key] = value
        return SessionConfig.model_validate(data)


class Limits(_Model):
    """Server limits announced in ``session.ready``; the session core enforces them."""

    max_message_bytes: int = Field(256 * 1024, ge=1024)
    """Largest text message accepted; a larger one closes the connection (1009)."""
    max_turn_chars: int = Field(20_000, ge=1)
    """Characters of text one turn may receive in total."""
    max_turns: int = Field(8, ge=1)
    """Open (queued plus active) turns per session."""
    max_clone_bytes: int = Field(4 * 1024 * 1024, ge=1)
    """Size of the reference audio of ``voice.clone``."""
    max_clone_seconds: float = Field(30.0, gt=0)
    """Duration of the reference audio of ``voice.clone``."""
    max_errors: int = Field(32, ge=1)
    """Protocol errors tolerated before the session is closed with 1008."""


# ----------------------------------------------------------------- client -> server


class _SamplingUpdate(_Model):
    temperature: Temperature | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_frames: MaxFrames | None = None
    seed: Seed | None = None


class SessionConfigure(_Model):
    """Change the session configuration; fields left out keep their value.

    Answered by ``session.configured`` with the whole configuration.
    """

    type: Literal["session.configure"] = "session.configure"
    voice: VoiceId | None = None
    chunk_ms: ChunkMs | None = None
    sample_rate: SampleRate | None = None
    sample_format: SampleFormat | None = None
    sampling: _SamplingUpdate | None = None
    context_window: ContextWindow | None = None


class VoiceClone(_Model):
    """Announce a reference recording; the next message must be binary: the audio.

    ``audio_bytes`` is the exact length of that binary message. ``wav`` is any WAV the
    server can read; ``pcm_s16le`` needs ``sample_rate``. Answered by ``voice.cloned``.
    """

    type: Literal["voice.clone"] = "voice.clone"
    request_id: Identifier | None = None
    name: Identifier | None = None
    """Preferred voice id; the server may pick another and says so in ``voice.cloned``."""
    transcript: str = Field(min_length=1, max_length=2000)
    """What is said in the reference audio, word for word."""
    audio_format: Literal["wav", "pcm_s16le"] = "wav"
    sample_rate: int | None = Field(None, ge=8000, le=48000)
    audio_bytes: int = Field(ge=1)


class TurnStart(_Model):
    """Open a turn. Turns run one at a time in the order they were started.

    ``turn_id`` defaults to one the server picks (``turn.started`` names it). A turn
    may carry its first text and be ended at once (``end``), which makes one-shot
    synthesis a single message. ``voice`` overrides the session voice for this turn.
    """

    type: Literal["turn.start"] = "turn.start"
    turn_id: Identifier | None = None
    text: str = ""
    end: bool = False
    voice: VoiceId | None = None


class TurnAppend(_Model):
    """Append text (a delta of an LLM stream, say) to an open turn."""

    type: Literal["turn.append"] = "turn.append"
    turn_id: Identifier
    text: str


class TurnFlush(_Model):
    """Speak the buffered text of a turn now, without waiting for a sentence end."""

    type: Literal["turn.flush"] = "turn.flush"
    turn_id: Identifier


class TurnEnd(_Model):
    """No more text for this turn: speak what is left, then send ``turn.done``."""

    type: Literal["turn.end"] = "turn.end"
    turn_id: Identifier


class TurnCancel(_Model):
    """Stop a turn. After ``turn.cancelled`` no audio of the turn arrives."""

    type: Literal["turn.cancel"] = "turn.cancel"
    turn_id: Identifier


class TurnPlayback(_Model):
    """How far the client has played a turn: ``sample`` samples of it were heard.

    Agent mode uses it to keep only what was heard of an interrupted answer in the
    dialogue history. Valid for an open turn and for the last finished agent turn (send it
    right after stopping playback, before the next ``agent.respond``).
    """

    type: Literal["turn.playback"] = "turn.playback"
    turn_id: Identifier
    sample: int = Field(ge=0)


class AgentRespond(_Model):
    """Agent mode: add a user message to the session's dialogue and speak the LLM's answer.

    Opens a turn (``turn.started`` names it) whose text comes from the server's LLM; its
    text arrives as ``agent.text_delta`` events. Barge-in: every agent turn still open on
    the session is cancelled first (``turn.cancelled``), as if the client had cancelled it.
    """

    type: Literal["agent.respond"] = "agent.respond"
    turn_id: Identifier | None = None
    text: str = Field(min_length=1)
    """The user's message."""
    voice: VoiceId | None = None


ClientMessage = Annotated[
    Union[  # noqa: UP007
        SessionConfigure,
        VoiceClone,
        TurnStart,
        TurnAppend,
        TurnFlush,
        TurnEnd,
        TurnCancel,
        TurnPlayback,
        AgentRespond,
    ],
    Field(discriminator="type"),
]
"""Any text message a client sends."""


# ----------------------------------------------------------------- server -> client


class _ServerModel(BaseModel):
    # Clients ignore fields they do not know, so servers can add fields within v1.
    model_config = ConfigDict(extra="ignore", frozen=True)


class AgentInfo(_ServerModel):
    """Agent mode of a server (``session.ready.agent``; ``None`` when it is off)."""

    model: str
    """The upstream LLM's model name."""
    max_history_messages: int
    """User and assistant messages kept in the dialogue history (oldest dropped first)."""
    max_history_chars: int
    """Characters of message text kept in the dialogue history."""


class SessionReady(_ServerModel):
    """First message of every session: protocol version, defaults and limits."""

    type: Literal["session.ready"] = "session.ready"
    protocol: int = PROTOCOL_VERSION
    session_id: str
    server: str = ""
    config: SessionConfig
    limits: Limits
    voices: list[str] = Field(default_factory=lambda: list(BUILTIN_VOICES))
    agent: AgentInfo | None = None
    """Set when the server can answer ``agent.respond`` (it has an upstream LLM)."""


class SessionConfigured(_ServerModel):
    """The whole configuration after a ``session.configure``."""

    type: Literal["session.configured"] = "session.configured"
    config: SessionConfig


class VoiceCloned(_ServerModel):
    """A cloned voice is ready: use ``voice_id`` in ``session.configure`` or ``turn.start``."""

    type: Literal["voice.cloned"] = "voice.cloned"
    request_id: str | None = None
    voice_id: str
    duration_s: float


class TurnStarted(_ServerModel):
    """The turn was accepted (it may still be queued behind earlier turns).

    ``turn_number`` is the number in the header of this turn's audio frames.
    """

    type: Literal["turn.started"] = "turn.started"
    turn_id: str
    turn_number: int
    queued: bool
    """True if earlier turns are still open: this one speaks after them."""
    voice: str
    sample_rate: int
    sample_format: SampleFormat


class TurnMark(_ServerModel):
    """A text segment starts at output sample ``sample`` of its turn.

    ``start``/``end`` are offsets (Unicode code points) into the turn's text as the
    client sent it (all ``text`` fields of the turn concatenated); ``text`` is the
    cleaned text that is spoken. Marks precede the segment's first audio frame.
    """

    type: Literal["turn.mark"] = "turn.mark"
    turn_id: str
    segment: int
    sample: int
    start: int
    end: int
    text: str


class TurnCancelled(_ServerModel):
    """Acknowledges ``turn.cancel``: no audio of the turn follows this message.

    ``sample`` is the number of samples of the turn sent before the acknowledgement.
    """

    type: Literal["turn.cancelled"] = "turn.cancelled"
    turn_id: str
    sample: int


class TurnMetrics(_ServerModel):
    """Measurements of one turn."""

    time_to_first_audio_s: float | None = None
    """From the turn's first text reaching the speech pipeline (the first text once the turn
    is active, or the moment a queued turn with text becomes active) to its first audio
    frame; ``None`` without audio."""
    audio_s: float = 0.0
    """Seconds of audio sent."""
    generation_s: float = 0.0
    """Seconds spent generating (speech LM plus codec)."""
    rtf: float | None = None
    """Real-time factor ``generation_s / audio_s``; below 1 is faster than real time."""
    underruns: int = 0
    """Times the audio stream ran dry after it started (the server fell behind)."""
    segments: int = 0
    samples: int = 0


class TurnDone(_ServerModel):
    """Last message of a turn. ``reason`` is ``completed``, ``cancelled`` or ``error``."""

    type: Literal["turn.done"] = "turn.done"
    turn_id: str
    reason: Literal["completed", "cancelled", "error"]
    metrics: TurnMetrics


class AgentTextDelta(_ServerModel):
    """Text of an agent turn as the LLM streams it; ``offset`` is where ``text`` starts in
    the turn's text (the offsets ``turn.mark`` uses)."""

    type: Literal["agent.text_delta"] = "agent.text_delta"
    turn_id: str
    text: str
    offset: int


class AgentMessage(_ServerModel):
    """The assistant message an agent turn left in the dialogue history.

    Sent before the turn's ``turn.done``, and again if a later ``turn.playback`` cuts it
    further. ``text`` is what was heard (empty: nothing was, and no message was kept);
    ``truncated`` says that it is shorter than what the LLM generated; ``sample`` is the
    playback position the cut is based on.
    """

    type: Literal["agent.message"] = "agent.message"
    turn_id: str
    role: Literal["assistant"] = "assistant"
    text: str
    truncated: bool
    sample: int


class ErrorMessage(_ServerModel):
    """A typed error. ``code`` maps to a class with :func:`voxlane.errors.error_class_for_code`.

    ``fatal`` errors are followed by the server closing the connection.
    """

    type: Literal["error"] = "error"
    code: str
    message: str
    turn_id: str | None = None
    request_id: str | None = None
    fatal: bool = False


ServerMessage = Annotated[
    Union[  # noqa: UP007
        SessionReady,
        SessionConfigured,
        VoiceCloned,
        TurnStarted,
        TurnMark,
        TurnCancelled,
        TurnDone,
        AgentTextDelta,
        AgentMessage,
        ErrorMessage,
    ],
    Field(discriminator="type"),
]
"""Any text message a server sends."""


class CloseCode(IntEnum):
    """WebSocket close codes used by protocol v1."""

    NORMAL = 1000
    GOING_AWAY = 1001
    """The server shuts down."""
    POLICY_VIOLATION = 1008
    """Too many protocol errors (``Limits.max_errors``)."""
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SLOW_CONSUMER = 4008
    """The client stopped reading audio for the server's send timeout."""
    UNAUTHORIZED = 4401
    """Missing or wrong API key."""


# ---------------------------------------------------------------------------- parsing

_CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientMessage)
_SERVER_ADAPTER: TypeAdapter[Any] = TypeAdapter(ServerMessage)

# pydantic error types that mean "a value outside its bounds" rather than "wrong shape".
_RANGE_ERRORS = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "string_too_short",
        "string_too_long",
        "string_pattern_mismatch",
        "literal_error",
        "too_short",
        "too_long",
    }
)


def _describe(err: Any) -> str:
    # The first location part is the union tag (the message type): already named.
    loc = ".".join(str(part) for part in err["loc"][1:])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


# A UTF-16 surrogate code point on its own: JSON's "\\ud800" escape without its pair decodes to
# one. It is not text (it cannot be encoded as UTF-8), so no field may carry it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """``text`` with every lone UTF-16 surrogate replaced by U+FFFD (one code point for one,
    so offsets into the text still hold). For text from elsewhere than a client (an
    upstream LLM, say), which must still be sent as JSON and tokenized."""
    return text if text.isascii() else _LONE_SURROGATE.sub("\ufffd", text)


def _check_values(obj: object) -> None:
    # Iterative, so a deep structure costs no Python stack.
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                raise BadMessageError(
                    "message holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                    "without its pair): not valid text"
                )
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise BadMessageError(
                    f"message nests arrays or objects deeper than {MAX_JSON_DEPTH} levels"
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                stack.append((key, depth + 1))
                stack.append((item, depth + 1))


def decode_message(data: str | bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The JSON object of one text message, before its fields are validated.

    Raises :class:`MessageTooLargeError` (over ``max_bytes``) or :class:`BadMessageError`:
    not JSON (or too deep for the decoder), not an object, no string ``type``.
    """
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if max_bytes is not None and size > max_bytes:
        raise MessageTooLargeError(f"message of {size} bytes exceeds the limit of {max_bytes}")
    try:
        obj = json.loads(data)
    except RecursionError:
        # The C decoder recurses once per level; how deep it gets depends on the stack.
        raise BadMessageError(
            f"message nests arrays or objects deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessageError(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadMessageError("message must be a JSON object")
    if not isinstance(obj.get("type"), str):
        raise BadMessageError("message has no string 'type' field")
    return obj


def _validate(adapter: TypeAdapter[Any], obj: dict[str, Any]) -> Any:
    kind = obj["type"]
    _check_values(obj)
    try:
        # Python-mode validation of the decoded object: the same strictness for every
        # field, and JSON numbers arrive as int or float exactly as written.
        return adapter.validate_python(obj)
    except ValidationError as exc:
        errors = exc.errors()
        if any(e["type"] == "union_tag_invalid" for e in errors):
            raise UnknownMessageError(f"unknown message type {kind!r}") from None
        detail = "; ".join(_describe(e) for e in errors[:3])
        if all(e["type"] in _RANGE_ERRORS for e in errors):
            raise OutOfRangeError(f"{kind}: {detail}") from None
        raise BadMessageError(f"{kind}: {detail}") from None


def validate_client_message(obj: dict[str, Any]) -> ClientMessage:
    """Validate an object from :func:`decode_message` as a client message.

    Raises :class:`BadMessageError` (also for nesting deeper than :data:`MAX_JSON_DEPTH`
    and for strings that hold a lone surrogate), :class:`UnknownMessageError` or
    :class:`OutOfRangeError`, as :func:`parse_client_message` does.
    """
    return _validate(_CLIENT_ADAPTER, obj)


def parse_client_message(data: str | bytes, *, max_bytes: int | None = None) -> ClientMessage:
    """Parse one text message from a client.

    Raises :class:`MessageTooLargeError` (over ``max_bytes``), :class:`BadMessageError`
    (not JSON, missing or mistyped fields, unknown fields, nested deeper than
    :data:`MAX_JSON_DEPTH`, a string holding a lone UTF-16 surrogate), :class:`UnknownMessageError`
    (a ``type`` outside protocol v1) or :class:`OutOfRangeError` (a value outside its
    bounds).
    """
    return validate_client_message(decode_message(data, max_bytes=max_bytes))


def parse_server_message(data: str | bytes) -> ServerMessage:
    """Parse one text message from a server; errors as :func:`parse_client_message`.

    A client may skip :class:`UnknownMessageError`: newer servers can add message types.
    """
    return _validate(_SERVER_ADAPTER, decode_message(data))


def dump_message(message: BaseModel) -> str:
    """Serialise a message model to the compact JSON text sent on the wire.

    Unset optional fields are sent as ``null`` so every message is self-describing.
    """
    return message.model_dump_json()


# ----------------------------------------------------------------------- audio frames


class SampleFormatCode(IntEnum):
    """Sample format codes in the audio header."""

    PCM_S16LE = 1
    PCM_F32LE = 2

    @classmethod
    def of(cls, sample_format: SampleFormat) -> SampleFormatCode:
        """The code of a wire sample format name."""
        return cls.PCM_S16LE if sample_format == "pcm_s16le" else cls.PCM_F32LE

    @property
    def sample_format(self) -> SampleFormat:
        """The wire name (``pcm_s16le`` / ``pcm_f32le``)."""
        return "pcm_s16le" if self is SampleFormatCode.PCM_S16LE else "pcm_f32le"


_HEADER = struct.Struct("<BBHIIQ")
AUDIO_HEADER_SIZE = _HEADER.size  # 20


@dataclass(frozen=True, slots=True)
class AudioHeader:
    """The 20-byte little-endian header that starts every binary audio message::

        offset  size  type  field
        0       1     u8    version        1 (PROTOCOL_VERSION)
        1       1     u8    sample_format  1 = pcm_s16le, 2 = pcm_f32le
        2       2     u16   header_size    20; the payload starts here
        4       4     u32   turn_number    from turn.started
        8       4     u32   sequence       0, 1, 2, ... per turn, no gaps
        12      8     u64   sample_offset  index of the first payload sample in the turn
        20      ...         payload        mono PCM, little-endian

    ``header_size`` lets a later version append fields that v1 readers skip. 20 bytes
    keep a ``pcm_f32le`` payload 4-byte aligned. The sample offset is what ``turn.mark``
    refers to; the sequence number makes a lost or reordered frame obvious.
    """

    turn_number: int
    sequence: int
    sample_offset: int
    sample_format: SampleFormatCode = SampleFormatCode.PCM_S16LE
    version: int = PROTOCOL_VERSION

    SIZE: ClassVar[int] = AUDIO_HEADER_SIZE

    def pack(self) -> bytes:
        """The 20 header bytes."""
        try:
            return _HEADER.pack(
                self.version,
                int(self.sample_format),
                AUDIO_HEADER_SIZE,
                self.turn_number,
                self.sequence,
                self.sample_offset,
            )
        except struct.error as exc:
            raise OutOfRangeError(f"audio header field out of range: {exc}") from None

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> tuple[AudioHeader, int]:
        """Read a header; returns it and the offset of the payload.

        Raises :class:`BadMessageError` for a short message, an unknown version or
        sample format.
        """
        if len(data) < AUDIO_HEADER_SIZE:
            raise BadMessageError(f"audio message of {len(data)} bytes is shorter than a header")
        version, fmt, size, turn, seq, offset = _HEADER.unpack_from(data)
        if version != PROTOCOL_VERSION:
            raise BadMessageError(f"audio header version {version}, expected {PROTOCOL_VERSION}")
        if size < AUDIO_HEADER_SIZE or size > len(data):
            raise BadMessageError(f"audio header size {size} is invalid")
        try:
            code = SampleFormatCode(fmt)
        except ValueError:
            raise BadMessageError(f"unknown sample format code {fmt}") from None
        return cls(turn, seq, offset, code, version), size


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One binary audio message: header plus PCM payload."""

    header: AudioHeader
    pcm: bytes

    @property
    def num_samples(self) -> int:
        """Samples in the payload."""
        return len(self.pcm) // bytes_per_sample(self.header.sample_format.sample_format)

    def pack(self) -> bytes:
        """The whole binary message."""
        return self.header.pack() + self.pcm

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> AudioFrame:
        """Parse a binary message; raises :class:`BadMessageError` if malformed."""
        header, start = AudioHeader.unpack(data)
        pcm = bytes(data[start:])
        if len(pcm) % bytes_per_sample(header.sample_format.sample_format):
            raise BadMessageError(f"audio payload of {len(pcm)} bytes is not whole samples")
        return cls(header, pcm)
