"""int8 weights (``quantize="int8"``): accuracy against fp32, batch invariance, the engine end
to end, the weight-only kernel, and what happens to the float model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from voxlane.errors import EngineError, OutOfRangeError
from voxlane.server.engine import EngineConfig, SamplingParams, SpeechEngine, Voice
from voxlane.server.engine.core import EngineCore
from voxlane.server.engine.model import Int8Linear, StepModel
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


def test_int8_frames_are_the_same_alone_or_batched(kit) -> None:
    # A stream's audio under a seed does not depend on how many others share its steps.
    model = StepModel(kit.tiny_llama(), quantize="int8")
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


async def test_engine_with_int8_speaks_valid_frames(demo_lm_tiny_dir) -> None:
    engine = SpeechEngine.from_pretrained(
        str(demo_lm_tiny_dir),
        config=EngineConfig(max_context=512, num_threads=1, quantize="int8"),
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
    with pytest.raises(EngineError, match="int8"):
        engine.lm.model(torch.tensor([[1, 2, 3]]))


def test_quantize_is_validated() -> None:
    with pytest.raises(OutOfRangeError, match="quantize"):
        EngineConfig(quantize="int4")  # type: ignore[arg-type]
    assert EngineConfig().quantize == "none"


def test_step_model_rejects_unknown_quantize_and_a_released_model(kit) -> None:
    model = kit.tiny_llama()
    with pytest.raises(EngineError, match="quantize"):
        StepModel(model, quantize="fp8")  # type: ignore[arg-type]
    StepModel(model, quantize="int8")
    for layer in model.model.layers:  # the float copies are gone, not merely unreferenced
        assert layer.mlp.down_proj.weight.numel() == 0
        assert layer.self_attn.q_proj.weight.numel() == 0
    with pytest.raises(EngineError, match="load the checkpoint again"):
        StepModel(model)


def test_fbgemm_and_weight_only_compute_the_same_int8_product() -> None:
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
    fbgemm = Int8Linear(w)
    assert fbgemm.kernel == "fbgemm"  # the default on CPU
    y = fbgemm(x)
    assert y.shape == (4, 3, 96)
    assert torch.equal(y[..., 5], torch.zeros(4, 3))
    # fbgemm also rounds activations to 8 (7) bits per row: close, not equal.
    rel = ((y - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    assert rel < 0.02
    # bf16 inputs come back in bf16.
    assert fbgemm(x.bfloat16()).dtype == torch.bfloat16


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


def test_int8_emits_no_warnings() -> None:
    # torch warns (once per process) that quantized tensors are deprecated; users must not
    # see it. A fresh interpreter, so an earlier test cannot have used up the warning.
    code = (
        "import torch\n"
        "from voxlane.server.engine.model import StepModel\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)\n"
        "sm = StepModel(LlamaForCausalLM(cfg).eval(), quantize='int8')\n"
        "cache = sm.new_cache(16)\n"
        "sm.forward(cache, torch.tensor([[1, 2, 3]]))\n"
        "sm.head_slice(0, 100)(sm.decode_batch([cache], torch.tensor([4])))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
