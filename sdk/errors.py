"""Exceptions raised by voxlane.

Every exception carries a stable string ``code``. The same codes travel in the
``error`` messages of the WebSocket protocol, so a client can map a server error
back onto the class the server raised. ``ConnectionClosedError`` and its subclass are raised
by the client SDK itself and never travel on the wire.

Exception tree::

    VoxlaneError                      code
     ├── InvalidTokenError            invalid_token      a token is not legal at its place
     ├── AudioFormatError             bad_audio          reference audio unreadable or over limits
     ├── ModelNotFoundError           model_not_found    a checkpoint could not be located
     ├── ModelFormatError             bad_model          a checkpoint is not the model needed
     ├── EngineError                  engine_error       the speech LM failed on a request
     │    └── ContextOverflowError    context_overflow   a segment cannot fit the context window
     ├── OverloadedError              overloaded         no capacity for one more real-time stream
     ├── ShuttingDownError            shutting_down      the server drains: turn not started or cut
     ├── LLMError                     llm_error          the upstream LLM failed (agent mode)
     ├── ConnectionClosedError        connection_closed  the connection closed or never opened
     │    └── AuthenticationError     unauthorized       the server refused the API key
     └── ProtocolError                protocol_error     a message breaks protocol v1
          ├── BadMessageError         bad_message        not JSON, or fields of the wrong type
          ├── UnknownMessageError     unknown_type       a message type the server does not know
          ├── MessageTooLargeError    message_too_large  over the configured size limit
          ├── OutOfRangeError         out_of_range       a parameter is outside its bounds
          ├── UnknownTurnError        unknown_turn       a turn id that is not open on this session
          ├── DuplicateTurnError      duplicate_turn     a turn id already used on this session
          ├── DuplicateVoiceError     duplicate_voice    a clone name that is already a voice
          ├── TooManyTurnsError       too_many_turns     over the cap of open turns
          ├── TurnClosedError         turn_closed        a turn already ended or cancelled
          └── UnknownVoiceError       unknown_voice      a voice id the server does not have
"""

from __future__ import annotations

__all__ = [
    "AudioFormatError",
    "AuthenticationError",
    "BadMessageError",
    "ConnectionClosedError",
    "ContextOverflowError",
    "DuplicateTurnError",
    "DuplicateVoiceError",
    "EngineError",
    "InvalidTokenError",
    "LLMError",
    "MessageTooLargeError",
    "ModelFormatError",
    "ModelNotFoundError",
    "OutOfRangeError",
    "OverloadedError",
    "ProtocolError",
    "ShuttingDownError",
    "TooManyTurnsError",
    "TurnClosedError",
    "UnknownMessageError",
    "UnknownTurnError",
    "UnknownVoiceError",
    "VoxlaneError",
    "error_class_for_code",
]


class VoxlaneError(Exception):
    """Base class of every voxlane error; ``code`` names it on the wire."""

    code: str = "internal_error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable explanation."""
        return str(self)


class InvalidTokenError(VoxlaneError, ValueError):
    """A token id is out of range, or an audio token sits at the wrong frame position."""

    code = "invalid_token"


class AudioFormatError(VoxlaneError, ValueError):
    """Audio could not be decoded, or breaks a limit (duration, size, channels)."""

    code = "bad_audio"


class ModelNotFoundError(VoxlaneError, FileNotFoundError):
    """A model id or directory could not be resolved to a checkpoint."""

    code = "model_not_found"


class ModelFormatError(VoxlaneError, ValueError):
    """A checkpoint was found but is not the expected model (architecture, vocabulary, files)."""

    code = "bad_model"


class EngineError(VoxlaneError, RuntimeError):
    """The speech LM engine failed while serving one request."""

    code = "engine_error"


class ContextOverflowError(EngineError):
    """A segment (prompt plus its maximum audio) cannot fit the context window."""

    code = "context_overflow"


class OverloadedError(VoxlaneError, RuntimeError):
    """The server's measured capacity cannot keep one more stream real time; retry later."""

    code = "overloaded"


class ShuttingDownError(VoxlaneError, RuntimeError):
    """The server is draining before it shuts down: the turn was not started, or it was still
    speaking when the drain timeout ran out. Reconnect (to another instance) and retry."""

    code = "shutting_down"


class LLMError(VoxlaneError, RuntimeError):
    """The upstream chat-completions endpoint of agent mode failed: refused, HTTP error,
    timeout, malformed stream or dropped connection. The session survives it."""

    code = "llm_error"


class ConnectionClosedError(VoxlaneError, ConnectionError):
    """The client's connection is closed, was refused, or could not be opened.

    Raised by the client SDK, never sent on the wire. ``close_code`` is the WebSocket close
    code (``None`` if the connection never opened or dropped without a close frame) and
    ``reason`` the close reason. If a fatal server ``error`` preceded the close, it is the
    ``__cause__``.
    """

    code = "connection_closed"

    def __init__(
        self, message: str = "", *, close_code: int | None = None, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason


class AuthenticationError(ConnectionClosedError, PermissionError):
    """The server refused the API key (HTTP 401 at the handshake, or close code 4401)."""

    code = "unauthorized"


class ProtocolError(VoxlaneError):
    """A message breaks protocol v1."""

    code = "protocol_error"


class BadMessageError(ProtocolError):
    """The message is not valid JSON, or a field has the wrong type."""

    code = "bad_message"


class UnknownMessageError(ProtocolError):
    """The message ``type`` is not part of protocol v1."""

    code = "unknown_type"


class MessageTooLargeError(ProtocolError):
    """The message is larger than the server accepts."""

    code = "message_too_large"


class OutOfRangeError(ProtocolError, ValueError):
    """A parameter is outside its documented bounds."""

    code = "out_of_range"


class UnknownTurnError(ProtocolError):
    """The turn id is not open on this session."""

    code = "unknown_turn"


class DuplicateTurnError(ProtocolError):
    """The turn id was already used on this session (turn ids are never reused)."""

    code = "duplicate_turn"


class DuplicateVoiceError(ProtocolError, ValueError):
    """A ``voice.clone`` name is already a voice of the session: built in, cloned, or being
    cloned (names never shadow a voice and are not reused)."""

    code = "duplicate_voice"


class TooManyTurnsError(ProtocolError):
    """Starting the turn would exceed the cap of open (queued plus active) turns."""

    code = "too_many_turns"


class TurnClosedError(ProtocolError):
    """Text or a flush arrived for a turn that was already ended or cancelled."""

    code = "turn_closed"


class UnknownVoiceError(ProtocolError, ValueError):
    """The voice id is neither a built-in voice nor one cloned on this session."""

    code = "unknown_voice"


def _all_subclasses(cls: type[VoxlaneError]) -> list[type[VoxlaneError]]:
    out: list[type[VoxlaneError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_class_for_code(code: str) -> type[VoxlaneError]:
    """Return the exception class for a wire ``code`` (``VoxlaneError`` if unknown)."""
    for cls in _all_subclasses(VoxlaneError):
        if cls.code == code:
            return cls
    return VoxlaneError
