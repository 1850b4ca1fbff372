"""Many streams at once: batched-decode throughput, real-time streams, first audio under load.

Everything runs on the ``--model`` demo LM (default ``small``), its layer weights in
``--quantize`` (default int8; ``python -m bench engine`` reports what int8 changes in the
logits and frames), and the demo SNAC, decoded exactly in a child process (``--codec-worker``,
default ``process`` as ``voxlane serve``) with its matrix products in ``--codec-precision``
(default ``auto`` as ``voxlane serve``: bfloat16 where the CPU has AMX, float32 elsewhere, where
bf16 products are slower; ``codec_snr_db`` is what bfloat16 changes: its decode of 32 random
frames against the float32 one). The JSON names the host (``cpu``, ``cores``, ``cpu_flags``,
``native_step``) and the settings chosen for it (``codec_precision``). The server's turns are
paced (``--pace-ahead``, default 1 s: ``EngineConfig.pace_ahead_s``, ``voxlane serve
--pace-ahead 1``): a turn whose listener holds more than a second of audio waits, leaving the
CPU to the codec and the other turns; ``--pace-ahead 0`` turns it off. The throughput part runs
engine sessions without a listener, which are never paced. The engine thread and the codec get
``--threads`` torch threads each. Only ratios from one run mean anything (the box is shared).

- ``tokens_per_s``: aggregate audio tokens/s of the engine alone (no SNAC) with 1, 2, 4 and 8
  streams started together, each generating ``--frames`` frames of its own text and seed (a
  stream's consumer takes every frame at once). Wall time from the first ``generate`` to the
  last frame, prefill included; the counts are interleaved ``--rounds`` times and each keeps
  its best round (load from other processes only ever slows a round down).
  ``throughput_8_vs_1`` is 8 streams over 1. ``lm_realtime_streams``: the largest of those
  counts whose frames (engine alone, no SNAC) all arrived before a listener playing from each
  stream's first frame needed them, in some round.
- ``realtime_streams``: the most turns started together (1, 2, 3, ...) that the whole server
  path keeps real time: :class:`TurnPipeline` per turn (segmenter, engine, streaming SNAC
  decoder batched across turns on the shared codec worker, 40 ms chunks), counting the
  underruns of ``turn.done`` (a client that starts playing once it holds 120 ms, the SDK
  Player's default lead) over ``--repeats`` runs at each count: a count is real time only if
  every one of its runs is clean. The first count with an underrun stops the search.
- ``first_audio_p50_ms`` / ``first_audio_p95_ms`` / ``rtf_at_load``: first text to first
  chunk, and the worst real-time factor, of the turns of the last real-time count (its
  ``--repeats`` runs pooled; with pacing on, ``rtf_at_load`` measures the pacing as well).
- ``capacity_estimate``: the streams the engine's own measurement (calibration plus live
  steps, ``realtime_headroom`` 1.0) says it keeps real time, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from voxlane.server.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME

FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE
TEXT = "Hey there, my name is Tara, and I am a speech model that talks to many people at once"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.common import add_service_arguments

    add_service_arguments(parser, quantize="int8", codec_precision="auto", pace_ahead=1.0)
    parser.add_argument("--frames", type=int, default=24, help="frames per throughput stream")
    parser.add_argument("--turn-frames", type=int, default=48, help="frames per real-time turn")
    parser.add_argument("--max-streams", type=int, default=8, help="real-time search bound")
    parser.add_argument("--repeats", type=int, default=2, help="runs per load (all must be clean)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--seed", type=int, default=1)


async def _throughput(engine: Any, n: int, frames: int, seed: int) -> dict[str, float]:
    from voxlane.server.engine import SamplingParams

    voice = engine.builtin_voice("tara")
    sessions = [engine.open_session(voice, window_segments=0) for _ in range(n)]

    async def one(i: int) -> tuple[int, int]:
        params = SamplingParams(max_frames=frames, seed=seed + i)
        count, stalls, start = 0, 0, 0.0
        async for _ in sessions[i].generate(f"{TEXT} number {i}.", params):
            now = time.perf_counter()
            if count == 0:
                start = now
            elif now > start + count * FRAME_SECONDS:  # the listener ran dry: it stalls
                stalls += 1
                start = now - count * FRAME_SECONDS
            count += 1
        return count, stalls

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    for s in sessions:
        s.close()
    total = sum(c for c, _ in results)
    return {
        "streams": n,
        "frames": total,
        "wall_s": wall,
        "tokens_per_s": 7 * total / wall,
        "lm_underruns": sum(u for _, u in results),
    }


async def _turns(service: Any, n: int, frames: int, seed: int) -> list[dict[str, Any]]:
    from voxlane.server.app import DecoderSettings
    from voxlane.server.engine import SamplingParams
    from voxlane.server.pipeline import TurnPipeline
    from voxlane.server.text.segmenter import Segmenter

    engine = service.engine
    settings = DecoderSettings()

    async def one(i: int) -> dict[str, Any]:
        session = engine.open_session(engine.builtin_voice("tara"), window_segments=0)
        params = SamplingParams(max_frames=frames, seed=seed + i)
        pipeline = TurnPipeline(
            speak=lambda text: session.generate(text, params),
            new_decoder=lambda: service.new_decoder(settings),
            decode_executor=service.codec_executor,
            decode_batcher=service.decode_batcher,
            segmenter=Segmenter(),
        )
        pipeline.push_text(f"{TEXT} number {i}.")
        pipeline.end_text()
        async for _ in pipeline.events():
            pass
        session.close()
        return pipeline.metrics.as_dict()

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _codec_snr_db(codec: Any, precision: str, seed: int) -> float:
    """What ``precision`` changes in the exact decoder's audio: SNR (dB) of its decode of 32
    random frames against the float32 decode of the same frames."""
    import numpy as np

    from voxlane.server.snac_stream import SnacProgram

    frames = np.random.default_rng(seed).integers(0, 4096, (32, 7))
    ref, out = (
        (p := SnacProgram(codec, precision=prec)).run([(p.new_stream(), frames, True)])[0]
        for prec in ("float32", precision)
    )
    return round(float(10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum())), 1)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from bench.common import host_info, service_from_args

    service = service_from_args(args, max_context=2048)
    engine = service.engine
    precision = service.codec_precision  # what --codec-precision (auto) chose on this host
    result: dict[str, Any] = {
        **host_info(),
        "model": args.model,
        "threads": args.threads,
        "quantize": args.quantize,
        "codec_worker": args.codec_worker,
        "codec_precision": precision,
        "codec_precision_arg": args.codec_precision,
        "pace_ahead_s": args.pace_ahead if args.pace_ahead and args.pace_ahead > 0 else None,
    }
    try:
        if precision != "float32":
            result["codec_snr_db"] = await asyncio.to_thread(
                _codec_snr_db, service.codec, precision, args.seed
            )
        await _throughput(engine, 1, 4, args.seed)  # warm-up
        runs: dict[int, dict[str, float]] = {}
        lm_realtime = 0
        for _ in range(args.rounds):
            for n in (1, 2, 4, 8):
                r = await _throughput(engine, n, args.frames, args.seed)
                if r["lm_underruns"] == 0:
                    lm_realtime = max(lm_realtime, n)
                if n not in runs or r["tokens_per_s"] > runs[n]["tokens_per_s"]:
                    runs[n] = r
        rate = {n: r["tokens_per_s"] for n, r in runs.items()}
        result["throughput"] = list(runs.values())
        result["tokens_per_s"] = {str(k): round(v, 1) for k, v in rate.items()}
        result["throughput_8_vs_1"] = round(rate[8] / rate[1], 2)
        result["lm_realtime_streams"] = lm_realtime

        engine._core.calibrate()
        result["capacity_estimate"] = engine._core.stats.capacity(1.0)
        result["step_ms_by_batch"] = {
            str(b): round(t * 1000, 2) for b, t in sorted(engine._core.stats.seconds.items())
        }

        await _turns(service, 1, 8, args.seed)  # warm-up of the codec path
        best, best_metrics, searched = 0, [], []
        for n in range(1, args.max_streams + 1):
            metrics = []
            for _ in range(args.repeats):  # every run at a load must be clean, not just one
                metrics += await _turns(service, n, args.turn_frames, args.seed)
            underruns = sum(m["underruns"] for m in metrics)
            searched.append({"streams": n, "underruns": underruns})
            if underruns:
                break
            best, best_metrics = n, metrics
        result["realtime_search"] = searched
        result["realtime_streams"] = best
        if best:
            ttfa = [m["ttfa_s"] * 1000 for m in best_metrics if m["ttfa_s"] is not None]
            result["first_audio_p50_ms"] = round(statistics.median(ttfa), 1)
            result["first_audio_p95_ms"] = round(_pct(ttfa, 0.95), 1)
            result["rtf_at_load"] = round(max(m["rtf"] or 0.0 for m in best_metrics), 3)
    finally:
        await service.aclose()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_main(args))
