"""Speech LM engine: throughput vs HF generate, cloned-voice TTFA, memory over 10 min of audio.

All numbers come from one run; only ratios measured in the same run are meaningful (the box is
shared). Both sides of every comparison use the same thread count (``--threads``, default 1:
with other processes on 2 cores, 2 OpenMP threads spin against each other).

- ``tokens_per_s_vs_generate`` (``small``): engine tokens/s over HF ``model.generate`` on the
  same model and prompt, same number of new tokens (``min_new_tokens`` = ``max_new_tokens``),
  sampling on with the same temperature/top_p/repetition_penalty, its default DynamicCache and
  full 156,940-row head. Both timings include the prompt prefill; best of ``--repeats``.
- ``clone_ttfa_ratio`` (``small``): median time to first frame of a turn in a session whose
  voice is a cloned 15 s reference (176 frames, prefilled once beforehand) over the same with
  a built-in voice (no prefix). Each session plays ``--turns`` turns (window K=2, so later
  turns include the eviction); clone and built-in turns alternate so both see the same load.
- ``memory_growth_10min`` (``tiny``): VmRSS after 10 minutes of generated audio (7,032 frames)
  in one windowed session over VmRSS after the first minute.
- ``int8`` (``small``, a block): ``quantize="int8"`` against fp32 on two copies of the model.
  ``step_ms_fp32`` / ``step_ms_int8``: one decode step (single-token forward plus the legal-row
  head of its frame position, as the engine runs it) through :class:`StepModel`, rounds of
  ``--int8-steps`` steps alternating between the two, best round mean; ``int8_speedup`` their
  ratio (``_b2``: the same for a batched step of two streams). ``top1_agreement`` and
  ``logit_snr_db`` (pooled over steps): legal-row logits over ``--int8-tokens`` audio tokens
  after a real prompt, both models fed fp32's greedy sequence. ``frames_identical_prefix``:
  frames two engines (fp32, int8) sample for the same text and seed before their first
  differing frame, out of ``frames_compared``; ``_bf16``: the same for fp32 vs the
  checkpoint's bf16 weights, for scale (random weights give near-flat distributions). The
  same keys with ``_int4`` (``int4_vs_int8_speedup``: int8's step time over int4's) measure
  ``quantize="int4"`` in the same rounds. int8 runs the default kernel (``int8_kernel``:
  ``native`` where ``native.c`` builds); ``step_ms_int8_fbgemm`` is the same int8 weights
  through fbgemm and the TorchScript step, in the same rounds, and ``native_vs_fbgemm_speedup``
  fbgemm's step time over the default's (``_fbgemm``: its accuracy keys).

Raw numbers behind each ratio are in the output, plus the eviction measurement (re-prefill vs
RoPE re-index of a window, and the re-index logit drift) and the prefix copy vs prefill cost.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import math
import statistics
import time
from typing import Any

import torch

from voxlane.server.demo import ensure_demo_lm
from voxlane.server.engine import EngineConfig, SamplingParams, SpeechEngine
from voxlane.server.engine.model import StepModel
from voxlane.server.lm import load_speech_lm
from voxlane.server.orpheus import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    FRAME_SIZE,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    audio_token,
    finetuned_prompt,
)

TEXT = "Hey there, my name is Tara, and I am a speech model that talks for as long as you like."
TRANSCRIPT = "This is the reference recording that the cloned voice is built from, fifteen seconds."
FRAMES_PER_S = SAMPLE_RATE / SAMPLES_PER_FRAME  # 11.72


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    parser.add_argument("--frames", type=int, default=40, help="frames per throughput run")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs (best kept)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions per voice for TTFA")
    parser.add_argument("--turns", type=int, default=4, help="turns per session for TTFA")
    parser.add_argument("--minutes", type=float, default=10.0, help="audio for the memory run")
    parser.add_argument("--segment-frames", type=int, default=120, help="frames per segment")
    parser.add_argument("--int8-steps", type=int, default=21, help="decode steps per int8 round")
    parser.add_argument("--int8-rounds", type=int, default=5, help="int8 timing rounds (best)")
    parser.add_argument("--int8-tokens", type=int, default=210, help="teacher-forced tokens")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found")


def _reference(n: int) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 4096, (n, FRAME_SIZE), generator=gen)
    return [tuple(int(c) for c in row) for row in codes]


async def _throughput(engine: SpeechEngine, args: argparse.Namespace) -> dict[str, Any]:
    lm = engine.lm
    params = SamplingParams(max_frames=args.frames, seed=1)
    n_new = args.frames * FRAME_SIZE
    prompt = finetuned_prompt(lm.encode, "tara", TEXT)
    voice = engine.builtin_voice("tara")
    ids = torch.tensor([prompt])
    engine_s, generate_s = [], []
    for _ in range(args.repeats):  # interleaved, so both sides see the same box load
        session = engine.open_session(voice)
        t0 = time.perf_counter()
        frames = [f async for f in session.generate(TEXT, params)]
        engine_s.append(time.perf_counter() - t0)
        session.close()
        assert len(frames) == args.frames

        def run_generate() -> None:
            torch.set_num_threads(args.threads)
            with torch.inference_mode():
                out = lm.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    repetition_penalty=params.repetition_penalty,
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    pad_token_id=0,
                )
            assert out.shape[1] == len(prompt) + n_new

        t0 = time.perf_counter()
        await asyncio.to_thread(run_generate)  # the same kind of worker thread as the engine
        generate_s.append(time.perf_counter() - t0)
    eng_tps = n_new / min(engine_s)
    gen_tps = n_new / min(generate_s)
    return {
        "tokens_per_s_vs_generate": round(eng_tps / gen_tps, 3),
        "engine_tokens_per_s": round(eng_tps, 1),
        "generate_tokens_per_s": round(gen_tps, 1),
        "throughput_new_tokens": n_new,
        "throughput_prompt_tokens": len(prompt),
    }


async def _ttfa(engine: SpeechEngine, args: argparse.Namespace) -> dict[str, Any]:
    reference = _reference(176)  # 15 s
    t0 = time.perf_counter()
    clone = await engine.clone_voice(TRANSCRIPT, reference)
    clone_prefill_s = time.perf_counter() - t0
    builtin = engine.builtin_voice("tara")
    texts = ["Sure, let me check that.", "It is sunny today.", "Anything else?", "Bye now."]
    result: dict[str, list[float]] = {"clone": [], "none": []}
    for _ in range(args.sessions):
        sessions = {
            "none": engine.open_session(builtin, window_segments=2),
            "clone": engine.open_session(clone, window_segments=2),
        }
        for turn in range(args.turns):
            order = ("none", "clone") if turn % 2 == 0 else ("clone", "none")
            for name in order:  # interleaved, alternating: both see the same box load
                stream = sessions[name].generate(
                    texts[turn % len(texts)], SamplingParams(max_frames=12, seed=turn)
                )
                t0 = time.perf_counter()
                async for _ in stream:
                    result[name].append(time.perf_counter() - t0)
                    break
                [f async for f in stream]  # let the turn finish so it joins the context
        for session in sessions.values():
            session.close()
    clone_ms = statistics.median(result["clone"]) * 1e3
    none_ms = statistics.median(result["none"]) * 1e3
    return {
        "clone_ttfa_ratio": round(clone_ms / none_ms, 3),
        "ttfa_clone_ms": round(clone_ms, 1),
        "ttfa_none_ms": round(none_ms, 1),
        "clone_prefix_tokens": len(clone.prefix_tokens),
        "clone_prefill_once_ms": round(clone_prefill_s * 1e3, 1),
    }


def _eviction_costs(lm: Any, threads: int) -> dict[str, Any]:
    """Evicting one 120-frame segment from [15 s prefix][4 segments]: re-index vs re-prefill."""
    torch.set_num_threads(threads)
    sm = StepModel(lm.model)
    gen = torch.Generator().manual_seed(3)
    prefix, seg = 1230, 900
    tokens = torch.randint(0, sm.vocab_size, (1, prefix + 4 * seg), generator=gen)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        full = sm.new_cache(8192)
        sm.forward(full, tokens)
        prefix_cache = sm.new_cache(prefix)
        sm.forward(prefix_cache, tokens[:, :prefix])
        session = sm.new_cache(8192)
        t0 = time.perf_counter()
        session.load(prefix_cache.k, prefix_cache.v)
        out["prefix_copy_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        t0 = time.perf_counter()
        sm.evict(full, prefix, prefix + seg)
        out["evict_reindex_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        fresh = sm.new_cache(8192)
        fresh.load(prefix_cache.k, prefix_cache.v)
        t0 = time.perf_counter()
        sm.forward(fresh, tokens[:, prefix + seg :])
        out["evict_reprefill_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        nxt = torch.tensor([[128261]])
        a = sm.forward(full, nxt)[0, -1] @ sm.head_weight.T
        b = sm.forward(fresh, nxt)[0, -1] @ sm.head_weight.T
        out["evict_reindex_logit_max_abs_diff"] = float(f"{(a - b).abs().max().item():.3g}")
    return out


def _legal_heads(sm: StepModel) -> list[Any]:
    starts = [AUDIO_TOKEN_BASE + p * CODEBOOK_SIZE for p in range(FRAME_SIZE)]
    return [sm.head_slice(s, s + CODEBOOK_SIZE) for s in starts]


def _quantized_steps(
    fp32: Any, int8: Any, int4: Any, fbgemm: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Decode-step time of fp32, int8 (the default kernel: native where it builds), int4 and
    fbgemm-int8 StepModels, and the quantized models' logits vs fp32's (greedy, teacher-forced).
    int8's keys have no suffix, int4's end in ``_int4``."""
    torch.set_num_threads(args.threads)
    models = {
        "fp32": StepModel(fp32.model),
        "int8": StepModel(int8.model, quantize="int8"),
        "int4": StepModel(int4.model, quantize="int4"),
        "fbgemm": StepModel(fbgemm.model, quantize="int8", int8_kernel="fbgemm"),
    }
    kernel = models["int8"]._fused[0].wqkv.kernel  # type: ignore[index,union-attr]
    heads = {name: _legal_heads(sm) for name, sm in models.items()}
    prompt = torch.tensor([finetuned_prompt(fp32.encode, "tara", TEXT)])
    n_prompt = prompt.shape[1]
    out: dict[str, Any] = {}
    with torch.inference_mode():
        # Timing: B = 1 and B = 2 (two sessions at different lengths), rounds alternating.
        steps, rounds = args.int8_steps, args.int8_rounds
        capacity = n_prompt + 16 + rounds * steps + 1
        caches = {}
        for name, sm in models.items():
            caches[name] = [sm.new_cache(capacity) for _ in range(3)]
            for i, cache in enumerate(caches[name]):
                sm.forward(cache, prompt[:, : n_prompt - 8 * (i % 2)])
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, sm in models.items():
                one, *two = caches[name]
                for batch, key in (([one], name), (two, f"{name}_b2")):
                    t0 = time.perf_counter()
                    for i in range(steps):
                        token = torch.full(
                            (len(batch),), AUDIO_TOKEN_BASE + i % FRAME_SIZE * CODEBOOK_SIZE
                        )
                        if len(batch) == 1:
                            hidden = sm.forward(batch[0], token.view(1, 1))[:, -1]
                        else:
                            hidden = sm.decode_batch(batch, token)
                        heads[name][(i + 1) % FRAME_SIZE](hidden)
                    ms = (time.perf_counter() - t0) * 1e3 / steps
                    best[key] = min(best.get(key, float("inf")), ms)
        for key in ("", "_b2"):
            out[f"step_ms_fp32{key}"] = round(best[f"fp32{key}"], 2)
            for q in ("int8", "int4"):
                out[f"step_ms_{q}{key}"] = round(best[f"{q}{key}"], 2)
                out[f"{q}_speedup{key}"] = round(best[f"fp32{key}"] / best[f"{q}{key}"], 3)
            out[f"int4_vs_int8_speedup{key}"] = round(best[f"int8{key}"] / best[f"int4{key}"], 3)
            out[f"step_ms_int8_fbgemm{key}"] = round(best[f"fbgemm{key}"], 2)
            out[f"native_vs_fbgemm_speedup{key}"] = round(
                best[f"fbgemm{key}"] / best[f"int8{key}"], 3
            )
        out["int8_kernel"] = kernel
        # Accuracy: every model fed fp32's greedy legal token.
        n = args.int8_tokens
        cache = {name: sm.new_cache(n_prompt + n) for name, sm in models.items()}
        hidden = {name: sm.forward(cache[name], prompt)[:, -1] for name, sm in models.items()}
        stats = {
            q: {"agree": 0, "signal": 0.0, "noise": 0.0, "cos": 1.0}
            for q in ("int8", "int4", "fbgemm")
        }
        for i in range(n):
            a = heads["fp32"][i % FRAME_SIZE](hidden["fp32"])[0]
            for q, st in stats.items():
                b = heads[q][i % FRAME_SIZE](hidden[q])[0]
                st["agree"] += int(a.argmax() == b.argmax())
                st["signal"] += a.double().pow(2).sum().item()
                st["noise"] += (a - b).double().pow(2).sum().item()
                cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
                st["cos"] = min(st["cos"], cos)
            token = torch.tensor([[audio_token(int(a.argmax()), i % FRAME_SIZE)]])
            hidden = {name: sm.forward(cache[name], token)[:, -1] for name, sm in models.items()}
    for q, st in stats.items():
        suffix = "" if q == "int8" else f"_{q}"
        out[f"top1_agreement{suffix}"] = round(st["agree"] / n, 4)
        out[f"logit_snr_db{suffix}"] = round(10 * math.log10(st["signal"] / st["noise"]), 2)
        out[f"logit_cosine_min{suffix}"] = round(st["cos"], 5)
    out["teacher_forced_tokens"] = n
    return out


