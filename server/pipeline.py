"""The turn pipeline: text deltas in, timed audio chunks out.

One :class:`TurnPipeline` serves one turn::

    push_text(delta) ──> segmenter ──> segment queue ──> speech LM (engine thread)
                                                          │ frames
                   audio chunks <── chunker <── resampler <── streaming SNAC decoder (codec thread)

Text handling is synchronous and cheap, so it runs on the event loop. Model work never does: the
engine steps in its own thread, and SNAC decoding runs on a dedicated single-thread executor (one
per server, so decodes of many streams queue instead of fighting over the cores).

Segments are generated back to back, as fast as the engine allows, so the next segment is being
generated while the client still plays the current one. Each segment's audio is decoded as its own
utterance (the decoder is flushed at the segment's end): Orpheus closes every segment with
end-of-speech, so there is no acoustic continuity to preserve across the boundary, and flushing
means a segment's tail is never held back waiting for text that has not arrived yet.

Timing follows a simple playback model: the client starts playing the first chunk the moment it
is sent and plays continuously. A chunk sent after the moment it should start playing is an
*underrun*; playback then stalls until it arrives, so lateness is counted once per stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from voxlane.server.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME, Frame
from voxlane.server.text.segmenter import Segment, Segmenter

__all__ = [
    "AudioChunk",
    "FrameStream",
    "PcmDecoder",
    "SegmentMark",
    "TurnMetrics",
    "TurnPipeline",
]


class FrameStream(Protocol):
    """What the engine returns for one segment: frames as they are generated."""

    def __aiter__(self) -> AsyncIterator[Frame]: ...

    def cancel(self) -> None:
        """Abort the segment's generation; the stream ends (a no-op once it ended)."""


class PcmDecoder(Protocol):
    """A streaming decoder: frames in, final 24 kHz float32 PCM out (see ``codec.py``).

    ``buffered_s`` is the audio handed out but not played yet: the decoder never waits for
    more frames than that covers before it decodes (``StreamingDecoder.push``)."""

    def push(self, frames: list[Frame], *, buffered_s: float | None = None) -> np.ndarray:
        """Add frames; returns the PCM that is final now (possibly empty)."""

    def flush(self) -> np.ndarray:
        """End of the utterance: returns the PCM still held back."""


@dataclass(frozen=True)
class AudioChunk:
    """``pcm`` (float32, mono, at the turn's output rate) starting at ``sample_offset``."""

    sequence: int
    sample_offset: int
    pcm: np.ndarray


@dataclass(frozen=True)
class SegmentMark:
    """Segment ``index`` (``text``, spanning ``text_start:text_end`` of the turn's cleaned
    text stream) starts at output sample ``sample_offset``."""

    index: int
    text: str
    text_start: int
    text_end: int
    sample_offset: int


@dataclass
class TurnMetrics:
    """Per-turn numbers, reported in ``turn.done``."""

    ttfa_s: float | None = None  # first text delta -> first audio chunk handed out
    audio_s: float = 0.0
    generation_s: float = 0.0  # wall time spent speaking segments (LM + decode), not waiting
    rtf: float | None = None  # generation seconds per second of audio (< 1: faster than real time)
    elapsed_s: float = 0.0  # first text delta -> last chunk handed out
    underruns: int = 0
    segments: int = 0
    frames: int = 0
    capped_segments: int = 0  # segments the engine's text-length frame cap ended
    cancelled: bool = False

    def as_dict(self) -> dict[str, float | int | bool | None]:
        """Plain values for JSON."""
        return dict(self.__dict__)


#: Audio a client buffers before it starts playing (and again after running dry): the default
#: ``lead_ms`` of the SDK's :class:`~voxlane.playback.Player`. Underruns are counted for such
#: a client (tests/server/test_pipeline.py checks the two stay equal).
PLAYBACK_LEAD_MS = 120.0


