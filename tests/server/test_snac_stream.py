"""Exact streaming SNAC decoding (layer-wise incremental) and its batching across streams.

Most properties run on a small random SNAC with the 24 kHz layout (same layer types, strides
and kernels, narrower channels) so hypothesis can try many push patterns; the demo checkpoint
(exact 24 kHz architecture) checks the real sizes once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlane.errors import InvalidTokenError, ModelFormatError, OutOfRangeError
from voxlane.server.codec import SnacCodec, load_snac
from voxlane.server.orpheus import SAMPLES_PER_FRAME
from voxlane.server.snac_stream import (
    DecodeBatcher,
    ExactStreamingDecoder,
    SnacProgram,
    bf16_supported,
)

N = 14


def _small_snac(attn_window_size: int | None = None) -> SnacCodec:
    from snac import SNAC

    torch.manual_seed(3)
    model = SNAC(
        sampling_rate=24000,
        encoder_dim=8,
        encoder_rates=[2, 4, 8, 8],
        latent_dim=64,
        decoder_dim=64,
        decoder_rates=[8, 8, 4, 2],
        attn_window_size=attn_window_size,
        codebook_size=4096,
        codebook_dim=8,
        vq_strides=[4, 2, 1],
        noise=True,
        depthwise=True,
    )
    # Random weights far from SNAC's init, so every layer visibly matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return SnacCodec(model, noise=False)


@pytest.fixture(scope="module")
def small() -> Iterator[SnacCodec]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _small_snac()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_program(small: SnacCodec) -> SnacProgram:
    return SnacProgram(small)


def _frames(n: int, seed: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in row) for row in rng.integers(0, 4096, (n, 7))]


def _run_pattern(program: SnacProgram, frames: list, sizes: list[int]) -> list[np.ndarray]:
    stream = program.new_stream()
    out, i = [], 0
    for n in sizes:
        out.append(program.run([(stream, frames[i : i + n], False)])[0])
        i += n
    out.append(program.run([(stream, frames[i:], True)])[0])
    return out


@settings(max_examples=25)
@given(sizes=st.lists(st.integers(0, 5), max_size=8), seed=st.integers(0, 1000))
def test_any_push_pattern_equals_full_decode(
    small: SnacCodec, small_program: SnacProgram, sizes: list[int], seed: int
) -> None:
    frames = _frames(N, seed)
    full = small.decode(frames)
    out = np.concatenate(_run_pattern(small_program, frames, sizes))
    assert out.shape == (N * SAMPLES_PER_FRAME,)
    np.testing.assert_allclose(out, full, atol=2e-5, rtol=0)


def test_output_lags_by_the_receptive_field(small_program: SnacProgram) -> None:
    frames = _frames(N, 1)
    out = _run_pattern(small_program, frames, [1] * N)
    delay = small_program.delay
    assert 2 * SAMPLES_PER_FRAME < delay < 3 * SAMPLES_PER_FRAME  # SNAC 24 kHz: ~2.3 frames
    for n in range(1, N + 1):
        produced = sum(x.size for x in out[:n])
        assert produced == max(0, n * SAMPLES_PER_FRAME - delay)
    assert out[-1].size == delay  # the flush finishes the tail


def test_batched_run_equals_separate_runs(small_program: SnacProgram) -> None:
    streams = [_frames(N, s) for s in (10, 11, 12)]
    alone = [np.concatenate(_run_pattern(small_program, f, [3, 3, 3, 3])) for f in streams]
    states = [small_program.new_stream() for _ in streams]
    outs: list[list[np.ndarray]] = [[] for _ in streams]
    # Different chunk sizes per stream in the same runs, one stream sitting a run out, and
    # one stream finishing while the others go on.
    plan = [(2, 0, 5), (4, 1, 3), (8, 6, 6)]
    starts = [0, 0, 0]
    for step in range(3):
        jobs = []
        for k, state in enumerate(states):
            n = plan[k][step]
            jobs.append((state, streams[k][starts[k] : starts[k] + n], False))
            starts[k] += n
        for k, pcm in enumerate(small_program.run(jobs)):
            outs[k].append(pcm)
    finals = [(state, streams[k][starts[k] :], True) for k, state in enumerate(states)]
    for k, pcm in enumerate(small_program.run(finals)):
        outs[k].append(pcm)
    for k in range(3):
        np.testing.assert_allclose(np.concatenate(outs[k]), alone[k], atol=2e-5, rtol=0)


def test_real_snac_24khz_streams_exactly(demo_snac_dir: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codec = load_snac(demo_snac_dir, noise=False)
        program = SnacProgram(codec)
        frames = _frames(9, 5)
        full = codec.decode(frames)
        decoder = ExactStreamingDecoder(program, frames_per_call=2)
        out = [decoder.push([f]) for f in frames] + [decoder.flush()]
        got = np.concatenate(out)
        assert got.shape == full.shape
        snr = 10 * np.log10(np.sum(full.astype(np.float64) ** 2) / np.sum((got - full) ** 2))
        assert snr > 100  # float rounding only (the window decoder's default gives ~85 dB)
        assert decoder.first_audio_tokens == 21
    finally:
        torch.set_num_threads(threads)


def test_noise_on_keeps_lengths(small: SnacCodec) -> None:
    small.noise = True
    try:
        program = SnacProgram(small)
        out = np.concatenate(_run_pattern(program, _frames(6, 2), [2, 2]))
        assert out.shape == (6 * SAMPLES_PER_FRAME,) and np.isfinite(out).all()
    finally:
        small.noise = False


def test_finished_and_duplicate_streams_are_refused(small_program: SnacProgram) -> None:
    stream = small_program.new_stream()
    small_program.run([(stream, _frames(2, 0), True)])
    assert stream.finished
    with pytest.raises(ValueError, match="already ended"):
        small_program.run([(stream, _frames(1, 0), False)])
    other = small_program.new_stream()
    with pytest.raises(ValueError, match="twice"):
        small_program.run([(other, [], False), (other, [], False)])


def test_layers_it_cannot_stream_are_a_model_format_error() -> None:
    with pytest.raises(ModelFormatError, match="LocalMHA"):
        SnacProgram(_small_snac(attn_window_size=8))


def test_decoder_chunks_follow_the_playback_buffer(small_program: SnacProgram) -> None:
    decoder = ExactStreamingDecoder(small_program, frames_per_call=4)
    frames = _frames(12, 3)
    assert decoder.chunk_frames(None) == 4
    assert decoder.chunk_frames(0.0) == 1
    assert decoder.chunk_frames(0.2) == 2  # 2.3 frames of audio held: wait for 2 at most
    # Without a buffer hint the decoder waits for full calls.
    assert decoder.push(frames[:3]).size == 0 and decoder.frames_received == 3
    assert decoder.push(frames[3:4]).size == 4 * SAMPLES_PER_FRAME - small_program.delay
    # With nothing playing it decodes at once.
    assert decoder.push(frames[4:5], buffered_s=0.0).size == SAMPLES_PER_FRAME


def test_decoder_rejects_bad_frames_and_resets(small_program: SnacProgram) -> None:
    decoder = ExactStreamingDecoder(small_program)
    decoder.push(_frames(2, 0))
    with pytest.raises(InvalidTokenError):
        decoder.push([(1, 2, 3, 4, 5, 6, 4096)])
    assert decoder.frames_received == 2  # nothing of the bad push was kept
    decoder.reset()
    assert decoder.frames_received == 0
    assert decoder.flush().size == 0
    with pytest.raises(OutOfRangeError):
        ExactStreamingDecoder(small_program, frames_per_call=0)


# -- batching across streams on the codec thread ---------------------------------------------


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="test-codec")
    yield pool
    pool.shutdown(wait=True)


def _hold(executor: ThreadPoolExecutor) -> threading.Event:
    """Keep the single worker busy until the returned event is set."""
    release = threading.Event()
    executor.submit(release.wait, 10)
    return release


async def test_batcher_runs_queued_streams_together(
    small_program: SnacProgram, executor: ThreadPoolExecutor
) -> None:
    batcher = DecodeBatcher(small_program, executor, max_frames=8)
    streams = [_frames(N, s) for s in (20, 21, 22, 23)]
    alone = [np.concatenate(_run_pattern(small_program, f, [1] * N)) for f in streams]
    decoders = [ExactStreamingDecoder(small_program, frames_per_call=1) for _ in streams]
    outs: list[list[np.ndarray]] = [[] for _ in streams]

    async def one(k: int) -> None:
        for frame in streams[k]:
            outs[k].append(await batcher.push(decoders[k], [frame]))
        outs[k].append(await batcher.flush(decoders[k]))

    release = _hold(executor)
    tasks = [asyncio.create_task(one(k)) for k in range(4)]
    await asyncio.sleep(0.05)  # all four first pushes queue behind the busy worker
    release.set()
    await asyncio.gather(*tasks)
    for k in range(4):
        np.testing.assert_allclose(np.concatenate(outs[k]), alone[k], atol=2e-5, rtol=0)
    assert batcher.calls == 4 * (N + 1)
    assert batcher.runs < batcher.calls  # the queued calls shared runs


async def test_batcher_caps_the_frames_of_one_run(
    small_program: SnacProgram, executor: ThreadPoolExecutor
) -> None:
    batcher = DecodeBatcher(small_program, executor, max_frames=8)
    decoders = [ExactStreamingDecoder(small_program, frames_per_call=4) for _ in range(3)]
    release = _hold(executor)
    pushes = [asyncio.create_task(batcher.push(d, _frames(4, k))) for k, d in enumerate(decoders)]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(*pushes)
    assert (batcher.runs, batcher.calls) == (2, 3)  # 4 + 4 frames, then 4


async def test_batcher_errors_stay_with_their_stream(
    small_program: SnacProgram, executor: ThreadPoolExecutor
) -> None:
    batcher = DecodeBatcher(small_program, executor)
    good = ExactStreamingDecoder(small_program, frames_per_call=1)
    bad = ExactStreamingDecoder(small_program, frames_per_call=1)
    bad.stream.finished = True  # a stream that ended must not be decoded again
    release = _hold(executor)
    ok = asyncio.create_task(batcher.push(good, _frames(3, 0)))
    failing = asyncio.create_task(batcher.push(bad, _frames(3, 1)))
    await asyncio.sleep(0.05)
    release.set()
    assert (await ok).size == 3 * SAMPLES_PER_FRAME - small_program.delay
    with pytest.raises(ValueError, match="already ended"):
        await failing


async def test_a_cancelled_push_does_not_disturb_the_others(
    small_program: SnacProgram, executor: ThreadPoolExecutor
) -> None:
    batcher = DecodeBatcher(small_program, executor)
    a = ExactStreamingDecoder(small_program, frames_per_call=1)
    b = ExactStreamingDecoder(small_program, frames_per_call=1)
    release = _hold(executor)
    cancelled = asyncio.create_task(batcher.push(a, _frames(3, 0)))
    kept = asyncio.create_task(batcher.push(b, _frames(3, 1)))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    release.set()
    assert (await kept).size == 3 * SAMPLES_PER_FRAME - small_program.delay
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # The worker drained the queue and stopped: a later push starts a new drain.
    assert (await batcher.push(b, _frames(1, 2))).size == SAMPLES_PER_FRAME


async def test_batcher_rejects_a_bad_frame_without_keeping_part_of_the_push(
    small_program: SnacProgram, executor: ThreadPoolExecutor
) -> None:
    batcher = DecodeBatcher(small_program, executor)
    decoder = ExactStreamingDecoder(small_program, frames_per_call=8)
    with pytest.raises(InvalidTokenError):
        await batcher.push(decoder, [*_frames(2, 0), (1, 2, 3, 4, 5, 6, 4096)])
    assert decoder.frames_received == 0


def test_the_service_decodes_exactly_or_falls_back_to_windows(
    small: SnacCodec, caplog: pytest.LogCaptureFixture
) -> None:
    from voxlane.server.app import DecoderSettings, SpeechService
    from voxlane.server.codec import StreamingDecoder

    exact = SpeechService(None, small)
    with_attention = SpeechService(None, _small_snac(attn_window_size=8))
    try:
        assert isinstance(exact.new_decoder(DecoderSettings()), ExactStreamingDecoder)
        assert exact.decode_batcher is not None
        assert isinstance(exact.new_decoder(DecoderSettings(mode="window")), StreamingDecoder)
        # A SNAC the program cannot stream still serves, with the window decoder.
        assert isinstance(with_attention.new_decoder(DecoderSettings()), StreamingDecoder)
        assert with_attention.decode_batcher is None
        assert "window decoder" in caplog.text
    finally:
        exact.codec_executor.shutdown()
        with_attention.codec_executor.shutdown()
    with pytest.raises(OutOfRangeError):
        DecoderSettings(mode="fast")  # type: ignore[arg-type]


class _Recorded:
    """A FrameStream that remembers its frames."""

    def __init__(self, stream: Any, sink: list) -> None:
        self.stream, self.sink = stream, sink

    def __aiter__(self) -> Any:
        return self._run()

    async def _run(self) -> Any:
        async for frame in self.stream:
            self.sink.append(frame)
            yield frame

    def cancel(self) -> None:
        self.stream.cancel()


async def test_concurrent_turns_through_the_batcher_hear_their_own_frames(
    speech_service: Any,
) -> None:
    """Three real turns (engine, segmenter, pipeline) decode through one batcher at once: each
    turn's audio is exactly the full decode of its own frames, segment by segment."""
    from voxlane.server.app import DecoderSettings
    from voxlane.server.engine import SamplingParams
    from voxlane.server.pipeline import AudioChunk, TurnPipeline
    from voxlane.server.text.segmenter import Segmenter

    service = speech_service
    engine = service.engine
    batcher = service.decode_batcher
    runs, calls = batcher.runs, batcher.calls
    texts = ["Hello there, friend.", "A second voice speaks now.", "And a third one, quickly."]

    async def turn(k: int) -> tuple[np.ndarray, list[list]]:
        session = engine.open_session(engine.builtin_voice("tara"), window_segments=0)
        segments: list[list] = []
        params = SamplingParams(max_frames=12, seed=k)

        def speak(text: str) -> _Recorded:
            segments.append([])
            return _Recorded(session.generate(text, params), segments[-1])

        pipeline = TurnPipeline(
            speak=speak,
            new_decoder=lambda: service.new_decoder(DecoderSettings()),
            decode_executor=service.codec_executor,
            decode_batcher=batcher,
            segmenter=Segmenter(),
        )
        pipeline.push_text(texts[k])
        pipeline.end_text()
        pcm = [item.pcm async for item in pipeline.events() if isinstance(item, AudioChunk)]
        session.close()
        return np.concatenate(pcm), segments

    release = _hold(service.codec_executor)
    tasks = [asyncio.create_task(turn(k)) for k in range(3)]
    try:  # the turns' first decode calls queue behind the busy codec thread
        for _ in range(1000):
            if len(batcher._queue) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        release.set()
    results = await asyncio.gather(*tasks)
    for pcm, segments in results:
        expected = np.concatenate([service.codec.decode(frames) for frames in segments if frames])
        assert pcm.shape == expected.shape
        np.testing.assert_allclose(pcm, expected, atol=1e-4, rtol=0)
    assert batcher.runs - runs < batcher.calls - calls  # some runs carried several turns


