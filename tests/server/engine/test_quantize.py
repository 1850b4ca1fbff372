"""int8 and int4 weights (``quantize="int8"``/``"int4"``): accuracy against fp32, batch
invariance, the engine end to end, the int8 weight-only kernel, the int4 product, and what
happens to the float model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from voxlane.errors import EngineError, OutOfRangeError
from voxlane.server.engine import EngineConfig, SamplingParams, SpeechEngine, Voice
from voxlane.server.engine.core import EngineCore
from voxlane.server.engine.model import Int4Linear, Int8Linear, StepModel
from voxlane.server.lm import load_speech_lm
from voxlane.server.orpheus import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    FRAME_SIZE,
    audio_token,
    finetuned_prompt,
)

TEXT = "Hey there, my name is Tara, and I am a speech model that talks."


def _teacher_forced(fp32: StepModel, other: StepModel, prompt: list[int], steps: int):
    """Legal-row logits of both models over ``steps`` audio tokens, feeding both fp32's greedy
    token at every step. Returns (cosines, top-1 agreements, SNRs in dB) per step."""
    heads = [
        (fp32.head_slice(s, s + CODEBOOK_SIZE), other.head_slice(s, s + CODEBOOK_SIZE))
        for s in (AUDIO_TOKEN_BASE + p * CODEBOOK_SIZE for p in range(FRAME_SIZE))
    ]
    ca, cb = fp32.new_cache(len(prompt) + steps), other.new_cache(len(prompt) + steps)
    ids = torch.tensor([prompt])
    ha, hb = fp32.forward(ca, ids)[:, -1], other.forward(cb, ids)[:, -1]
    cosines, agree, snr = [], [], []
    for i in range(steps):
        head_a, head_b = heads[i % FRAME_SIZE]
        a, b = head_a(ha)[0], head_b(hb)[0]
        cosines.append(F.cosine_similarity(a, b, dim=0).item())
        agree.append(int(a.argmax()) == int(b.argmax()))
        snr.append(10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum()).item())
        token = torch.tensor([[audio_token(int(a.argmax()), i % FRAME_SIZE)]])
        ha, hb = fp32.forward(ca, token)[:, -1], other.forward(cb, token)[:, -1]
    return cosines, agree, snr


@pytest.fixture
def demo_pair(demo_lm_tiny_dir):
    """Two copies of the tiny demo LM: fp32 and int8 (int8 releases its model's weights)."""
    fp32 = load_speech_lm(demo_lm_tiny_dir)
    int8 = load_speech_lm(demo_lm_tiny_dir)
    return fp32, StepModel(fp32.model), int8, StepModel(int8.model, quantize="int8")


def test_int8_logits_track_fp32_over_teacher_forced_steps(demo_pair) -> None:
    # Measured on the tiny demo LM: cosine >= 0.9998 at every step, top-1 agreement 0.986
    # (random weights: the best two legal logits are often near-ties), mean SNR 36.7 dB.
    lm, fp32, _, int8 = demo_pair
    prompt = finetuned_prompt(lm.encode, "tara", TEXT)
    cosines, agree, snr = _teacher_forced(fp32, int8, prompt, steps=70)
    assert min(cosines) > 0.999
    assert sum(agree) / len(agree) >= 0.9
    assert sum(snr) / len(snr) > 30.0


def test_int4_logits_follow_fp32_less_closely(demo_lm_tiny_dir) -> None:
    # 4-bit weights move the logits much more than int8: measured on the tiny demo LM, cosine
    # >= 0.9928, top-1 agreement 0.80, mean SNR 20.4 dB (int8: 0.99985, 0.986, 36.7 dB).
    # Random weights have no structure for the groups to exploit; see bench engine's int4 keys.
    lm = load_speech_lm(demo_lm_tiny_dir)
    fp32 = StepModel(lm.model)
    int4 = StepModel(load_speech_lm(demo_lm_tiny_dir).model, quantize="int4")
    prompt = finetuned_prompt(lm.encode, "tara", TEXT)
    cosines, agree, snr = _teacher_forced(fp32, int4, prompt, steps=70)
    assert min(cosines) > 0.98
    assert sum(agree) / len(agree) >= 0.7
    assert 15.0 < sum(snr) / len(snr) < 30.0  # below int8's: the 4-bit path really runs


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_frames_are_the_same_alone_or_batched(kit, quantize: str) -> None:
    # A stream's audio under a seed does not depend on how many others share its steps.
    model = StepModel(kit.tiny_llama(), quantize=quantize)  # type: ignore[arg-type]
    voice = Voice.builtin("tara")
    texts = ["the first stream", "a second, longer stream of words"]

    def core() -> EngineCore:
        return EngineCore(model, kit.encode, EngineConfig(max_context=512))

    alone = []
    for i, text in enumerate(texts):
        c = core()
        req, sink = kit.submit(c, c.new_session(voice), text, max_frames=6, seed=i)
        kit.run_until_done(c, req)
        alone.append(sink.frames)
    c = core()
    runs = [
        kit.submit(c, c.new_session(voice), text, max_frames=6, seed=i)
        for i, text in enumerate(texts)
    ]
    kit.run_until_done(c, *(r for r, _ in runs))
    assert [sink.frames for _, sink in runs] == alone
    assert all(len(f) == 6 for f in alone)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
async def test_quantized_engine_speaks_valid_frames(demo_lm_tiny_dir, quantize: str) -> None:
    engine = SpeechEngine.from_pretrained(
        str(demo_lm_tiny_dir),
        config=EngineConfig(max_context=512, num_threads=1, quantize=quantize),  # type: ignore[arg-type]
    )
    engine.start()
    try:
        session = engine.open_session(engine.builtin_voice("tara"))
        frames = [
            f async for f in session.generate("Hi there!", SamplingParams(max_frames=4, seed=3))
        ]
        voice = await engine.clone_voice("Hello.", [(1, 2, 3, 4, 5, 6, 7)] * 5)  # a prefill
        cloned = engine.open_session(voice)
        frames += [f async for f in cloned.generate("Hi!", SamplingParams(max_frames=2, seed=1))]
        session.close()
        cloned.close()
    finally:
        await engine.aclose()
    assert len(frames) == 6
    assert all(len(f) == FRAME_SIZE and all(0 <= c < CODEBOOK_SIZE for c in f) for f in frames)
    # The engine owns the model now: its float projections were released.
    with pytest.raises(EngineError, match=quantize):
        engine.lm.model(torch.tensor([[1, 2, 3]]))


def test_quantize_is_validated() -> None:
    with pytest.raises(OutOfRangeError, match="quantize"):
        EngineConfig(quantize="int2")  # type: ignore[arg-type]
    assert EngineConfig().quantize == "none"


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_step_model_rejects_unknown_quantize_and_a_released_model(kit, quantize: str) -> None:
    model = kit.tiny_llama()
    with pytest.raises(EngineError, match="quantize"):
        StepModel(model, quantize="fp8")  # type: ignore[arg-type]
    StepModel(model, quantize=quantize)  # type: ignore[arg-type]
    for layer in model.model.layers:  # the float copies are gone, not merely unreferenced
        assert layer.mlp.down_proj.weight.numel() == 0
        assert layer.self_attn.q_proj.weight.numel() == 0
    with pytest.raises(EngineError, match=f"quantize='{quantize}'.*load the checkpoint again"):
        StepModel(model)


def test_int4_product_is_its_dequantized_weight_and_prefill_runs_int8() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=gen) * 0.05
    w[3] = 0.0  # an all-zero row stays zero
    w[7, :64] = 0.02  # a constant group: scale floor, no division by zero
    lin = Int4Linear(w)
    assert lin.group_size == 128  # the largest that fits 256 inputs
    # Rebuild the weight the 4-bit codes stand for, independently of the kernel's packing.
    groups = w.reshape(96, 2, 128)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    codes = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    dequantized = ((codes - 8) * scale[..., None] + zero[..., None]).reshape(96, 256)
    assert (dequantized - w).abs().max() <= scale.max() / 2 + 1e-6  # within half a step
    x = torch.randn(5, 1, 256, generator=gen)  # decode rows: [B, 1, D]
    exact = F.linear(x.bfloat16().float(), dequantized)  # the kernel's bf16 activations
    y = lin(x)
    assert y.shape == (5, 1, 96) and y.dtype == torch.float32
    assert (y - exact).abs().max().item() <= 1e-2 * exact.abs().max().item()
    assert torch.equal(y[..., 3], torch.zeros(5, 1))
    # Row independence, the property batched decoding relies on.
    assert torch.equal(torch.cat([lin(x[i : i + 1]) for i in range(5)]), y)
    # A prefill chunk ([B, T > 1, D]) runs the int8 copy of the same weights.
    chunk = torch.randn(1, 7, 256, generator=gen)
    assert torch.equal(lin(chunk), lin.prefill(chunk))
    assert lin.nbytes == 96 * (128 + 4 * 2) + lin.prefill.nbytes


