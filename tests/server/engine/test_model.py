"""StepModel: our forward equals HF's; RoPE re-indexing equals computing at the new position;
the decode attention equals SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voxlane.server.engine.model import StepModel
from voxlane.server.engine.scripted import _attend
from voxlane.server.orpheus import audio_token_range


def test_forward_matches_hf_prefill_then_decode(tiny_model) -> None:
    # Decoded tokens on both sides of 128 keys, where decode attention leaves SDPA.
    sm = StepModel(tiny_model)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, sm.vocab_size, (1, 140), generator=gen)
    cache = sm.new_cache(160)
    chunks = [tokens[:, :25], tokens[:, 25:120]] + [tokens[:, i : i + 1] for i in range(120, 140)]
    hidden = torch.cat([sm.forward(cache, c) for c in chunks], dim=1)  # [1, 140, D]
    ours = hidden @ sm.head_weight.T
    with torch.no_grad():
        ref = tiny_model(tokens).logits
    assert cache.length == 140
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (6, 3), (4, 4)])  # GQA 4:1, 2:1, MHA
def test_decode_attention_equals_sdpa(heads: tuple[int, int], dtype: torch.dtype) -> None:
    # Read from cache slices ([L, B, Hkv, S_max, D]) and a query sliced out of a fused q/k
    # tensor, as the decode step does, with two sequences (forward of B = 2, T = 1).
    h, hk = heads
    gen = torch.Generator().manual_seed(h)
    k_cache = torch.randn(2, 2, hk, 1100, 64, generator=gen).to(dtype)
    v_cache = torch.randn(2, 2, hk, 1100, 64, generator=gen).to(dtype)
    q = (torch.randn(2, h + hk, 1, 64, generator=gen) * 3).to(dtype)[:, :h]  # peaky softmax
    for s in (1, 7, 127, 128, 129, 400, 1100):
        k, v = k_cache[1, :, :, :s], v_cache[1, :, :, :s]
        out = _attend(q, k, v, 0.125)
        assert out.dtype == dtype and out.shape == (2, h, 1, 64)
        # Reference in float32 from the same (rounded) inputs, as SDPA's math kernel computes
        # low-precision inputs. bf16 allows about one unit in the last place of the output
        # (|out| < 4: 2**-6); a wrong head grouping, scale or key range is off by ~0.1-1.
        ref = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), scale=0.125, enable_gqa=True
        )
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-2)
        if s == 1:  # one key: its value, whatever the scores
            assert torch.equal(out, v.expand(2, hk, 1, 64).repeat_interleave(h // hk, 1))


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_decode_batch_rows_equal_single_forwards_across_the_attention_switch(
    kit, quantize: str
) -> None:
    # Lengths below, at and above 128 keys: single-token forwards run the same attention, so
    # rows are equal bit for bit (int8 and int4: row-independent projections; float: small
    # products in fixed row blocks, scripted._float_linear).
    model = StepModel(kit.tiny_llama(seed=5), quantize=quantize)
    caches = [model.new_cache(256) for _ in range(3)]
    for i, (cache, n) in enumerate(zip(caches, (40, 127, 200), strict=True)):
        model.forward(cache, torch.arange(100, 100 + n).unsqueeze(0) * (i + 1))
    tokens = torch.tensor([7, 800, 90_000])
    alone = []
    for b, cache in enumerate(caches):
        copy = type(cache)(cache.k.clone(), cache.v.clone(), cache.length)
        alone.append(model.forward(copy, tokens[b : b + 1].view(1, 1))[0, -1])
    batched = model.decode_batch(caches, tokens)
    assert [c.length for c in caches] == [41, 128, 201]
    for b in range(3):
        assert torch.equal(batched[b], alone[b])


def test_legal_rows_are_a_view_of_the_head(tiny_model) -> None:
    sm = StepModel(tiny_model)
    r = audio_token_range(3)
    rows = sm.head_rows(r.start, r.stop)
    assert rows.shape == (4096, tiny_model.config.hidden_size)
    assert rows.data_ptr() == sm.head_weight[r.start].data_ptr()  # no copy


def test_reindexed_keys_equal_keys_computed_at_the_new_positions(kit) -> None:
    # One layer: a kept key depends only on its token and position, so the shifted cache must
    # equal a fresh prefill of the kept tokens exactly (RoPE composition), far from position 0.
    model = kit.tiny_llama(layers=1)
    sm = StepModel(model)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, sm.vocab_size, (1, 2500), generator=gen)
    cache = sm.new_cache(2600)
    sm.forward(cache, tokens)
    sm.evict(cache, 10, 1700)
    kept = torch.cat([tokens[:, :10], tokens[:, 1700:]], dim=1)
    fresh = sm.new_cache(2600)
    sm.forward(fresh, kept)
    n = kept.shape[1]
    assert cache.length == n
    assert (cache.k[:, :, :, :n] - fresh.k[:, :, :, :n]).abs().max().item() <= 1e-4
    assert torch.equal(cache.v[:, :, :, :n], fresh.v[:, :, :, :n])
    nxt = torch.tensor([[77]])
    a = sm.forward(cache, nxt) @ sm.head_weight.T
    b = sm.forward(fresh, nxt) @ sm.head_weight.T
    assert (a - b).abs().max().item() <= 1e-4