async def _frames(engine: SpeechEngine, frames: int) -> list[tuple[int, ...]]:
    session = engine.open_session(engine.builtin_voice("tara"))
    params = SamplingParams(max_frames=frames, seed=1)
    out = [f async for f in session.generate(TEXT, params)]
    session.close()
    return out


def _same_prefix(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def _int8(fp32_engine: SpeechEngine, args: argparse.Namespace) -> dict[str, Any]:
    path = ensure_demo_lm("small")
    reference = await _frames(fp32_engine, args.frames)
    block: dict[str, Any] = {}
    # The same comparison for the checkpoint's own bf16 weights (a change nobody objects to):
    # on a random-weight model the legal distributions are nearly flat, so any perturbation
    # reorders near-tied tokens and the sampled frames part at once.
    for key, dtype, quantize in (
        ("", "float32", "int8"),
        ("_int4", "float32", "int4"),
        ("_bf16", "bfloat16", "none"),
    ):
        lm = await asyncio.to_thread(load_speech_lm, path, dtype=dtype)
        config = EngineConfig(num_threads=args.threads, quantize=quantize)  # type: ignore[arg-type]
        engine = SpeechEngine(lm, config)
        engine.start()
        try:
            block[f"frames_identical_prefix{key}"] = _same_prefix(
                reference, await _frames(engine, args.frames)
            )
        finally:
            await engine.aclose()
    block["frames_compared"] = len(reference)
    load = functools.partial(load_speech_lm, path, dtype="float32")
    fp32, int8, int4, fbgemm = [await asyncio.to_thread(load) for _ in range(4)]
    block |= await asyncio.to_thread(_quantized_steps, fp32, int8, int4, fbgemm, args)
    return block


async def _memory(args: argparse.Namespace) -> dict[str, Any]:
    lm = await asyncio.to_thread(load_speech_lm, ensure_demo_lm("tiny"), dtype="float32")
    engine = SpeechEngine(lm, EngineConfig(num_threads=args.threads, window_segments=4))
    engine.start()
    try:
        total = round(args.minutes * 60 * FRAMES_PER_S)
        one_minute = total // 10  # the first minute of a 10-minute run
        session = engine.open_session(engine.builtin_voice("tara"))
        frames = 0
        rss_1min = None
        segments = 0
        t0 = time.perf_counter()
        while frames < total:
            n = min(args.segment_frames, total - frames)
            stream = session.generate(f"{TEXT} ({segments})", SamplingParams(max_frames=n))
            async for _ in stream:
                frames += 1
                if frames == one_minute:
                    gc.collect()
                    rss_1min = _rss_mib()
            segments += 1
        elapsed = time.perf_counter() - t0
        gc.collect()
        rss_end = _rss_mib()
        session.close()
    finally:
        await engine.aclose()
    assert rss_1min is not None
    return {
        "memory_growth_10min": round(rss_end / rss_1min, 3),
        "rss_after_1min_mib": round(rss_1min, 1),
        "rss_after_10min_mib": round(rss_end, 1),
        "memory_frames": frames,
        "memory_segments": segments,
        "memory_run_s": round(elapsed, 1),
        "memory_audio_s": round(frames / FRAMES_PER_S, 1),
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    result = await _memory(args)  # first: nothing freed by the other runs can mask growth
    small = await asyncio.to_thread(load_speech_lm, ensure_demo_lm("small"), dtype="float32")
    engine = SpeechEngine(small, EngineConfig(num_threads=args.threads))
    engine.start()
    try:
        warm = engine.open_session(engine.builtin_voice("tara"))
        [f async for f in warm.generate("warm up", SamplingParams(max_frames=2))]
        warm.close()
        result |= await _throughput(engine, args)
        result |= await _ttfa(engine, args)
        result["int8"] = await _int8(engine, args)
    finally:
        await engine.aclose()
    result |= await asyncio.to_thread(_eviction_costs, small, args.threads)
    result["threads"] = args.threads
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_main(args))
