"""StepModel: our forward equals HF's; RoPE re-indexing equals computing at the new position."""

from __future__ import annotations

import torch

from voxlane.server.engine.model import StepModel
from voxlane.server.orpheus import audio_token_range


def test_forward_matches_hf_prefill_then_decode(tiny_model) -> None:
    sm = StepModel(tiny_model)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, sm.vocab_size, (1, 60), generator=gen)
    cache = sm.new_cache(128)
    chunks = [tokens[:, :25], tokens[:, 25:50]] + [tokens[:, i : i + 1] for i in range(50, 60)]
    hidden = torch.cat([sm.forward(cache, c) for c in chunks], dim=1)  # [1, 60, D]
    ours = hidden @ sm.head_weight.T
    with torch.no_grad():
        ref = tiny_model(tokens).logits
    assert cache.length == 60
    assert (ours - ref).abs().max().item() <= 1e-4


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
