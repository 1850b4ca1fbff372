"""The speech LM engine: KV-cache reuse, frame-constrained sampling, off-loop step loop.

Public API: :class:`SpeechEngine`, :class:`Session`, :class:`FrameStream`, :class:`Voice`,
:class:`EngineConfig`, :class:`SamplingParams`. See docs/architecture-engine.md.
"""

from .config import EngineConfig, EvictionPolicy, SamplingParams
from .engine import FrameStream, Session, SpeechEngine, SpeechLMLike
from .voices import Voice

__all__ = [
    "EngineConfig",
    "EvictionPolicy",
    "FrameStream",
    "SamplingParams",
    "Session",
    "SpeechEngine",
    "SpeechLMLike",
    "Voice",
]
