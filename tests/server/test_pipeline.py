"""TurnPipeline: text deltas in, marks and timed audio chunks out.

Most tests use a fake FrameStream and decoder with an injected clock, so metrics are exact;
one runs the real tiny engine and SNAC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import pytest

from voxlane.errors import EngineError
from voxlane.server.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME
from voxlane.server.pipeline import AudioChunk, SegmentMark, TurnPipeline
from voxlane.server.text.segmenter import Segmenter

F = SAMPLES_PER_FRAME
FRAME_S = F / SAMPLE_RATE  # 85.3 ms


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class InlineExecutor(Executor):
    """Runs decoder calls at once, in the caller's thread (deterministic)."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


async def settle() -> None:
    """Let the consumer take everything produced so far."""
    for _ in range(20):
        await asyncio.sleep(0)


class FakeStream:
    """``frames`` frames (None: endless), each taking ``dt`` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, frames: int | None, dt: float, fail: bool = False):
        self.clock, self.frames, self.dt, self.fail = clock, frames, dt, fail
        self.cancelled = False
        self.sent = 0

    def __aiter__(self) -> AsyncIterator[tuple[int, ...]]:
        return self._run()

    async def _run(self) -> AsyncIterator[tuple[int, ...]]:
        while not self.cancelled and (self.frames is None or self.sent < self.frames):
            await settle()
            self.clock.now += self.dt
            self.sent += 1
            yield (self.sent % 4096,) * 7
        if self.fail:
            raise EngineError("the speech LM failed")

    def cancel(self) -> None:
        self.cancelled = True


class FakeDecoder:
    """2,048 samples per frame, value = frame code; holds ``lookahead`` frames until flush."""

    def __init__(self, lookahead: int = 2) -> None:
        self.lookahead = lookahead
        self.pending: list[tuple[int, ...]] = []
        self.buffered: list[float | None] = []  # buffered_s of every push

    def _pcm(self, frames: list[tuple[int, ...]]) -> np.ndarray:
        return np.repeat(np.array([f[0] for f in frames], np.float32) / 4096, F)

    def push(self, frames: list[tuple[int, ...]], *, buffered_s: float | None = None) -> np.ndarray:
        self.buffered.append(buffered_s)
        self.pending += frames
        ready = self.pending[: max(0, len(self.pending) - self.lookahead)]
        self.pending = self.pending[len(ready) :]
        return self._pcm(ready)

    def flush(self) -> np.ndarray:
        out, self.pending = self._pcm(self.pending), []
        return out


def make_pipeline(
    frames_per_segment: list[int | None] | int | None,
    *,
    dt: float = 0.01,
    clock: FakeClock | None = None,
    fail: bool = False,
    **kwargs: Any,
) -> tuple[TurnPipeline, list[FakeStream], list[str]]:
    clock = clock or FakeClock()
    streams: list[FakeStream] = []
    texts: list[str] = []

    def speak(text: str) -> FakeStream:
        n = frames_per_segment
        count = n[len(streams)] if isinstance(n, list) else n
        texts.append(text)
        streams.append(FakeStream(clock, count, dt, fail))
        return streams[-1]

    pipeline = TurnPipeline(
        speak=speak,
        decode_executor=InlineExecutor(),
        segmenter=Segmenter(),
        clock=clock,
        **{"new_decoder": FakeDecoder, **kwargs},
    )
    return pipeline, streams, texts


async def drain(pipeline: TurnPipeline) -> list[AudioChunk | SegmentMark]:
    return [item async for item in pipeline.events()]


async def test_metrics_with_an_injected_clock() -> None:
    clock = FakeClock()
    dt = 0.05  # each frame takes 50 ms to generate: faster than real time (85 ms)
    pipeline, _, texts = make_pipeline(10, dt=dt, clock=clock)
    pipeline.push_text("Hello there.")
    pipeline.end_text()
    items = await drain(pipeline)
    m = pipeline.metrics
    chunks = [i for i in items if isinstance(i, AudioChunk)]
    assert texts == ["Hello there."]
    assert sum(len(c.pcm) for c in chunks) == 10 * F
    # First audio needs the first decoder output: frame 3 (lookahead 2) at 3 * dt.
    assert m.ttfa_s == pytest.approx(3 * dt)
    assert m.audio_s == pytest.approx(10 * FRAME_S)
    assert m.generation_s == pytest.approx(10 * dt)
    assert m.rtf == pytest.approx(dt / FRAME_S)
    assert (m.segments, m.frames, m.underruns, m.cancelled) == (1, 10, 0, False)


async def test_decoder_told_how_much_audio_playback_holds() -> None:
    clock = FakeClock()
    dt = 0.05
    decoders: list[FakeDecoder] = []

    def new_decoder() -> FakeDecoder:
        decoders.append(FakeDecoder())
        return decoders[-1]

    pipeline, _, _ = make_pipeline(
        6, dt=dt, clock=clock, new_decoder=new_decoder, playback_lead_ms=0
    )
    pipeline.push_text("Hello there.")
    pipeline.end_text()
    await drain(pipeline)
    buffered = decoders[0].buffered
    # Nothing handed out before frame 3's audio; a zero-lead client starts playing then
    # (t = 3 dt). At frame 4 (t = 4 dt) two 40 ms chunks are out and dt of them is played.
    assert buffered[:3] == [0.0, 0.0, 0.0]
    assert buffered[3] == pytest.approx(2 * 0.04 - dt)
    assert all(b is not None and b >= 0 for b in buffered)


async def test_underruns_counted_once_per_stall() -> None:
    clock = FakeClock()
    # Each frame takes 2x its duration. The decoder holds no lookahead: every frame's audio
    # leaves as it is generated, and playback runs dry before each next frame.
    decoders: list[FakeDecoder] = []

    def new_decoder() -> FakeDecoder:
        decoders.append(FakeDecoder(lookahead=0))
        return decoders[-1]

    pipeline, _, _ = make_pipeline(
        6, dt=2 * FRAME_S, clock=clock, new_decoder=new_decoder, playback_lead_ms=0
    )
    pipeline.push_text("Slow speech here.")
    pipeline.end_text()
    await drain(pipeline)
    assert pipeline.metrics.underruns == 5  # frames 2..6 each arrive after playback ran dry
    # Behind real time, the decoder gets no buffer cap (largest, cheapest decode calls).
    assert decoders[0].buffered == [0.0, 0.0, None, None, None, None]
    assert pipeline.metrics.rtf == pytest.approx(2.0)


class JitteryStream(FakeStream):
    """Frames at real time, except that frame ``late`` takes ``late_s`` longer."""

    def __init__(self, clock: FakeClock, frames: int, late: int, late_s: float) -> None:
        super().__init__(clock, frames, FRAME_S)
        self.late, self.late_s = late, late_s

    async def _run(self) -> AsyncIterator[tuple[int, ...]]:
        async for frame in super()._run():
            if self.sent == self.late:
                self.clock.now += self.late_s
            yield frame


async def test_after_a_stall_the_cap_returns_once_the_lm_keeps_up_again() -> None:
    """A speech LM 10% faster than real time with one 0.5 s stall: playback runs dry once.
    While the stall is among the last 8 frames the decoder gets no cap (largest chunks); once
    the frames come faster than they play again the cap returns: uncapped 8-frame chunks
    would each wait for their eighth frame and then for their decode, and run dry every time
    at this pace."""
    clock = FakeClock()
    decoders: list[FakeDecoder] = []

    def new_decoder() -> FakeDecoder:
        decoders.append(FakeDecoder(lookahead=0))
        return decoders[-1]

    class Stream(JitteryStream):
        def __init__(self) -> None:
            super().__init__(clock, 30, late=12, late_s=0.5)
            self.dt = 0.9 * FRAME_S

    pipeline = TurnPipeline(
        speak=lambda text: Stream(),
        new_decoder=new_decoder,
        decode_executor=InlineExecutor(),
        segmenter=Segmenter(),
        clock=clock,
    )
    pipeline.push_text("Hello there.")
    pipeline.end_text()
    await drain(pipeline)
    assert pipeline.metrics.underruns == 1
    buffered = decoders[0].buffered
    uncapped = [i for i, b in enumerate(buffered) if b is None]
    # One run of pushes without a cap, right after the stall, while it is among the 8 frame
    # intervals the rate is judged over; capped before and after (keeping up again).
    assert uncapped == list(range(uncapped[0], uncapped[0] + len(uncapped)))
    assert 5 <= len(uncapped) <= 8
    assert len(buffered) - uncapped[-1] - 1 >= 5


@pytest.mark.parametrize(("lead_ms", "runs_dry"), [(0, True), (120, False)])
async def test_underruns_are_those_of_a_client_with_a_start_up_lead(
    lead_ms: float, runs_dry: bool
) -> None:
    """Frames at exactly real time with a 30 ms hiccup: a client that started with 120 ms
    buffered (the SDK Player's default) rides it out; one that plays from the first chunk on
    runs dry."""
    clock = FakeClock()
    pipeline = TurnPipeline(
        speak=lambda text: JitteryStream(clock, 8, late=5, late_s=0.03),
        new_decoder=lambda: FakeDecoder(lookahead=0),
        decode_executor=InlineExecutor(),
        segmenter=Segmenter(),
        clock=clock,
        playback_lead_ms=lead_ms,
    )
    pipeline.push_text("Hello there.")
    pipeline.end_text()
    ahead: list[float | None] = []
    async for item in pipeline.events():
        if isinstance(item, AudioChunk):
            ahead.append(pipeline.playback_ahead_s())
    assert (pipeline.metrics.underruns > 0) == runs_dry
    if lead_ms:
        # Until the lead is buffered the client is not playing: the engine sees it behind.
        assert ahead[0] is not None and -lead_ms / 1000 <= ahead[0] < 0
        assert min(a for a in ahead if a is not None) < 0 < max(a for a in ahead if a)


def test_the_playback_model_matches_the_sdk_player_default() -> None:
    import inspect

    from voxlane.playback import Player
    from voxlane.server.pipeline import PLAYBACK_LEAD_MS

    assert inspect.signature(Player).parameters["lead_ms"].default == PLAYBACK_LEAD_MS


async def test_marks_offsets_and_order() -> None:
    pipeline, _, texts = make_pipeline([3, 2, 4], sample_rate=16000, chunk_ms=20)
    raw = "One two three four. Five six seven eight nine ten. Eleven."
    for k in range(0, len(raw), 3):  # deltas of 3 characters
        pipeline.push_text(raw[k : k + 3])
    pipeline.end_text()
    items = await drain(pipeline)
    marks = [i for i in items if isinstance(i, SegmentMark)]
    chunks = [i for i in items if isinstance(i, AudioChunk)]
    assert texts == ["One two three four.", "Five six seven eight nine ten.", "Eleven."]
    assert [(m.index, m.text) for m in marks] == list(enumerate(texts))
    assert [(m.text_start, m.text_end) for m in marks] == [(0, 19), (19, 50), (50, 58)]
    # At 16 kHz a 2,048-sample frame is 1,365.33 samples: offsets scale exactly.
    assert [m.sample_offset for m in marks] == [0, round(3 * F * 2 / 3), round(5 * F * 2 / 3)]
    # No chunk holding a sample of a segment is handed out before the segment's mark.
    for mark in marks:
        before = items[: items.index(mark)]
        assert all(
            c.sample_offset + len(c.pcm) <= mark.sample_offset
            for c in before
            if isinstance(c, AudioChunk)
        )
    # Continuous chunks of exactly 20 ms (320 samples), the last one shorter.
    assert [c.sample_offset for c in chunks] == [320 * k for k in range(len(chunks))]
    assert all(len(c.pcm) == 320 for c in chunks[:-1]) and 0 < len(chunks[-1].pcm) <= 320
    assert sum(len(c.pcm) for c in chunks) == pytest.approx(9 * F * 2 / 3, abs=2)


async def test_cancel_stops_producing() -> None:
    pipeline, streams, _ = make_pipeline(None)  # an endless segment
    pipeline.push_text("Keep talking forever.")
    pipeline.end_text()
    seen: list[AudioChunk | SegmentMark] = []
    async for item in pipeline.events():
        seen.append(item)
        if sum(isinstance(i, AudioChunk) for i in seen) == 5:
            break
    await pipeline.cancel()
    produced = streams[0].sent
    assert streams[0].cancelled
    await settle()
    assert streams[0].sent == produced  # nothing generated after the cancel
    assert await drain(pipeline) == []  # events() ends at once, nothing more handed out
    m = pipeline.metrics
    assert m.cancelled
    # Metrics of a cancelled turn: the audio handed out, the generation time spent so far.
    assert m.audio_s == pytest.approx(5 * 960 / SAMPLE_RATE)
    assert m.generation_s == pytest.approx(produced * 0.01)
    assert m.rtf == pytest.approx(m.generation_s / m.audio_s)
    assert [t for t in asyncio.all_tasks() if t.get_name() == "voxlane-turn"] == []


async def test_cancel_before_text_and_end_without_text() -> None:
    pipeline, streams, _ = make_pipeline(3)
    pipeline.end_text()
    assert await drain(pipeline) == []
    m = pipeline.metrics
    assert (m.ttfa_s, m.audio_s, m.rtf, m.segments, streams) == (None, 0.0, None, 0, [])

    pipeline, streams, _ = make_pipeline(3)
    await pipeline.cancel()
    assert await drain(pipeline) == [] and streams == []


async def test_engine_error_surfaces_from_events() -> None:
    pipeline, _, _ = make_pipeline(2, fail=True)
    pipeline.push_text("This fails.")
    pipeline.end_text()
    with pytest.raises(EngineError, match="failed"):
        await drain(pipeline)


async def test_decode_failure_aborts_the_segments_engine_request() -> None:
    class BrokenDecoder(FakeDecoder):
        def push(self, frames: Any, *, buffered_s: float | None = None) -> np.ndarray:
            raise RuntimeError("codec blew up")

    pipeline, streams, _ = make_pipeline(None, new_decoder=BrokenDecoder)  # an endless segment
    pipeline.push_text("This segment never decodes.")
    pipeline.end_text()
    with pytest.raises(RuntimeError, match="codec blew up"):
        await drain(pipeline)
    # The engine request is aborted at once, not left generating until garbage collection.
    assert len(streams) == 1 and streams[0].cancelled


async def test_stalled_text_released_after_first_delay() -> None:
    # Real clock: the first segment goes out after first_max_delay without a boundary.
    pipeline = TurnPipeline(
        speak=lambda text: FakeStream(FakeClock(), 1, 0.0),
        new_decoder=FakeDecoder,
        decode_executor=InlineExecutor(),
        segmenter=Segmenter(first_max_delay=0.1),
    )
    pipeline.push_text("no punctuation in this text")
    started = time.monotonic()
    events = pipeline.events()
    first = await asyncio.wait_for(events.__anext__(), 5)
    assert isinstance(first, SegmentMark) and first.text == "no punctuation in this"
    assert time.monotonic() - started >= 0.09
    await pipeline.cancel()
    await events.aclose()


async def test_real_engine_and_codec(speech_service: Any) -> None:
    from voxlane.server.app import DecoderSettings
    from voxlane.server.engine import SamplingParams

    engine = speech_service.engine
    session = engine.open_session(engine.builtin_voice("tara"), window_segments=1)
    params = SamplingParams(max_frames=4, seed=5)
    pipeline = TurnPipeline(
        speak=lambda text: session.generate(text, params),
        new_decoder=lambda: speech_service.new_decoder(DecoderSettings()),
        decode_executor=speech_service.codec_executor,
        segmenter=Segmenter(),
    )
    pipeline.push_text("Real speech, from the tiny model. ")
    pipeline.push_text("Second sentence here.")
    pipeline.end_text()
    items = await drain(pipeline)
    marks = [i for i in items if isinstance(i, SegmentMark)]
    chunks = [i for i in items if isinstance(i, AudioChunk)]
    m = pipeline.metrics
    assert [mk.text for mk in marks] == [
        "Real speech, from the tiny model.",
        "Second sentence here.",
    ]
    total = sum(len(c.pcm) for c in chunks)
    assert total == m.frames * F and 2 <= m.frames <= 8  # every frame decoded exactly once
    assert all(mk.sample_offset % F == 0 for mk in marks)
    assert np.isfinite(np.concatenate([c.pcm for c in chunks])).all()
    assert m.ttfa_s is not None and m.rtf is not None

    # Cancel mid-segment: the engine drops the request.
    pipeline = TurnPipeline(
        speak=lambda text: session.generate(text, SamplingParams(max_frames=500, seed=5)),
        new_decoder=lambda: speech_service.new_decoder(DecoderSettings()),
        decode_executor=speech_service.codec_executor,
        segmenter=Segmenter(),
    )
    pipeline.push_text("A very long segment that we cut short.")
    pipeline.end_text()
    async for item in pipeline.events():
        if isinstance(item, AudioChunk):
            break
    await pipeline.cancel()
    core = engine._core
    deadline = time.monotonic() + 5
    while core.requests:
        assert time.monotonic() < deadline, "the cancelled request kept running"
        await asyncio.sleep(0.01)
    session.close()
