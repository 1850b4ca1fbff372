"""Engine and sampling options (plain, validated dataclasses)."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Literal

from voxlane.errors import OutOfRangeError

__all__ = ["AdmissionPolicy", "EngineConfig", "EvictionPolicy", "Quantize", "SamplingParams"]

EvictionPolicy = Literal["reprefill", "reindex"]
AdmissionPolicy = Literal["off", "refuse", "wait"]
Quantize = Literal["none", "int8", "int4"]


@dataclass(frozen=True)
class SamplingParams:
    """How one segment is sampled.

    ``temperature`` 0 means greedy. ``top_p`` is nucleus sampling over the legal tokens of the
    current frame position. ``repetition_penalty`` (HF/CTRL rule: a positive logit is divided
    by it, a negative one multiplied) applies to the codes already emitted *at the same frame
    position* within the last ``repetition_window`` frames of this segment (64 frames = 5.5 s).
    Only same-position codes can be legal at a position, so this is exactly "tokens of the last
    ``7 * repetition_window`` generated tokens"; the window bounds the cost and keeps a long
    segment from penalising its whole past (vLLM, which Orpheus uses, penalises prompt and
    output without a window). Orpheus needs ``repetition_penalty >= 1.1`` for stable speech.
    ``max_frames`` caps the segment (600 frames = 51 s); ``seed`` makes it reproducible.
    """

    temperature: float = 0.6
    top_p: float = 0.8
    repetition_penalty: float = 1.3
    repetition_window: int = 64
    max_frames: int = 600
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise OutOfRangeError(f"temperature {self.temperature} is outside 0..10")
        if not 0.0 < self.top_p <= 1.0:
            raise OutOfRangeError(f"top_p {self.top_p} is outside (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 10.0:
            raise OutOfRangeError(f"repetition_penalty {self.repetition_penalty} is outside 1..10")
        if not 0 <= self.repetition_window <= 10_000:
            raise OutOfRangeError(f"repetition_window {self.repetition_window} is outside 0..10000")
        if not 1 <= self.max_frames <= 100_000:
            raise OutOfRangeError(f"max_frames {self.max_frames} is outside 1..100000")


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide options.

    ``max_context``: slots of each session's preallocated KV cache (positions never exceed it).
    ``window_segments``: default K, the finished segments a session keeps after its voice prefix.
    ``eviction``: how a session drops old segments — ``"reprefill"`` (default; exact: the kept
    segments are recomputed after the reused prefix) or ``"reindex"`` (shift the cache and rotate
    the kept keys' RoPE; no forward, but the kept segments' deeper-layer keys/values still carry
    what they attended to before). docs/architecture-engine.md has the measurements.
    ``window_slack``: extra finished segments a session may hold beyond K before it evicts; it
    then evicts down to K at once. With ``reprefill`` this turns a re-prefill at every segment
    into one every ``window_slack + 1`` segments (the "occasional re-prefill"), so the exact
    policy costs, amortized, about one segment's prefill per segment. The context a segment
    sees is K to K + slack segments (with K = 0 there is no slack: nothing is re-prefilled).
    ``max_frames_ahead``: frames a request may have generated that its consumer has not taken
    yet; beyond that the request is paused (not stepped) until the consumer catches up. This is
    how a client that stops reading pauses its own generation without slowing anyone else.
    ``None`` disables the bound.
    ``voice_cache_bytes``: LRU budget of prefilled voice prefixes.
    ``prefill_chunk``: most tokens one engine step prefills (prompts, re-prefilled windows and
    voice prefixes are prefilled in chunks between other requests' decode steps).
    ``num_threads``: torch intra-op threads of the engine thread (None: leave torch's setting).
    ``initial_cache_slots``: KV slots a session allocates beyond its voice prefix when it
    starts; its cache grows (doubling, copying) up to ``max_context`` only as its context does,
    so idle or short sessions do not hold ``max_context`` of memory each (0.9 GB for Orpheus
    3B in bf16 at 8,192).

    Many streams: every step decodes the tokens of all requests past prefill in one batched
    forward. ``max_batch`` caps the requests of one step (None: all); the step takes the ones
    closest to running dry first (playback deadline). ``yield_ahead_s``: a stream more than
    this much audio ahead of real time sits a step out while another is behind it (None: never).
    ``pace_ahead_s``: a request whose listener is known (``generate(..., playback=...)``, as
    the server's turns are) waits while it is more than this much audio ahead of it, even when
    no other stream is behind: those frames are not needed yet, and the CPU goes to the codec
    and the other streams instead (None, the default: generate as fast as possible). The
    turn's ``rtf`` then measures the pacing, not the speed.
    ``admission``: ``"refuse"`` makes :meth:`SpeechEngine.open_session` raise
    :class:`~voxlane.errors.OverloadedError` when the measured step throughput cannot keep one
    more stream real time using at most ``realtime_headroom`` of the real-time budget (the
    rest is left to SNAC decoding and jitter); ``"wait"`` accepts the session but holds its
    first segment until a streaming session finishes (oldest first), and fails it with
    ``OverloadedError`` after ``admission_wait_s`` (None: holds it as long as it takes);
    ``"off"`` admits everything. Sessions whose consumer stopped taking frames (paused at
    ``max_frames_ahead``) cost nothing and do not count as streams. ``voxlane serve``
    defaults to ``"wait"``; this class to ``"off"`` (plain engine use, tests).

    ``quantize``: ``"int8"`` stores the decoder layers' projections as per-output-channel int8
    (activations stay float; CPU: voxlane's native C decode step where it builds, else
    fbgemm's int8 GEMM; other devices: int8 weight-only). A CPU decode step reads a quarter of
    the bytes and runs ~4-5x faster than float32 natively; the logits move slightly
    (docs/architecture-engine.md, "int8 weights", has the measured agreement). The engine then
    owns the model: its float projection weights are released, so ``lm.model`` no longer runs on
    its own. ``"int4"`` (CPU only) runs decode steps from 4-bit group-quantized weights, which
    halves int8's bytes per step (12-30% faster steps at 1-2 streams on the small demo model, no
    gain at 4, slower at 8: docs/architecture-engine.md, "int4 weights"); prefill chunks and the
    LM head slices stay int8. ``"none"`` (default) keeps the model's dtype.

    ``segment_cap_s_per_char`` / ``segment_cap_base_s``: a segment may speak at most
    ``base + s_per_char * units(text)`` seconds (:meth:`segment_frame_cap`); a segment that
    reaches the cap before ``max_frames`` and without END_OF_SPEECH is closed like one that
    reached ``max_frames`` (finish reason ``"text_cap"``). A speech LM that never says
    END_OF_SPEECH (random weights; Orpheus now and then) otherwise talks noise up to
    ``max_frames`` (43.7 s for "Hello there!"). The default, 2 s + 0.25 s per unit, is about
    2.5x the slowest deliberate speech (~10 characters a second) plus room for pauses and tags.
    A unit is a character; a digit counts 3 (a digit can be read as a word or two: "1999"),
    a wide character (CJK: a syllable each) 2. ``segment_cap_s_per_char=None`` turns it off.
    """

    max_context: int = 8192
    window_segments: int = 4
    eviction: EvictionPolicy = "reprefill"
    window_slack: int = 2
    max_frames_ahead: int | None = 48
    voice_cache_bytes: int = 1 << 30
    prefill_chunk: int = 256
    num_threads: int | None = None
    initial_cache_slots: int = 1024
    max_batch: int | None = None
    yield_ahead_s: float | None = 2.0
    pace_ahead_s: float | None = None
    admission: AdmissionPolicy = "off"
    admission_wait_s: float | None = 30.0
    realtime_headroom: float = 0.7
    quantize: Quantize = "none"
    segment_cap_s_per_char: float | None = 0.25
    segment_cap_base_s: float = 2.0

    def segment_frame_cap(self, text: str) -> int | None:
        """Most frames a segment speaking ``text`` may have (None: no cap)."""
        if self.segment_cap_s_per_char is None:
            return None
        units = sum(_speech_units(c) for c in text)
        seconds = self.segment_cap_base_s + self.segment_cap_s_per_char * units
        return max(1, math.ceil(seconds * _FRAMES_PER_SECOND))

    def __post_init__(self) -> None:
        if self.max_context < 16:
            raise OutOfRangeError(f"max_context {self.max_context} is below 16")
        if self.window_segments < 0:
            raise OutOfRangeError(f"window_segments {self.window_segments} is negative")
        if self.max_frames_ahead is not None and self.max_frames_ahead < 1:
            raise OutOfRangeError(f"max_frames_ahead {self.max_frames_ahead} is below 1")
        if self.window_slack < 0:
            raise OutOfRangeError(f"window_slack {self.window_slack} is negative")
        if self.eviction not in ("reprefill", "reindex"):
            raise OutOfRangeError(f"eviction {self.eviction!r} is not 'reprefill' or 'reindex'")
        if self.initial_cache_slots < 1:
            raise OutOfRangeError(f"initial_cache_slots {self.initial_cache_slots} is below 1")
        if self.prefill_chunk < 1:
            raise OutOfRangeError(f"prefill_chunk {self.prefill_chunk} is below 1")
        if self.max_batch is not None and self.max_batch < 1:
            raise OutOfRangeError(f"max_batch {self.max_batch} is below 1")
        if self.yield_ahead_s is not None and self.yield_ahead_s < 0:
            raise OutOfRangeError(f"yield_ahead_s {self.yield_ahead_s} is negative")
        if self.pace_ahead_s is not None and self.pace_ahead_s <= 0:
            raise OutOfRangeError(f"pace_ahead_s {self.pace_ahead_s} is not positive")
        if self.admission not in ("off", "refuse", "wait"):
            raise OutOfRangeError(f"admission {self.admission!r} is not off, refuse or wait")
        if self.admission_wait_s is not None and self.admission_wait_s < 0:
            raise OutOfRangeError(f"admission_wait_s {self.admission_wait_s} is negative")
        if not 0.0 < self.realtime_headroom <= 1.0:
            raise OutOfRangeError(f"realtime_headroom {self.realtime_headroom} is outside (0, 1]")
        if self.quantize not in ("none", "int8", "int4"):
            raise OutOfRangeError(f"quantize {self.quantize!r} is not 'none', 'int8' or 'int4'")
        if self.voice_cache_bytes < 0:
            raise OutOfRangeError("voice_cache_bytes is negative")
        if self.segment_cap_s_per_char is not None and not 0 < self.segment_cap_s_per_char <= 60:
            raise OutOfRangeError(
                f"segment_cap_s_per_char {self.segment_cap_s_per_char} is outside (0, 60]"
            )
        if not 0 <= self.segment_cap_base_s <= 3600:
            raise OutOfRangeError(
                f"segment_cap_base_s {self.segment_cap_base_s} is outside 0..3600"
            )


#: SNAC 24 kHz frames per second of audio (2,048 samples each).
_FRAMES_PER_SECOND = 24_000 / 2_048


def _speech_units(c: str) -> int:
    """How much speaking time a character may take, in units of one letter."""
    if c.isdigit():
        return 3
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
