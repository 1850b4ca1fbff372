"""SNAC streaming decode: exactness (SNR vs a full decode) and cost vs the Orpheus reference.

Window schemes (:class:`StreamingDecoder`, and the reference): every scheme decodes the same
random frames (demo SNAC, noise off), fed one frame at a time as a speech LM would produce them.
The reference scheme is the Orpheus streamer: once 4 frames are in, decode the last 4 and emit
the 2nd frame's samples (it never emits the first frame nor the last two; its SNR covers the
frames it emits). Cost: every window length the schemes decode is timed ``--repeats`` times,
interleaved in random order, and a scheme costs the sum of its windows' median times, per
second of audio it emits. Compare ratios from one run, not absolute times.

Exact schemes (:class:`ExactStreamingDecoder`, the server's default): decoded incrementally
layer by layer, so their cost is timed by running them: the whole stream pushed ``per_call``
frames at a time (1 = every frame as it arrives, the start of a turn; 8 = the steady state with
a playback buffer), and ``streams`` streams batched in one :meth:`SnacProgram.run` per push
(ragged batching across turns). Each exact scheme is run ``--repeats`` times interleaved with
the others, median wall time per second of audio emitted. The ``_bf16`` schemes run the
program with ``precision="bfloat16"`` (its GEMMs in bfloat16): their SNR is against the
float32 full decode, and their gain depends on the CPU (``bf16_supported`` in the output).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np

from voxlane.server.codec import DEFAULT_STREAMING, LOW_LATENCY_STREAMING
from voxlane.server.orpheus import FRAME_SIZE, SAMPLE_RATE, SAMPLES_PER_FRAME


def _setting(name: str, s: dict) -> tuple[str, int, int, int, int]:
    return name, s["left"], s["lookahead"], s["frames_per_call"], s.get("crossfade", 0)


# (name, left, lookahead, frames_per_call, crossfade); "reference" is special-cased.
SCHEMES: list[tuple[str, int, int, int, int]] = [
    ("reference", 1, 2, 1, 0),
    _setting("default", dict(DEFAULT_STREAMING)),
    _setting("low_latency", dict(LOW_LATENCY_STREAMING)),
    ("exact_3_3_8", 3, 3, 8, 0),
    ("2_2_4", 2, 2, 4, 0),
    ("2_2_16", 2, 2, 16, 0),
    ("1_1_8", 1, 1, 8, 0),
    ("2_1_8_xf512", 2, 1, 8, 512),
    ("2_0_8_no_crossfade", 2, 0, 8, 0),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=200, help="random frames to decode")
    parser.add_argument("--repeats", type=int, default=7, help="timings per window (median)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared box)"
    )
    parser.add_argument("--seed", type=int, default=0)


def _snr_db(estimate: np.ndarray, target: np.ndarray) -> float | None:
    """SNR in dB; None when the samples are identical (JSON has no infinity)."""
    noise = float(np.sum((estimate.astype(np.float64) - target) ** 2))
    signal = float(np.sum(target.astype(np.float64) ** 2))
    return round(10 * np.log10(signal / noise), 1) if noise > 0 else None


class _RecordingCodec:
    """Delegates to a codec and records the length of every decode window."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.windows: list[int] = []

    def decode(self, frames) -> np.ndarray:
        self.windows.append(len(frames))
        return self.codec.decode(frames)


