"""The native decode step (``native.c`` through ``native.py``): its int8 product, its whole
step against the fbgemm/TorchScript one and against single forwards, its heads, its errors,
its build cache and its fallback."""

from __future__ import annotations

import copy
import ctypes
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from voxlane.errors import EngineError
from voxlane.server.engine import EngineConfig, native
from voxlane.server.engine.core import EngineCore
from voxlane.server.engine.model import Int8Linear, StepModel

from .conftest import fake_encode, tiny_llama
from .test_scripted import _run


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the engine uses fbgemm and TorchScript")
    built = native.library()
    assert built is not None, "a C compiler is present but native.c did not build (see the log)"
    return built


@pytest.fixture(scope="module")
def generic_lib(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The portable kernel, built beside the default one."""
    return native._bind(ctypes.CDLL(str(native._build(generic=True))))


def _reference_int8(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The native product recomputed in torch, step by step: int8 weights per row, uint8
    activations per row over [min, max], an exact integer product, then the scales."""
    scale = w.abs().amax(1).clamp_min(1e-30) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127)
    lo = x.amin(-1, keepdim=True)
    span = (x.amax(-1, keepdim=True) - lo).clamp_min(1e-30)
    a = ((x - lo) * (255 / span)).round()
    acc = (a.double() @ q.double().T).float()  # exact: every sum is an integer below 2^31
    return acc * (scale * (span / 255)) + lo * (q.sum(1) * scale)


def test_native_product_is_the_quantized_product(lib: ctypes.CDLL) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=gen) * 0.05
    w[7] = 0.0
    # 1..9 rows: every row-tile size of the kernel (1-4) and more than one tile.
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, 160, generator=gen) * 3
        x[0] = 0.25  # a constant row maps to 0 and comes back exactly
        y = Int8Linear(w, "native")(x)
        ref = _reference_int8(w, x)
        assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
        assert torch.equal(y[:, 7], torch.zeros(m))


def test_generic_and_vnni_kernels_agree_bit_for_bit(lib, generic_lib) -> None:
    # The VNNI tiles and the portable C loops compute the same integer sums, and the float
    # code around them is the same source: identical hidden states.
    if not lib.vx_has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI: both builds are the portable kernel")
    assert generic_lib.vx_has_vnni() == 0
    model = StepModel(tiny_llama(seed=5), quantize="int8")
    assert model._native is not None
    steps = {"vnni": model._native, "generic": native.NativeStep(generic_lib, model)}
    out = {}
    for name, step in steps.items():
        torch.manual_seed(3)
        caches = [model.new_cache(64) for _ in range(3)]
        for c, n in zip(caches, (3, 20, 41), strict=True):
            c.reserve(n + 1)
            model.forward(c, torch.randint(0, 1000, (1, n)))
        tokens = torch.tensor([5, 600, 150_000])
        out[name] = step.decode(caches, tokens, [c.length for c in caches])
    assert torch.equal(out["vnni"], out["generic"])


def test_native_step_tracks_the_fbgemm_step(lib) -> None:
    native_model = StepModel(tiny_llama(seed=3), quantize="int8")
    fbgemm_model = StepModel(tiny_llama(seed=3), quantize="int8", int8_kernel="fbgemm")
    reference = StepModel(tiny_llama(seed=3))  # float32
    assert native_model._native is not None and native_model._scripted is None
    assert fbgemm_model._native is None and fbgemm_model._scripted is not None
    a, b, ref = (_run(m, steps=5)[0] for m in (native_model, fbgemm_model, reference))
    for x, y, r in zip(a, b, ref, strict=True):
        # Same quantization scheme, different rounding of the activations' scale now and
        # then: the two int8 steps are much closer to each other than to float32.
        assert (x - y).abs().max().item() < 0.02
        snr = 10 * torch.log10(r.pow(2).mean() / (x - r).pow(2).mean())
        assert snr.item() > 30.0


def test_native_rows_equal_single_forwards_bit_for_bit(lib) -> None:
    model = StepModel(tiny_llama(seed=6), quantize="int8")
    torch.manual_seed(0)
    prompts = [torch.randint(0, 1000, (1, n)) for n in (4, 130)]
    batched = [model.new_cache(160) for _ in prompts]
    alone = [model.new_cache(160) for _ in prompts]
    for caches in (batched, alone):
        for cache, prompt in zip(caches, prompts, strict=True):
            model.forward(cache, prompt)
    for step in range(3):
        tokens = [140_000 + step, 7 + step]
        rows = model.decode_batch(batched, torch.tensor(tokens))
        singles = [
            model.forward(c, torch.tensor([[t]]))[0, -1] for c, t in zip(alone, tokens, strict=True)
        ]
        assert torch.equal(rows, torch.stack(singles))
    for a, b in zip(batched, alone, strict=True):
        assert a.length == b.length
        assert torch.equal(a.k[:, :, :, : a.length], b.k[:, :, :, : b.length])


