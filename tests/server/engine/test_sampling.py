"""FrameSampler: nucleus, temperature, repetition penalty window, seeds."""

from __future__ import annotations

import math
from collections import Counter

import torch

from voxlane.server.engine import SamplingParams
from voxlane.server.engine.sampling import FrameSampler


def logits_of(probs: dict[int, float], size: int = 4096) -> torch.Tensor:
    out = torch.full((size,), -1e4)
    for i, p in probs.items():
        out[i] = math.log(p)
    return out


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 2000) -> Counter[int]:
    sampler = FrameSampler(params)
    return Counter(sampler.sample(logits, 0) for _ in range(n))


def test_top_p_keeps_the_smallest_nucleus_and_frequencies_follow_probs() -> None:
    logits = logits_of({7: 0.5, 3000: 0.3, 42: 0.15, 9: 0.05})
    counts = draws(
        SamplingParams(temperature=1.0, top_p=0.7, repetition_penalty=1.0, seed=1), logits
    )
    assert set(counts) == {7, 3000}  # 0.5 < 0.7 <= 0.8: two tokens
    assert abs(counts[7] / 2000 - 0.5 / 0.8) < 0.05
    full = draws(SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=1), logits)
    assert set(full) == {7, 3000, 42, 9}
    assert abs(full[42] / 2000 - 0.15) < 0.04


def test_greedy_and_the_penalty_window() -> None:
    logits = logits_of({5: 0.6, 6: 0.4})
    sampler = FrameSampler(
        SamplingParams(temperature=0.0, repetition_penalty=2.0, repetition_window=2)
    )
    assert sampler.sample(logits, 0) == 5
    sampler.push_frame((5, 0, 0, 0, 0, 0, 0))  # 5 emitted at position 0: penalised there
    assert sampler.sample(logits, 0) == 6
    assert sampler.sample(logits_of({5: 0.6, 6: 0.4}), 1) == 5  # other position: untouched
    sampler.push_frame((1, 0, 0, 0, 0, 0, 0))
    sampler.push_frame((2, 0, 0, 0, 0, 0, 0))  # 5 left the 2-frame window
    assert sampler.sample(logits, 0) == 5


def test_seed_reproduces_and_differs() -> None:
    logits = torch.randn(4097, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> list[int]:
        sampler = FrameSampler(SamplingParams(seed=seed))
        return [sampler.sample(logits, 0) for _ in range(50)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_cpu_and_device_paths_draw_alike() -> None:
    """The numpy path (CPU logits) and the torch path (other devices) implement one rule: with
    the same seed they draw the same tokens (float rounding may flip a rare boundary draw)."""
    params = SamplingParams(seed=5)
    cpu, device = FrameSampler(params), FrameSampler(params)
    gen = torch.Generator().manual_seed(0)
    same = 0
    for step in range(300):
        logits = torch.randn(4097, generator=gen) * 3
        a = cpu._sample_numpy(logits.numpy(), step % 7)
        b = device._sample_torch(logits, step % 7)
        same += a == b
        frame = tuple(int(x) for x in torch.randint(0, 4096, (7,), generator=gen))
        cpu.push_frame(frame)
        device.push_frame(frame)
    assert same >= 297