@dataclass
class _PlaybackClock:
    """Counts underruns against a client that plays in real time once it holds ``lead``
    samples, and that waits for the lead again after running dry (the SDK Player's jitter
    buffer). ``lead=0`` is a client that plays from the first chunk on."""

    rate: int
    lead: int = 0
    start: float | None = None  # when sample 0 plays (moved by stalls); None before playing
    underruns: int = 0
    waiting_from: int | None = 0  # sample offset playback waits at for the lead; None: playing

    def on_chunk(self, now: float, sample_offset: int, samples: int) -> None:
        end = sample_offset + samples
        if self.waiting_from is None:
            assert self.start is not None
            due = self.start + sample_offset / self.rate
            if now <= due:
                return
            self.underruns += 1  # ran dry at `due`; this chunk starts a new wait for the lead
            self.waiting_from = sample_offset
        if end - self.waiting_from >= self.lead:
            self.start = now - self.waiting_from / self.rate
            self.waiting_from = None

    def ahead(self, now: float, samples_out: int) -> float | None:
        """Seconds of audio handed out and not played yet; while waiting for the lead, minus
        what is still missing to start (negative). None before the first chunk."""
        if self.waiting_from is not None:
            if self.start is None and samples_out == 0:
                return None
            return (samples_out - self.waiting_from - self.lead) / self.rate
        assert self.start is not None
        return samples_out / self.rate - (now - self.start)


_SENTINEL = object()
_FRAME_S = SAMPLES_PER_FRAME / SAMPLE_RATE
#: Frames over which the speech LM's rate is judged after an underrun (~0.7 s of audio).
_RATE_WINDOW = 8