def test_native_heads_equal_the_int8_rows_they_use(lib) -> None:
    model = StepModel(tiny_llama(seed=4), quantize="int8")
    core = EngineCore(model, fake_encode, EngineConfig(max_context=256, quantize="int8"))
    assert core._native_heads is not None and core._scripted_heads is None
    torch.manual_seed(2)
    # Two rows at position 0 (one with EOS legal), one at 3, one at 6.
    reqs = [
        SimpleNamespace(id=i, hidden=torch.randn(64), codes=[0] * position, frames=frames)
        for i, (position, frames) in enumerate([(0, 0), (0, 2), (3, 1), (6, 4)])
    ]
    got = core._heads(reqs)
    assert [got[r.id].shape[0] for r in reqs] == [4096, 4097, 4096, 4096]
    for r in reqs:
        expected = core._rows[len(r.codes)](r.hidden[None])[0]
        assert torch.equal(got[r.id][:4096], expected)
    eos = (reqs[1].hidden @ core._eos_row.T)[0]
    assert torch.allclose(got[1][4096], eos, rtol=1e-5, atol=1e-6)


def test_bad_tokens_and_positions_raise_and_write_nothing(lib) -> None:
    # A cache's slots past its length are uninitialised (torch.empty: any bits, NaN too, and
    # NaN != NaN), so comparing whole caches passes or fails by chance. Mark them with a
    # sentinel instead: a refused step must leave the valid slots as they were and write no
    # slot at or past the length.
    sentinel = 1234.5
    model = StepModel(tiny_llama(), quantize="int8")
    cache = model.new_cache(16)
    cache.k.fill_(sentinel)
    cache.v.fill_(sentinel)
    model.forward(cache, torch.tensor([[1, 2, 3]]))
    valid = [t[:, :, :, :3].clone() for t in (cache.k, cache.v)]

    def untouched() -> bool:
        return cache.length == 3 and all(
            torch.equal(t[:, :, :, :3], before) and bool((t[:, :, :, 3:] == sentinel).all())
            for t, before in zip((cache.k, cache.v), valid, strict=True)
        )

    assert untouched()
    with pytest.raises(EngineError, match="outside the vocabulary"):
        model.decode_batch([cache], torch.tensor([model.vocab_size]))
    assert untouched()
    with pytest.raises(EngineError, match="position"):
        model._native.decode([cache], torch.tensor([4]), [cache.allocated])  # type: ignore[union-attr]
    assert untouched()
    model.decode_batch([cache], torch.tensor([4]))  # the model still works
    assert cache.length == 4 and not bool((cache.k[:, :, :, 3] == sentinel).any())


def test_rope_table_grows_with_the_context(lib) -> None:
    model = StepModel(tiny_llama(seed=2), quantize="int8")
    step = model._native
    assert step is not None
    start = step.model.rope_len
    cache = model.new_cache(start + 8)
    model.forward(cache, torch.randint(0, 1000, (1, start + 2)))
    model.decode_batch([cache], torch.tensor([9]))
    assert step.model.rope_len >= start + 3
    cos, sin = model.rotary(torch.zeros(1), torch.arange(start + 3).unsqueeze(0))
    assert torch.equal(step._cos[: start + 3], cos[0]) and torch.equal(
        step._sin[: start + 3], sin[0]
    )


def test_the_build_is_cached(lib, monkeypatch) -> None:
    first = native._build(generic=False)
    stamp = first.stat().st_mtime_ns
    assert native._build(generic=False) == first and first.stat().st_mtime_ns == stamp
    # Another source (or compiler, flags, CPU) is another file.
    monkeypatch.setattr(native, "_FLAGS", (*native._FLAGS, "-DVX_UNUSED_FLAG"))
    assert native._build(generic=False) != first


