"""voxlane: asynchronous realtime voice agent SDK.

::

    import asyncio, voxlane

    async def main():
        async with voxlane.connect("ws://127.0.0.1:8765", api_key="...") as session:
            await voxlane.play(session.speak("Hello from voxlane!"))

    asyncio.run(main())

``import voxlane`` is light: it never imports torch, sounddevice or soundfile. Playback
(:class:`Player`, :func:`play`) and WAV helpers (:class:`WavWriter`, :func:`save_wav`) load
their dependencies (the ``audio`` extra) on first use. The speech server lives in
:mod:`voxlane.server` (install the ``server`` extra), bridges in :mod:`voxlane.clients`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voxlane.client import AudioChunk, Mark, Session, Turn, TurnEvent, connect
from voxlane.errors import (
    AudioFormatError,
    AuthenticationError,
    BadMessageError,
    ConnectionClosedError,
    ContextOverflowError,
    DuplicateTurnError,
    DuplicateVoiceError,
    EngineError,
    InvalidTokenError,
    MessageTooLargeError,
    ModelNotFoundError,
    OutOfRangeError,
    ProtocolError,
    ShuttingDownError,
    TooManyTurnsError,
    TurnClosedError,
    UnknownMessageError,
    UnknownTurnError,
    UnknownVoiceError,
    VoxlaneError,
)
from voxlane.protocol import SessionConfig, TurnMetrics, VoiceCloned

if TYPE_CHECKING:
    from voxlane.audio import WavWriter, save_wav
    from voxlane.playback import JitterBuffer, Player, play

__version__ = "0.1.0"

__all__ = [
    "AudioChunk",
    "AudioFormatError",
    "AuthenticationError",
    "BadMessageError",
    "ConnectionClosedError",
    "ContextOverflowError",
    "DuplicateTurnError",
    "DuplicateVoiceError",
    "EngineError",
    "InvalidTokenError",
    "JitterBuffer",
    "Mark",
    "MessageTooLargeError",
    "ModelNotFoundError",
    "OutOfRangeError",
    "Player",
    "ProtocolError",
    "Session",
    "SessionConfig",
    "ShuttingDownError",
    "TooManyTurnsError",
    "Turn",
    "TurnClosedError",
    "TurnEvent",
    "TurnMetrics",
    "UnknownMessageError",
    "UnknownTurnError",
    "UnknownVoiceError",
    "VoiceCloned",
    "VoxlaneError",
    "WavWriter",
    "__version__",
    "connect",
    "play",
    "save_wav",
]

# Names whose modules need the optional ``audio`` extra: imported on first access.
_LAZY = {
    "Player": "voxlane.playback",
    "JitterBuffer": "voxlane.playback",
    "play": "voxlane.playback",
    "WavWriter": "voxlane.audio",
    "save_wav": "voxlane.audio",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'voxlane' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