def run(args: argparse.Namespace) -> dict:
    import torch

    from voxlane.server.codec import StreamingDecoder, load_snac
    from voxlane.server.demo import ensure_demo_snac
    from voxlane.server.snac_stream import bf16_supported

    torch.set_num_threads(args.threads)
    codec = load_snac(ensure_demo_snac(), noise=False)
    rng = np.random.default_rng(args.seed)
    frames = [tuple(int(c) for c in row) for row in rng.integers(0, 4096, (args.frames, 7))]
    full = codec.decode(frames)
    f = SAMPLES_PER_FRAME

    # 1. Run every scheme once, frames pushed one at a time: audio and decode windows.
    runs = {}
    for name, left, lookahead, per_call, crossfade in SCHEMES:
        rec = _RecordingCodec(codec)
        if name == "reference":
            out = [rec.decode(frames[i - 3 : i + 1])[f : 2 * f] for i in range(3, len(frames))]
            audio, first_frame, tokens = np.concatenate(out), 1, 4 * FRAME_SIZE
        else:
            dec = StreamingDecoder(
                rec,  # type: ignore[arg-type]
                left=left,
                lookahead=lookahead,
                frames_per_call=per_call,
                crossfade=crossfade,
            )
            out = [dec.push([frame]) for frame in frames]
            out.append(dec.flush())
            audio, first_frame, tokens = np.concatenate(out), 0, dec.first_audio_tokens
        runs[name] = (audio, first_frame, tokens, rec.windows)

    # 2. Time each window length used, interleaved in random order across repetitions
    # (a load spike on the shared box then hits every length alike), and take medians.
    # A scheme's cost is the sum of its windows' median decode times: decoding is all
    # that differs between schemes (the decoder's own bookkeeping is microseconds).
    lengths = sorted({w for *_, windows in runs.values() for w in windows})
    times: dict[int, list[float]] = {w: [] for w in lengths}
    shuffle = random.Random(args.seed)
    codec.decode(frames[:4])  # warm-up
    for _ in range(args.repeats):
        shuffle.shuffle(lengths)
        for w in lengths:
            start = shuffle.randrange(0, len(frames) - w + 1)
            t0 = time.perf_counter()
            codec.decode(frames[start : start + w])
            times[w].append(time.perf_counter() - t0)
    median = {w: statistics.median(ts) for w, ts in times.items()}

    schemes = []
    for name, left, lookahead, per_call, crossfade in SCHEMES:
        audio, first_frame, tokens, windows = runs[name]
        target = full[first_frame * f : first_frame * f + len(audio)]
        schemes.append(
            {
                "name": name,
                "left": left,
                "lookahead": lookahead,
                "frames_per_call": per_call,
                "crossfade": crossfade,
                "frames_emitted": len(audio) // f,
                "decode_calls": len(windows),
                "frames_decoded": sum(windows),
                "snr_db": _snr_db(audio, target),
                "cost_s_per_audio_s": sum(median[w] for w in windows) / (len(audio) / SAMPLE_RATE),
                "first_audio_tokens": tokens,
            }
        )
    ref_cost = schemes[0]["cost_s_per_audio_s"]
    for s in schemes:
        s["cost_vs_reference"] = round(s["cost_s_per_audio_s"] / ref_cost, 3)
        s["cost_s_per_audio_s"] = round(s["cost_s_per_audio_s"], 4)

    schemes += _exact_schemes(codec, frames, full, ref_cost, args)

    def summary(name: str) -> dict:
        s = next(s for s in schemes if s["name"] == name)
        return {k: s[k] for k in ("snr_db", "cost_vs_reference", "first_audio_tokens")}

    return {
        "default": summary("exact_8"),
        "exact_per_frame": summary("exact_1"),
        "exact_batched_4_streams_per_frame": summary("exact_1_x4"),
        "exact_bf16": summary("exact_8_bf16"),
        "exact_bf16_per_frame": summary("exact_1_bf16"),
        "bf16_supported": bf16_supported(),
        "window": summary("default"),
        "low_latency": summary("low_latency"),
        "schemes": schemes,
        "decode_s_by_window_frames": {str(w): round(median[w], 4) for w in sorted(median)},
        "frames": args.frames,
        "repeats": args.repeats,
        "threads": args.threads,
    }


# (per_call, streams, precision) of the exact schemes.
EXACT_SCHEMES = [
    (1, 1, "float32"),
    (8, 1, "float32"),
    (1, 4, "float32"),
    (8, 4, "float32"),
    (1, 1, "bfloat16"),
    (8, 1, "bfloat16"),
]
_SUFFIX = {"float32": "", "bfloat16": "_bf16"}


def _exact_schemes(codec, frames, full, ref_cost: float, args: argparse.Namespace) -> list[dict]:
    from voxlane.server.snac_stream import ExactStreamingDecoder, SnacProgram

    programs = {p: SnacProgram(codec, precision=p) for p in _SUFFIX}

    def one_run(per_call: int, streams: int, precision: str) -> tuple[float, np.ndarray]:
        program = programs[precision]
        states = [program.new_stream() for _ in range(streams)]
        out: list[np.ndarray] = []
        t0 = time.perf_counter()
        for i in range(0, len(frames), per_call):
            chunk = frames[i : i + per_call]
            out.append(program.run([(s, chunk, False) for s in states])[0])
        out.append(program.run([(s, [], True) for s in states])[0])
        return time.perf_counter() - t0, np.concatenate(out)

    for precision in programs:  # warm-up
        one_run(1, 1, precision)
    times: dict[tuple[int, int, str], list[float]] = {k: [] for k in EXACT_SCHEMES}
    audio: dict[tuple[int, int, str], np.ndarray] = {}
    order = list(EXACT_SCHEMES)
    shuffle = random.Random(args.seed + 1)
    for _ in range(args.repeats):
        shuffle.shuffle(order)
        for key in order:
            seconds, audio[key] = one_run(*key)
            times[key].append(seconds)
    rows = []
    for key in EXACT_SCHEMES:
        per_call, streams, precision = key
        program = programs[precision]
        pcm = audio[key]
        cost = statistics.median(times[key]) / (streams * len(pcm) / SAMPLE_RATE)
        rows.append(
            {
                "name": f"exact_{per_call}"
                + (f"_x{streams}" if streams > 1 else "")
                + _SUFFIX[precision],
                "frames_per_call": per_call,
                "streams": streams,
                "precision": precision,
                "frames_emitted": len(pcm) // SAMPLES_PER_FRAME,
                "snr_db": _snr_db(pcm, full),
                "cost_s_per_audio_s": round(cost, 4),
                "cost_vs_reference": round(cost / ref_cost, 3),
                "first_audio_tokens": ExactStreamingDecoder(program).first_audio_tokens,
                "delay_samples": program.delay,
            }
        )
    return rows
