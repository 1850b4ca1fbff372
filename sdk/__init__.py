"""voxlane: asynchronous realtime voice agent SDK.

``import voxlane`` is light: it never imports torch. The speech server lives in
:mod:`voxlane.server` (install the ``server`` extra), bridges in
:mod:`voxlane.clients`.
"""

from __future__ import annotations

from voxlane.errors import (
    AudioFormatError,
    BadMessageError,
    ContextOverflowError,
    EngineError,
    InvalidTokenError,
    MessageTooLargeError,
    ModelNotFoundError,
    OutOfRangeError,
    ProtocolError,
    UnknownMessageError,
    UnknownTurnError,
    VoxlaneError,
)

__version__ = "0.1.0"

__all__ = [
    "AudioFormatError",
    "BadMessageError",
    "ContextOverflowError",
    "EngineError",
    "InvalidTokenError",
    "MessageTooLargeError",
    "ModelNotFoundError",
    "OutOfRangeError",
    "ProtocolError",
    "UnknownMessageError",
    "UnknownTurnError",
    "VoxlaneError",
    "__version__",
]