def test_int4_rejects_shapes_its_kernel_cannot_run() -> None:
    with pytest.raises(EngineError, match="groups"):
        Int4Linear(torch.randn(32, 48))  # 48 inputs: no group size of 32..128 divides them
    with pytest.raises(EngineError, match="multiple of 16"):
        Int4Linear(torch.randn(40, 64))
    with pytest.raises(EngineError, match="CPU only"):
        Int4Linear(torch.randn(32, 64, device="meta"))


@pytest.mark.parametrize("kernel", ["native", "fbgemm"])
def test_int8_kernels_compute_the_same_int8_product(kernel: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen) * 0.05
    w[5] = 0.0  # an all-zero row must stay zero, not divide by zero
    x = torch.randn(4, 3, 64, generator=gen) * torch.tensor([0.1, 1.0, 30.0]).view(1, 3, 1)
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    dequantized = (w / scale).round().clamp(-127, 127) * scale
    exact = F.linear(x, dequantized)  # what int8 weights compute with float activations
    wonly = Int8Linear(w, "weight_only")
    assert wonly.kernel == "weight_only"
    assert (wonly(x) - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    assert Int8Linear(w).kernel == "native"  # the default on CPU where it builds
    lin = Int8Linear(w, kernel)  # type: ignore[arg-type]
    assert lin.kernel == kernel
    y = lin(x)
    assert y.shape == (4, 3, 96)
    assert torch.equal(y[..., 5], torch.zeros(4, 3))
    # Both also round activations to 8 (fbgemm without VNNI: 7) bits per row: close, not equal.
    rel = ((y - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    assert rel < 0.02
    # bf16 inputs come back in bf16.
    assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_weight_only_model_tracks_fp32(demo_lm_tiny_dir) -> None:
    # The non-CPU form, forced on CPU: no activation rounding, so closer than fbgemm
    # (measured: cosine >= 0.9999, top-1 agreement 1.0, mean SNR 38.5 dB).
    lm = load_speech_lm(demo_lm_tiny_dir)
    fp32 = StepModel(lm.model)
    wonly = StepModel(
        load_speech_lm(demo_lm_tiny_dir).model, quantize="int8", int8_kernel="weight_only"
    )
    prompt = finetuned_prompt(lm.encode, "tara", TEXT)
    cosines, agree, snr = _teacher_forced(fp32, wonly, prompt, steps=35)
    assert min(cosines) > 0.999
    assert sum(agree) / len(agree) >= 0.9
    assert sum(snr) / len(snr) > 30.0


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_model_emits_no_warnings(quantize: str) -> None:
    # torch warns (once per process) that quantized tensors are deprecated; users must not
    # see it. A fresh interpreter, so an earlier test cannot have used up the warning.
    code = (
        "import torch\n"
        "from voxlane.server.engine.model import StepModel\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)\n"
        f"sm = StepModel(LlamaForCausalLM(cfg).eval(), quantize={quantize!r})\n"
        "cache = sm.new_cache(16)\n"
        "sm.forward(cache, torch.tensor([[1, 2, 3]]))\n"
        "sm.head_slice(0, 100)(sm.decode_batch([cache], torch.tensor([4])))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