@dataclass
class TurnPipeline:
    """One turn: text deltas in (:meth:`push_text`), :class:`AudioChunk` and
    :class:`SegmentMark` out (iterate :meth:`events`).

    ``speak(text)`` starts generating one segment and returns its :class:`FrameStream`;
    ``new_decoder()`` returns a fresh streaming decoder per segment. ``decode_executor`` runs
    decoder calls off the event loop; with a ``decode_batcher``
    (:class:`~voxlane.server.snac_stream.DecodeBatcher`), decoders that support it decode in
    batches shared with the other turns instead. ``metrics.underruns`` (and the playback
    model behind deadline scheduling and decode chunking) is that of a client that starts
    playing once it holds ``playback_lead_ms`` of audio, and again after running dry (0: from
    the first chunk on).
    """

    speak: Callable[[str], FrameStream]
    new_decoder: Callable[[], PcmDecoder]
    decode_executor: Executor
    segmenter: Segmenter
    decode_batcher: Any = None
    chunk_ms: int = 40
    sample_rate: int = SAMPLE_RATE
    clock: Callable[[], float] = time.monotonic
    max_buffered_chunks: int = 64
    playback_lead_ms: float = PLAYBACK_LEAD_MS
    metrics: TurnMetrics = field(default_factory=TurnMetrics)

    def __post_init__(self) -> None:
        from voxlane.server.codec import PcmChunker

        self._chunker = PcmChunker(self.sample_rate, self.chunk_ms)
        self._resampler = None
        if self.sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(SAMPLE_RATE, self.sample_rate, 1, dtype="float32")
        self._segments: asyncio.Queue[Segment | object] = asyncio.Queue()
        self._out: asyncio.Queue[AudioChunk | SegmentMark | BaseException | object] = asyncio.Queue(
            self.max_buffered_chunks
        )
        self._first_text_at: float | None = None
        self._text_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._stream: FrameStream | None = None
        self._samples_out = 0  # at the output rate, cut into chunks
        self._samples_handed = 0  # at the output rate, handed out by events()
        self._segment_started: float | None = None  # clock() when the current segment began
        self._underruns_before_segment = 0
        # When the current segment's last frames arrived (clock()), to tell a speech LM that
        # keeps up from one that does not (_buffered_s).
        self._frame_times: deque[float] = deque(maxlen=_RATE_WINDOW + 1)
        self._samples_decoded = 0  # at 24 kHz, out of the decoder
        self._sequence = 0
        self._playback = _PlaybackClock(
            self.sample_rate, lead=round(self.sample_rate * self.playback_lead_ms / 1000)
        )
        self._task: asyncio.Task[None] | None = None

    # -- text side (event loop, cheap) ---------------------------------------------------------

    def push_text(self, delta: str) -> None:
        """Add an LLM text delta; segments are released as soon as they are speakable."""
        if self._text_done:
            raise RuntimeError("push_text after end_text")
        now = self.clock()
        if self._first_text_at is None:
            self._first_text_at = now
        self._enqueue(self.segmenter.push(delta, now))
        self._arm_timer()
        self._ensure_started()

    def flush_text(self) -> None:
        """Release the buffered text as a segment now (the client's ``flush``)."""
        self._enqueue(self.segmenter.flush(self.clock()))
        self._arm_timer()

    def end_text(self) -> None:
        """No more text: the remaining text becomes the last segment."""
        if self._text_done:
            return
        self._text_done = True
        if self._first_text_at is None:
            self._first_text_at = self.clock()
        self._enqueue(self.segmenter.flush(self.clock()))
        self._cancel_timer()
        self._segments.put_nowait(_SENTINEL)
        self._ensure_started()

    def _enqueue(self, segments: list[Segment]) -> None:
        for seg in segments:
            self._segments.put_nowait(seg)

    def _arm_timer(self) -> None:
        self._cancel_timer()
        deadline = self.segmenter.next_deadline()
        if deadline is None or self._text_done:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._enqueue(self.segmenter.poll(self.clock()))
        self._arm_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- audio side -----------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._produce(), name="voxlane-turn")

    async def _decode(self, fn: Callable[..., np.ndarray], *args: object) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_executor, fn, *args)

    async def _push(self, decoder: PcmDecoder, frames: list[Frame]) -> np.ndarray:
        buffered_s = self._buffered_s()
        if self.decode_batcher is not None and hasattr(decoder, "take"):
            return await self.decode_batcher.push(decoder, frames, buffered_s=buffered_s)
        return await self._decode(functools.partial(decoder.push, buffered_s=buffered_s), frames)

    async def _produce(self) -> None:
        try:
            index = 0
            while True:
                item = await self._segments.get()
                if item is _SENTINEL:
                    break
                assert isinstance(item, Segment)
                await self._speak_segment(index, item)
                index += 1
            await self._emit_pcm(self._final_tail(), final=True)
            self._finish(self._samples_out)
            await self._out.put(_SENTINEL)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced to the consumer of events()
            await self._out.put(exc)

    async def _speak_segment(self, index: int, segment: Segment) -> None:
        self.metrics.segments += 1
        # Where this segment's first sample lands in the output stream: everything decoded so
        # far, at the output rate (part of it may still sit in the chunker).
        offset = round(self._samples_decoded * self.sample_rate / SAMPLE_RATE)
        await self._out.put(SegmentMark(index, segment.text, segment.start, segment.end, offset))
        decoder = self.new_decoder()
        started = self._segment_started = self.clock()
        self._underruns_before_segment = self._playback.underruns
        self._frame_times.clear()
        stream = self._stream = self.speak(segment.text)
        seed = getattr(stream, "seed", None)
        if seed is not None and hasattr(decoder, "seed_noise"):
            # SNAC's noise blocks draw random numbers too: a seeded segment seeds them, so
            # the same seed and text give the same samples, not just the same frames.
            decoder.seed_noise(seed)
        completed = False
        try:
            async for frame in stream:
                self.metrics.frames += 1
                self._frame_times.append(self.clock())
                pcm = await self._push(decoder, [frame])
                self._samples_decoded += pcm.size
                await self._emit_pcm(pcm)
            completed = True
            # The speech LM did not end the segment; the engine cut it at the most frames its
            # text can take (EngineConfig.segment_frame_cap): counted, for /metrics.
            if getattr(stream, "finish_reason", None) == "text_cap":
                self.metrics.capped_segments += 1
        finally:
            self._stream = None
            if not completed:
                # A decode that failed (or a cancel) leaves the segment unfinished: abort its
                # engine request now rather than let it generate until garbage collection.
                stream.cancel()
        if self.decode_batcher is not None and hasattr(decoder, "take"):
            tail = await self.decode_batcher.flush(decoder)
        else:
            tail = await self._decode(decoder.flush)
        self._samples_decoded += tail.size
        self.metrics.generation_s += self.clock() - started
        self._segment_started = None
        await self._emit_pcm(tail)

    def _buffered_s(self) -> float | None:
        """Seconds of audio handed out that the client has not played yet (playback model).

        Passed to the decoder so it decodes in chunks no longer than the audio playback still
        holds: with a speech LM faster than real time but not by much, waiting for a full
        8-frame chunk (680 ms) would let playback run dry; with a fast LM the buffer grows and
        chunks reach full size. Small chunks cost more decoding per frame, so once playback
        ran dry during this segment *and* the speech LM's last frames came slower than real
        time (the box cannot keep up), there is no cap (None): the cheapest, largest chunks
        then leave the most CPU to the speech LM instead of spiralling into ever more decoding
        per frame. A dry spell while the LM keeps up (another stream's prefill, a pause of the
        box) keeps the cap: full chunks would then run dry at every chunk, as each one waits
        for its eighth frame and then for its decode.
        """
        if self._playback.underruns > self._underruns_before_segment and not self._keeps_up():
            return None
        ahead = self._playback.ahead(self.clock(), self._samples_out)
        return 0.0 if ahead is None else max(0.0, ahead)

    def _keeps_up(self) -> bool:
        """True if the segment's last ``_RATE_WINDOW`` frames came at least as fast as they
        play (False while fewer have come)."""
        times = self._frame_times
        if len(times) <= _RATE_WINDOW:
            return False
        return times[-1] - times[0] <= _RATE_WINDOW * _FRAME_S

    def playback_ahead_s(self) -> float | None:
        """Seconds of audio handed out that the client has not played yet (playback model),
        negative while it waits for its start-up lead; None before the first chunk. Read by
        the engine thread to schedule by deadline (plain float reads)."""
        return self._playback.ahead(self.clock(), self._samples_out)

    def _final_tail(self) -> np.ndarray:
        tail = [np.zeros(0, np.float32)]
        if self._resampler is not None:
            tail.append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        return np.concatenate(tail)

    async def _emit_pcm(self, pcm: np.ndarray, *, final: bool = False) -> None:
        if self._resampler is not None and not final and pcm.size:
            pcm = self._resampler.resample_chunk(pcm)
        chunks = self._chunker.push(pcm) if pcm.size else []
        if final:
            tail = self._chunker.flush()
            if tail is not None and len(tail):
                chunks.append(tail)
        for chunk in chunks:
            offset = self._samples_out
            self._samples_out += len(chunk)
            out = AudioChunk(self._sequence, offset, chunk)
            self._sequence += 1
            await self._out.put(out)

    def _finish(self, samples: int) -> None:
        m = self.metrics
        m.audio_s = samples / self.sample_rate
        m.rtf = m.generation_s / m.audio_s if m.audio_s > 0 else None

    # -- consumer side --------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[AudioChunk | SegmentMark]:
        """Marks and audio chunks in order, until the turn is complete.

        Timing metrics are taken when an item is handed out here (that is when a server sends
        it), so a slow consumer shows up as latency and underruns.
        """
        while True:
            item = await self._out.get()
            if item is _SENTINEL:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, AudioChunk):
                now = self.clock()
                start = self._first_text_at if self._first_text_at is not None else now
                if self.metrics.ttfa_s is None:
                    self.metrics.ttfa_s = now - start
                self._samples_handed += len(item.pcm)
                self._playback.on_chunk(now, item.sample_offset, len(item.pcm))
                self.metrics.underruns = self._playback.underruns
                self.metrics.elapsed_s = now - start
            yield item  # type: ignore[misc]

    async def cancel(self) -> None:
        """Stop the turn now: the engine request is aborted, nothing more is emitted.

        Metrics then cover the audio handed out and the generation time spent until now.
        """
        if self.metrics.cancelled:
            return
        self.metrics.cancelled = True
        self._text_done = True
        self._cancel_timer()
        if self._stream is not None:
            self._stream.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._segment_started is not None:
            self.metrics.generation_s += self.clock() - self._segment_started
            self._segment_started = None
        self._finish(self._samples_handed)
        with contextlib.suppress(asyncio.QueueFull):
            # Unblock a consumer waiting in events().
            while not self._out.empty():
                self._out.get_nowait()
            self._out.put_nowait(_SENTINEL)
