"""The scripted decode step: the same numbers as the Python path, bit for bit."""

from __future__ import annotations

import pytest
import torch

from voxlane.server.engine.model import StepModel

from .conftest import tiny_llama


def _run(model: StepModel, steps: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three sequences of different lengths, decoded together for ``steps`` steps. Attention
    switches from SDPA to the GQA products at 128 keys: one sequence stays below, one crosses
    over during the steps, one is above throughout."""
    torch.manual_seed(1)
    caches = [model.new_cache(160) for _ in range(3)]
    for cache, length in zip(caches, (5, 126, 140), strict=True):
        model.forward(cache, torch.randint(0, 1000, (1, length)))
    hidden = []
    for step in range(steps):
        tokens = torch.tensor([130_000 + step, 140_000 + step, 150_000 + step])
        batch = caches if step % 2 == 0 else caches[1:]  # batch sizes 3 and 2
        hidden.append(model.decode_batch(batch, tokens[: len(batch)]))
    return hidden, [c.k[:, :, :, : c.length] for c in caches]


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_scripted_step_equals_the_python_step(quantize: str) -> None:
    # int8 through fbgemm: the default native kernel has its own step (test_native.py).
    kernel = "fbgemm" if quantize == "int8" else None
    scripted = StepModel(tiny_llama(seed=3), quantize=quantize, int8_kernel=kernel)
    python = StepModel(tiny_llama(seed=3), quantize=quantize, int8_kernel=kernel, scripted=False)
    assert scripted._scripted is not None and python._scripted is None
    h1, k1 = _run(scripted)
    h2, k2 = _run(python)
    for a, b in zip(h1 + k1, h2 + k2, strict=True):
        assert torch.equal(a, b)


def test_the_weight_only_kernel_keeps_the_python_path() -> None:
    model = StepModel(tiny_llama(), quantize="int8", int8_kernel="weight_only")
    assert model._scripted is None
    hidden, _ = _run(model, steps=1)
    assert hidden[0].shape == (3, 64) and torch.isfinite(hidden[0]).all()


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_scripted_heads_equal_the_python_heads(quantize: str) -> None:
    from types import SimpleNamespace

    from voxlane.server.engine import EngineConfig
    from voxlane.server.engine.core import EngineCore
    from voxlane.server.engine.model import Int8Linear

    from .conftest import fake_encode

    kernel = "fbgemm" if quantize == "int8" else None  # native int8: test_native.py
    model = StepModel(tiny_llama(seed=4), quantize=quantize, int8_kernel=kernel)
    core = EngineCore(model, fake_encode, EngineConfig(max_context=256, quantize=quantize))
    assert core._scripted_heads is not None
    assert isinstance(core._rows[0], Int8Linear) == (quantize != "none")  # int4 keeps int8 heads
    torch.manual_seed(2)
    # Two rows at position 0 (one of them with EOS legal), one at 3, one at 6.
    reqs = [
        SimpleNamespace(id=i, hidden=torch.randn(64), codes=[0] * position, frames=frames)
        for i, (position, frames) in enumerate([(0, 0), (0, 2), (3, 1), (6, 4)])
    ]
    scripted = core._heads(reqs)
    core._scripted_heads = None
    python = core._heads(reqs)
    assert [scripted[r.id].shape[0] for r in reqs] == [4096, 4097, 4096, 4096]
    for r in reqs:
        assert torch.equal(scripted[r.id], python[r.id])