def test_a_compiler_that_refuses_march_native_builds_without_it(lib, monkeypatch) -> None:
    flags = tuple("-march=no-such-cpu" if f == "-march=native" else f for f in native._FLAGS)
    monkeypatch.setattr(native, "_FLAGS", flags)
    built = native._bind(ctypes.CDLL(str(native._build(generic=False))))
    assert built.vx_has_vnni() == 0  # no -march at all: the portable kernel
    desc_lin = Int8Linear(torch.randn(32, 32), "native")
    x = torch.randn(3, 32)
    out = torch.full((3, 32), float("nan"))  # an unwritten output fails, never by chance
    assert (
        built.vx_linear_forward(
            ctypes.byref(desc_lin.native_struct()), x.data_ptr(), out.data_ptr(), 3
        )
        == 0
    )
    # The same integer sums; the float steps round differently without FMA (baseline x86-64).
    assert torch.allclose(out, desc_lin(x), rtol=1e-5, atol=1e-5)


def test_a_failed_build_falls_back_to_fbgemm(monkeypatch, caplog) -> None:
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="voxlane.engine"):
        assert native.library() is None
    assert "no C compiler" in caplog.text
    model = StepModel(tiny_llama(), quantize="int8")
    assert model._native is None and model._scripted is not None
    assert model._fused[0].wqkv.kernel == "fbgemm"  # type: ignore[index,union-attr]
    with pytest.raises(EngineError, match="C compiler"):
        Int8Linear(torch.randn(32, 32), "native")


def test_native_can_be_turned_off() -> None:
    code = (
        "from voxlane.server.engine import native\n"
        "from voxlane.server.engine.model import Int8Linear\n"
        "import torch\n"
        "assert native.library() is None\n"
        "print(Int8Linear(torch.randn(32, 32)).kernel)\n"
    )
    env = {**__import__("os").environ, "VOXLANE_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fbgemm"


def test_snake_matches_snacs_formula(lib) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=gen) * torch.logspace(-3, 3, 64)  # |alpha x| up to ~1e4
    alpha = torch.rand(64, generator=gen) * 5 + 0.05
    inv = (alpha + 1e-9).reciprocal()
    expected = x + inv * torch.sin(alpha * x).pow(2)
    got = native.snake(lib, x, alpha, inv)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(EngineError, match="shape"):
        native.snake(lib, torch.zeros(2, 24), torch.ones(24), torch.ones(24))


@pytest.mark.parametrize("dilation", [1, 3, 9])
def test_depthwise_convolution_matches_torch(lib, dilation: int) -> None:
    gen = torch.Generator().manual_seed(dilation)
    conv = torch.nn.Conv1d(32, 32, 7, dilation=dilation, groups=32)
    x = torch.randn(100, 32, generator=gen)  # rows [T, C]
    with torch.no_grad():
        expected = conv(x.t().unsqueeze(0))[0].t()  # no padding: T - 6 d rows
    taps = conv.weight.detach()[:, 0].t().contiguous()  # [k, C]
    got = native.depthwise(lib, x, taps, conv.bias.detach(), dilation)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert native.depthwise(lib, x[: 6 * dilation], taps, None, dilation).shape == (0, 32)


def test_head_dim_64_attention_blocks_match_the_fbgemm_step(lib) -> None:
    # Head size 64 (the small demo model's, and half of Orpheus 3B's 128) takes the 16-key
    # blocks of the query-key products; 37 cached keys: two blocks and a tail of 5. Queries
    # are scaled up so attention is peaked (random weights make it nearly uniform, which would
    # hide keys scored in the wrong order), and the fbgemm step on the same int8 weights is
    # the reference.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    for layer in hf.model.layers:
        layer.self_attn.q_proj.weight.data *= 30.0
    models = [
        StepModel(copy.deepcopy(hf), quantize="int8", int8_kernel="fbgemm"),
        StepModel(hf, quantize="int8"),
    ]
    assert models[1]._native is not None and models[1].head_dim == 64
    prompt = torch.randint(0, 1024, (1, 36))
    rows = []
    for m in models:
        cache = m.new_cache(64)
        m.forward(cache, prompt)
        rows.append(m.decode_batch([cache], torch.tensor([7])))
    assert (rows[0] - rows[1]).abs().max().item() < 0.05 * rows[0].abs().max().item()


def test_kernels_refuse_rows_of_the_wrong_shape(lib) -> None:
    with pytest.raises(EngineError, match="rows"):
        native.snake(lib, torch.zeros(3, 32), torch.ones(16), torch.ones(16))
    with pytest.raises(EngineError, match="rows"):
        native.depthwise(lib, torch.zeros(20, 16, dtype=torch.float64), torch.ones(7, 16), None, 1)
    with pytest.raises(EngineError, match="contiguous"):
        native.snake(lib, torch.zeros(32, 16).t(), torch.ones(32), torch.ones(32))
