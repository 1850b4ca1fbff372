"""load_speech_lm: one loader for the real Orpheus and the demo, with typed errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from voxlane.errors import ModelFormatError, ModelNotFoundError
from voxlane.server import orpheus as o
from voxlane.server.demo import ORPHEUS_3B_CONFIG
from voxlane.server.lm import load_speech_lm


def _copy_with_config(src: Path, dst: Path, config: dict) -> Path:
    """A checkpoint dir sharing ``src``'s files (symlinks) with its own config.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_demo_lm_loads_in_eval_mode_and_encodes_with_bos(demo_lm_tiny_dir: Path):
    lm = load_speech_lm(demo_lm_tiny_dir)
    assert not lm.model.training
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.encode("tara: Hello there, how are you today?") == [
        128000, 83, 5169, 25, 22691, 1070, 11, 1268, 527, 499, 3432, 30,
    ]  # fmt: skip
    # Tied embeddings: the head is the embedding matrix, as in Orpheus 3B.
    assert lm.lm_head_weight.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    assert lm.vocab_size == o.VOCAB_SIZE


def test_dtype_is_applied(demo_lm_tiny_dir: Path):
    lm = load_speech_lm(demo_lm_tiny_dir, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        load_speech_lm(demo_lm_tiny_dir, dtype="float64")  # type: ignore[arg-type]


def test_released_config_layout_loads(demo_lm_tiny_dir: Path, tmp_path: Path):
    # The real config.json uses the legacy rope_scaling/rope_theta keys.
    demo = json.loads((demo_lm_tiny_dir / "config.json").read_text())
    legacy = {
        **ORPHEUS_3B_CONFIG,
        **{k: demo[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        **{k: demo[k] for k in ("num_key_value_heads", "intermediate_size", "head_dim")},
    }
    lm = load_speech_lm(_copy_with_config(demo_lm_tiny_dir, tmp_path / "legacy", legacy))
    # transformers 5 moves these keys into `rope_parameters`; 4.x keeps `rope_scaling`.
    config = lm.model.config
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3"
    assert rope["factor"] == 32.0


def test_missing_directory_says_what_to_do(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="demo") as info:
        load_speech_lm(tmp_path / "nowhere")
    assert info.value.code == "model_not_found"


def test_uncached_hub_id_offline_says_what_to_do(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"local directory.*demo"):
        load_speech_lm("voxlane-test/not-a-model")


def test_directory_without_weights(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(ORPHEUS_3B_CONFIG))
    with pytest.raises(ModelNotFoundError, match=r"model\.safetensors or"):
        load_speech_lm(tmp_path)


def test_other_architecture_is_a_format_error(demo_lm_tiny_dir: Path, tmp_path: Path):
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 156940}
    with pytest.raises(ModelFormatError, match="Llama-architecture") as info:
        load_speech_lm(_copy_with_config(demo_lm_tiny_dir, tmp_path / "gpt2", gpt2))
    assert info.value.code == "bad_model"


def test_unknown_model_type_is_a_format_error(demo_lm_tiny_dir: Path, tmp_path: Path):
    odd = {"architectures": ["OddForCausalLM"], "model_type": "odd-model"}
    with pytest.raises(ModelFormatError):
        load_speech_lm(_copy_with_config(demo_lm_tiny_dir, tmp_path / "odd", odd))


def test_text_only_llama_vocabulary_is_a_format_error(demo_lm_tiny_dir: Path, tmp_path: Path):
    config = {**json.loads((demo_lm_tiny_dir / "config.json").read_text()), "vocab_size": 128256}
    with pytest.raises(ModelFormatError, match="156940"):
        load_speech_lm(_copy_with_config(demo_lm_tiny_dir, tmp_path / "llama", config))


def test_foreign_tokenizer_is_a_format_error(demo_lm_tiny_dir: Path, tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    dst = tmp_path / "foreign"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(demo_lm_tiny_dir / name, dst / name)
    backend.save(str(dst / "tokenizer.json"))
    with pytest.raises(ModelFormatError, match="tokenizer"):
        load_speech_lm(dst)