# -- precision="bfloat16": the GEMMs in bfloat16, the rest in float32 --------------------------


def _snr_db(estimate: np.ndarray, target: np.ndarray) -> float:
    noise = np.sum((estimate.astype(np.float64) - target) ** 2)
    return float(10 * np.log10(np.sum(target.astype(np.float64) ** 2) / noise))


@pytest.fixture(scope="module")
def small_bf16(small: SnacCodec) -> SnacProgram:
    return SnacProgram(small, precision="bfloat16")


def test_bfloat16_keeps_lengths_and_lag(
    small: SnacCodec, small_program: SnacProgram, small_bf16: SnacProgram
) -> None:
    assert (small_bf16.precision, small_bf16.dtype) == ("bfloat16", torch.float32)
    assert small_bf16.delay == small_program.delay
    frames = _frames(N, 4)
    sizes = [1, 0, 3, 2, 5]
    fp32 = _run_pattern(small_program, frames, sizes)
    bf16 = _run_pattern(small_bf16, frames, sizes)
    assert [x.size for x in bf16] == [x.size for x in fp32]
    assert all(x.dtype == np.float32 for x in bf16)
    # The noise blocks' GEMMs run in bfloat16 too.
    small.noise = True
    try:
        noisy = SnacProgram(small, precision="bfloat16")
        out = np.concatenate(_run_pattern(noisy, frames, sizes))
        assert out.shape == (N * SAMPLES_PER_FRAME,) and np.isfinite(out).all()
    finally:
        small.noise = False


