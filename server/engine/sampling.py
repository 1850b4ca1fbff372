"""Frame-constrained sampling: only the legal rows of the LM head are ever computed.

At frame position ``p`` the legal tokens are the 4,096 audio tokens of ``p`` — a contiguous
slice of ``lm_head.weight`` — plus END_OF_SPEECH when ``p == 0`` and at least one frame has
been emitted. The sampler sees ``4096`` (or ``4097``) logits, so an illegal token cannot be
drawn whatever the weights are.
"""

from __future__ import annotations

import os
from collections import deque

import numpy as np
import torch
from torch import Tensor

from voxlane.server.orpheus import CODEBOOK_SIZE, Frame

from .config import SamplingParams

__all__ = ["EOS_INDEX", "FrameSampler", "segment_seed"]

#: Index of END_OF_SPEECH in the sampler's logits when it is legal (after the 4,096 codes).
EOS_INDEX = CODEBOOK_SIZE


_MASK64 = (1 << 64) - 1


def segment_seed(seed: int, index: int) -> int:
    """The seed of segment ``index`` of a stream seeded with ``seed`` (a 63-bit integer).

    Each segment gets its own random sequence (the same seed for every segment would replay
    the same draws in each), and the same ``(seed, index)`` always gives the same one, in any
    process (SplitMix64's finaliser; Python's ``hash`` is salted per process)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class FrameSampler:
    """Per-segment sampling state: its RNG and the recent frames the penalty looks at."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.recent: deque[Frame] = deque(maxlen=params.repetition_window)

    def push_frame(self, frame: Frame) -> None:
        """Remember an emitted frame for the repetition penalty."""
        self.recent.append(frame)

    def sample(self, logits: Tensor, position: int) -> int:
        """Draw an index from ``logits`` (``[4096]`` or ``[4097]``, float) at ``position``.

        Returns a code (``0..4095``) or :data:`EOS_INDEX`.
        """
        if logits.device.type == "cpu":
            return self._sample_numpy(logits.detach().float().numpy(), position)
        return self._sample_torch(logits.float(), position)

    def _sample_numpy(self, logits: np.ndarray, position: int) -> int:
        # The same rule as _sample_torch in numpy: on 4k floats numpy's calls cost a few µs
        # where torch's cost tens, and this runs once per token per stream.
        p = self.params
        if p.repetition_penalty != 1.0 and self.recent:
            seen = np.fromiter({f[position] for f in self.recent}, dtype=np.int64)
            logits = logits.copy()
            vals = logits[seen]
            logits[seen] = np.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits / np.float32(p.temperature)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        u = float(torch.rand(1, generator=self.generator))  # one uniform from the request's RNG
        if p.top_p >= 1.0:
            cum = np.cumsum(probs)
            return min(int(np.searchsorted(cum, u * float(cum[-1]), side="right")), len(cum) - 1)
        # Nucleus: the shortest prefix of the tokens sorted by probability (ties in index order,
        # a stable sort) whose mass reaches top_p, then an inverse-CDF draw over that prefix.
        # Sorting the values alone (SIMD) and finding the drawn token afterwards costs a
        # third of an argsort of 4,096 floats; the draw is the same.
        desc = np.sort(probs)[::-1]
        cum = np.cumsum(desc)
        n = min(int(np.searchsorted(cum, np.float32(p.top_p))) + 1, len(cum))
        j = min(int(np.searchsorted(cum[:n], u * float(cum[n - 1]), side="right")), n - 1)
        value = desc[j]
        rank = j - int(np.count_nonzero(probs > value))  # among the tokens of equal probability
        return int(np.flatnonzero(probs == value)[rank])

    def _sample_torch(self, logits: Tensor, position: int) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and self.recent:
            seen = torch.tensor(
                sorted({f[position] for f in self.recent}), dtype=torch.long, device=logits.device
            )
            vals = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if p.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        order: Tensor | None = None
        if p.top_p < 1.0:
            probs, order = torch.sort(probs, descending=True, stable=True)
        cum = torch.cumsum(probs, dim=-1)
        n = probs.shape[0]
        if order is not None:
            n = min(int(torch.searchsorted(cum, torch.tensor([p.top_p], device=cum.device))) + 1, n)
        u = torch.rand(1, generator=self.generator, device=cum.device) * cum[n - 1]
        index = min(int(torch.searchsorted(cum[:n], u, right=True)), n - 1)
        return int(order[index]) if order is not None else index
