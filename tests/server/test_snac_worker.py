"""Exact streaming SNAC decoding in a child process (a real ``python -m`` child, demo SNAC)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from voxlane.errors import EngineError, ModelNotFoundError
from voxlane.server.codec import SnacCodec, load_snac
from voxlane.server.snac_stream import DecodeBatcher, ExactStreamingDecoder, SnacProgram
from voxlane.server.snac_worker import SnacWorkerProgram


def _frames(n: int, seed: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in row) for row in rng.integers(0, 4096, (n, 7))]


@pytest.fixture(scope="module")
def codec(demo_snac_dir: Path) -> Iterator[SnacCodec]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_snac(str(demo_snac_dir), noise=False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local(codec: SnacCodec) -> SnacProgram:
    return SnacProgram(codec)


@pytest.fixture(scope="module")
def worker(demo_snac_dir: Path, codec: SnacCodec) -> Iterator[SnacWorkerProgram]:
    with SnacWorkerProgram(str(demo_snac_dir), codec, threads=1) as program:
        yield program


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_ragged_runs_equal_the_in_process_program(
    worker: SnacWorkerProgram, local: SnacProgram
) -> None:
    """Same layers, same rows: the child's output is the in-process program's, bit for bit,
    for several streams pushed in different chunks, one of them ending mid-way."""
    assert worker.delay == local.delay
    frames = [_frames(9, seed) for seed in (1, 2, 3)]
    plans = [[(0, 3), (3, 4), (4, 9)], [(0, 1), (1, 6), (6, 9)], [(0, 5), (5, 9), None]]
    remote = [worker.new_stream() for _ in frames]
    mine = [local.new_stream() for _ in frames]
    got: list[list[np.ndarray]] = [[], [], []]
    want: list[list[np.ndarray]] = [[], [], []]
    for step in range(3):
        jobs_r, jobs_l, who = [], [], []
        for i, plan in enumerate(plans):
            if plan[step] is None:
                continue
            a, b = plan[step]
            final = b == 9
            jobs_r.append((remote[i], frames[i][a:b], final))
            jobs_l.append((mine[i], frames[i][a:b], final))
            who.append(i)
        for i, r, m in zip(who, worker.run(jobs_r), local.run(jobs_l), strict=True):
            got[i].append(r)
            want[i].append(m)
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate(got[i]), np.concatenate(want[i]))
        assert remote[i].finished and remote[i].frames_in == 9
        assert remote[i].samples_out == 9 * 2048
    assert worker.live_streams() == 0  # finished streams leave nothing behind in the child


def test_abandoned_streams_are_released_in_the_child(worker: SnacWorkerProgram) -> None:
    stream = worker.new_stream()
    worker.run([(stream, _frames(2, 5), False)])
    assert worker.live_streams() == 1
    del stream
    gc.collect()
    assert worker.live_streams() == 0


def test_finished_and_duplicate_streams_are_refused(worker: SnacWorkerProgram) -> None:
    stream = worker.new_stream()
    with pytest.raises(ValueError, match="twice"):
        worker.run([(stream, _frames(1, 1), False), (stream, _frames(1, 2), False)])
    worker.run([(stream, _frames(1, 1), True)])
    with pytest.raises(ValueError, match="already ended"):
        worker.run([(stream, _frames(1, 2), False)])


def test_noise_follows_the_parent_codec(worker: SnacWorkerProgram, codec: SnacCodec) -> None:
    frames = _frames(4, 7)
    quiet = worker.run([(worker.new_stream(), frames, True)])[0]
    codec.noise = True
    try:
        noisy = worker.run([(worker.new_stream(), frames, True)])[0]
    finally:
        codec.noise = False
    assert noisy.shape == quiet.shape
    assert not np.array_equal(noisy, quiet)
    np.testing.assert_array_equal(worker.run([(worker.new_stream(), frames, True)])[0], quiet)


def test_a_seeded_stream_has_the_same_noise_in_the_child(
    worker: SnacWorkerProgram, local: SnacProgram, codec: SnacCodec
) -> None:
    # Issue 22 item 2: the seed travels with the stream to the child, which draws the noise
    # exactly as the in-process program does (the parent's codec says whether noise is on).
    frames = _frames(6, 3)
    codec.noise = True
    try:
        here = local.run([(local.new_stream(noise_seed=21), frames, True)])[0]
        child = worker.new_stream(noise_seed=21)
        got = [worker.run([(child, frames[:2], False)])[0]]
        got.append(worker.run([(child, frames[2:], True)])[0])
        unseeded = worker.run([(worker.new_stream(), frames, True)])[0]
    finally:
        codec.noise = False
    np.testing.assert_array_equal(np.concatenate(got), here)
    assert not np.array_equal(unseeded, here)


async def test_decoders_and_the_batcher_run_through_the_child(
    worker: SnacWorkerProgram, codec: SnacCodec
) -> None:
    """The server's path (ExactStreamingDecoder + DecodeBatcher on a codec thread) over the
    child: two concurrent streams each get the full decode of their own frames."""
    frames = [_frames(6, 11), _frames(6, 12)]
    with ThreadPoolExecutor(1) as pool:
        batcher = DecodeBatcher(worker, pool)

        async def one(fr: list[tuple[int, ...]]) -> np.ndarray:
            decoder = ExactStreamingDecoder(worker, frames_per_call=2)
            parts = [await batcher.push(decoder, [f]) for f in fr]
            parts.append(await batcher.flush(decoder))
            return np.concatenate(parts)

        outs = await asyncio.gather(*(one(fr) for fr in frames))
    for fr, out in zip(frames, outs, strict=True):
        full = np.asarray(codec.decode(fr)).reshape(-1)
        assert out.shape == full.shape
        assert 10 * np.log10((full**2).sum() / ((full - out) ** 2).sum()) > 100


def test_a_dead_child_fails_its_streams_and_is_replaced(
    demo_snac_dir: Path, codec: SnacCodec, local: SnacProgram
) -> None:
    with SnacWorkerProgram(str(demo_snac_dir), codec, threads=1) as program:
        stream = program.new_stream()
        program.run([(stream, _frames(2, 1), False)])
        old = program.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        with pytest.raises(EngineError, match="exited"):
            program.run([(stream, _frames(1, 2), False)])
        assert stream.finished
        # The next run starts a new child; a new stream decodes as before.
        frames = _frames(3, 4)
        out = program.run([(program.new_stream(), frames, True)])[0]
        np.testing.assert_array_equal(out, local.run([(local.new_stream(), frames, True)])[0])
        assert program.starts == 2 and program.pid != old
        new = program.pid
    assert new is not None and not _alive(new)
    with pytest.raises(EngineError, match="closed"):
        program.run([(program.new_stream(), frames, True)])


def test_a_stream_of_a_replaced_child_is_refused(demo_snac_dir: Path, codec: SnacCodec) -> None:
    with SnacWorkerProgram(str(demo_snac_dir), codec, threads=1) as program:
        first, second = program.new_stream(), program.new_stream()
        program.run([(first, _frames(1, 1), False), (second, _frames(1, 2), False)])
        os.kill(program.pid or 0, signal.SIGKILL)
        with pytest.raises(EngineError):
            program.run([(first, _frames(1, 3), False)])
        # `second` was not in the failed run, but its state died with the child.
        with pytest.raises(EngineError, match="lost this stream"):
            program.run([(second, _frames(1, 3), False)])
        assert second.finished


def test_the_childs_load_error_reaches_the_caller(tmp_path: Path, codec: SnacCodec) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        SnacWorkerProgram(str(tmp_path), codec, threads=1)


async def test_the_service_decodes_in_a_child_it_stops_on_close(
    demo_lm_tiny_dir: Path, demo_snac_dir: Path
) -> None:
    from voxlane.errors import OutOfRangeError
    from voxlane.server.app import DecoderSettings, SpeechService
    from voxlane.server.engine import EngineConfig

    with pytest.raises(OutOfRangeError, match="codec_worker"):
        SpeechService.load(
            str(demo_lm_tiny_dir),
            str(demo_snac_dir),
            codec_worker="fork",  # type: ignore[arg-type]
        )
    service = await asyncio.to_thread(
        SpeechService.load,
        str(demo_lm_tiny_dir),
        str(demo_snac_dir),
        engine_config=EngineConfig(num_threads=1, max_context=1024),
        codec_threads=1,
    )
    try:
        program = service.snac_program
        assert isinstance(program, SnacWorkerProgram)
        pid = program.pid
        assert pid is not None and _alive(pid)
        decoder = service.new_decoder(DecoderSettings())
        frames = _frames(3, 9)
        out = await service.decode_batcher.push(decoder, frames)
        out = np.concatenate([out, await service.decode_batcher.flush(decoder)])
        assert out.size == 3 * 2048
    finally:
        await service.aclose()
    assert not _alive(pid)