def test_bfloat16_is_close_to_the_full_decode_but_not_exact(demo_snac_dir: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codec = load_snac(demo_snac_dir, noise=False)
        program = SnacProgram(codec, precision="bfloat16")
        frames, other = _frames(12, 6), _frames(12, 7)
        full = codec.decode(frames)
        fp32 = np.concatenate(_run_pattern(SnacProgram(codec), frames, [8]))
        bf16 = np.concatenate(_run_pattern(program, frames, [8]))
        # The same frames split differently and batched with another stream.
        a, b = program.new_stream(), program.new_stream()
        outs = [program.run([(a, frames[:5], False), (b, other[:3], False)])[0]]
        outs.append(program.run([(b, other[3:], True), (a, frames[5:], True)])[1])
        batched = np.concatenate(outs)
    finally:
        torch.set_num_threads(threads)
    assert bf16.shape == batched.shape == full.shape
    assert _snr_db(fp32, full) > 100
    # ~39 dB on random codes (AMX and AVX512-BF16 alike): bfloat16 rounding, not exact.
    assert 30 < _snr_db(bf16, full) < 80
    assert not np.array_equal(bf16, fp32)
    # Batch invariance within bfloat16's error: ~45 dB apart with AMX (bit-exact without).
    assert _snr_db(batched, bf16) > 30 and _snr_db(batched, full) > 30


def test_bfloat16_batched_run_matches_separate_runs(small_bf16: SnacProgram) -> None:
    """Ragged batching keeps each stream's samples its own. Not bit for bit on AMX: oneDNN's
    AMX GEMMs round a few outputs differently with the rows per call (~45 dB apart here)."""
    streams = [_frames(N, s) for s in (30, 31, 32)]
    alone = [np.concatenate(_run_pattern(small_bf16, f, [3, 3, 3, 3])) for f in streams]
    states = [small_bf16.new_stream() for _ in streams]
    outs: list[list[np.ndarray]] = [[] for _ in streams]
    starts = [0, 0, 0]
    for plan in [(2, 0, 5), (4, 1, 3), (8, 6, 6)]:
        jobs = []
        for k, (state, n) in enumerate(zip(states, plan, strict=True)):
            jobs.append((state, streams[k][starts[k] : starts[k] + n], False))
            starts[k] += n
        for k, pcm in enumerate(small_bf16.run(jobs)):
            outs[k].append(pcm)
    finals = [(state, streams[k][starts[k] :], True) for k, state in enumerate(states)]
    for k, pcm in enumerate(small_bf16.run(finals)):
        outs[k].append(pcm)
    for k in range(3):
        batched = np.concatenate(outs[k])
        assert batched.shape == alone[k].shape
        assert _snr_db(batched, alone[k]) > 30  # ~145 dB here; another stream's: ~12 dB


@pytest.mark.parametrize("precision", ["float16", "bf16", "", None, 16])
def test_unknown_precision_is_out_of_range(small: SnacCodec, precision: Any) -> None:
    with pytest.raises(OutOfRangeError, match="precision must be one of 'float32', 'bfloat16'"):
        SnacProgram(small, precision=precision)


def test_bf16_supported_needs_bf16_matrix_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bf16_supported("meta") is False
    if not torch.cuda.is_available():
        assert bf16_supported("cuda") is False
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert bf16_supported() is True
    # AVX512-BF16 alone measured slower than float32: not counted.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert bf16_supported("cpu") is False
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch cannot tell
    assert bf16_supported() is False


@pytest.fixture(scope="module")
def real_program(demo_snac_dir: Path) -> Iterator[SnacProgram]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the codec's default (SpeechService)
    yield SnacProgram(load_snac(demo_snac_dir, noise=False))
    torch.set_num_threads(threads)


def _decode(program: SnacProgram, frames: list, sizes: list[int], **companion: Any) -> np.ndarray:
    """``frames`` decoded in runs of ``sizes`` frames; with ``other=`` frames, a second stream
    (``other_sizes``) rides in the same runs. Seeds: ``seed`` and ``other_seed``."""
    stream = program.new_stream(noise_seed=companion.get("seed"))
    other = companion.get("other")
    mate = program.new_stream(noise_seed=companion.get("other_seed"))
    out, i, j = [], 0, 0
    for k, n in enumerate(sizes):
        jobs = [(stream, frames[i : i + n], i + n >= len(frames))]
        if other is not None:
            m = companion["other_sizes"][k % len(companion["other_sizes"])]
            jobs.append((mate, other[j : j + m], False))
            j += m
        out.append(program.run(jobs)[0])
        i += n
    return np.concatenate(out)


def test_float32_samples_do_not_depend_on_how_the_frames_arrive(real_program) -> None:
    # Issue 22 item 2: MKL rounds a one-row product (and, for the first upsampler, products of
    # 192 rows and more) differently, so a stream pushed frame by frame drifted from one
    # decoded at once (~134 dB): same seed, not the same samples over the socket.
    frames, other = _frames(40, 8), _frames(60, 9)
    whole = _decode(real_program, frames, [40])  # 160 rows into the first upsampler
    assert np.array_equal(_decode(real_program, frames, [1] * 40), whole)
    mixed = [1, 2, 3, 5, 8, 1, 4, 7, 9]
    assert np.array_equal(_decode(real_program, frames, mixed), whole)
    batched = _decode(real_program, frames, mixed, other=other, other_sizes=[1, 3, 2])
    assert np.array_equal(batched, whole)


def test_seeded_noise_gives_the_same_samples_however_the_frames_arrive(real_program) -> None:
    # SNAC's noise blocks add randn * W x at inference: each stream draws its own noise, per
    # block and row, from its seed, so neither run sizes nor streams alongside change it.
    codec = real_program.codec
    frames, other = _frames(24, 8), _frames(40, 9)
    codec.noise = True
    try:
        whole = _decode(real_program, frames, [24], seed=5)
        ones = _decode(real_program, frames, [1] * 24, seed=5)
        mixed = [1, 2, 3, 5, 8, 5]
        batched = _decode(
            real_program, frames, mixed, seed=5, other=other, other_sizes=[2, 1], other_seed=6
        )
        reseeded = _decode(real_program, frames, [24], seed=6)
        unseeded = [_decode(real_program, frames, [24]) for _ in range(2)]
    finally:
        codec.noise = False
    quiet = _decode(real_program, frames, [24])
    assert np.array_equal(ones, whole) and np.array_equal(batched, whole)
    # The noise is there (not switched off by the seed), and another seed is other noise.
    assert _snr_db(whole, quiet) < 40 and _snr_db(reseeded, whole) < 40
    assert not np.array_equal(unseeded[0], unseeded[1])  # unseeded streams: fresh noise


def test_the_decoder_seeds_its_utterance_only(real_program) -> None:
    decoder = ExactStreamingDecoder(real_program)
    decoder.seed_noise(11)
    assert decoder.stream.noise_seed == 11
    decoder.push(_frames(8, 1))  # decodes: too late to seed this utterance now
    with pytest.raises(ValueError, match="started"):
        decoder.seed_noise(12)
    decoder.flush()
    assert decoder.stream.noise_seed is None  # the next utterance: random unless seeded
