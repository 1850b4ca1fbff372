"""Demo checkpoints: exact architectures, random fixed-seed weights, real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from voxlane.server import orpheus as o
from voxlane.server.demo import (
    DEMO_LM_SIZES,
    ORPHEUS_3B_CONFIG,
    SNAC_24KHZ_CONFIG,
    demo_lm_config,
    ensure_demo_lm,
    write_demo_lm,
)
from voxlane.server.lm import load_speech_lm

_SIZE_FIELDS = {
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
}


def test_demo_configs_differ_from_orpheus_only_in_size():
    for size, dims in DEMO_LM_SIZES.items():
        config = demo_lm_config(size)
        assert config.keys() == ORPHEUS_3B_CONFIG.keys()
        differing = {k for k in config if config[k] != ORPHEUS_3B_CONFIG[k]}
        assert differing <= _SIZE_FIELDS
        assert config["head_dim"] * dims.num_attention_heads == dims.hidden_size
        assert dims.num_attention_heads % dims.num_key_value_heads == 0
    assert DEMO_LM_SIZES["small"].hidden_size == 512
    assert ORPHEUS_3B_CONFIG["vocab_size"] == o.VOCAB_SIZE


def test_unknown_size_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="tiny"):
        ensure_demo_lm("huge", tmp_path)
    assert not any(tmp_path.iterdir())


def test_tiny_lm_has_the_orpheus_layout(demo_lm_tiny_dir: Path):
    assert demo_lm_tiny_dir.name == "lm-tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (demo_lm_tiny_dir / name).is_file(), name
    config = json.loads((demo_lm_tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == o.VOCAB_SIZE
    # transformers 5 writes `rope_parameters`; 4.x writes `rope_scaling` (the released layout).
    assert (config.get("rope_parameters") or config["rope_scaling"])["rope_type"] == "llama3"
    assert config["tie_word_embeddings"] is True


def test_tiny_lm_loads_through_load_speech_lm(demo_lm_tiny_dir: Path):
    lm = load_speech_lm(demo_lm_tiny_dir)
    assert lm.path == demo_lm_tiny_dir
    assert lm.lm_head_weight.shape == (o.VOCAB_SIZE, DEMO_LM_SIZES["tiny"].hidden_size)
    prompt = o.finetuned_prompt(lm.encode, "tara", "Hello there, how are you today?")
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt])).logits
    assert logits.shape == (1, len(prompt), o.VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_same_seed_gives_identical_bytes(demo_lm_tiny_dir: Path, tmp_path: Path):
    again = write_demo_lm(tmp_path / "again", "tiny")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (demo_lm_tiny_dir / name).read_bytes(), name


def test_ensure_reuses_the_written_checkpoint(demo_lm_tiny_dir: Path):
    before = (demo_lm_tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_lm("tiny", demo_lm_tiny_dir.parent) == demo_lm_tiny_dir
    assert (demo_lm_tiny_dir / "model.safetensors").stat().st_mtime_ns == before


def test_snac_demo_loads_with_the_snac_package(demo_snac_dir: Path):
    from snac import SNAC

    model = SNAC.from_pretrained(str(demo_snac_dir)).eval()
    assert json.loads((demo_snac_dir / "config.json").read_text()) == SNAC_24KHZ_CONFIG
    frames = [(0, 1, 2, 3, 4, 5, 6), (4095,) * 7]
    codes = [torch.tensor([c]) for c in o.frames_to_codebooks(frames)]
    with torch.no_grad():
        audio = model.decode(codes)
    assert audio.shape == (1, 1, len(frames) * o.SAMPLES_PER_FRAME)
