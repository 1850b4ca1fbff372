"""resolve_model_dir: local directories, hub ids, and one clear error when missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxlane.errors import ModelNotFoundError
from voxlane.server.hub import resolve_model_dir


def test_local_directory_with_its_files(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    found = resolve_model_dir(tmp_path, any_of=("model.safetensors", "pytorch_model.bin"))
    assert found == tmp_path


def test_missing_files_are_named(tmp_path: Path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir(tmp_path, any_of=("model.safetensors", "pytorch_model.bin"))
    message = str(info.value)
    assert "config.json" in message
    assert "model.safetensors or pytorch_model.bin" in message
    assert "demo" in message


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "a/b/c", "plainname"])
def test_neither_directory_nor_hub_id(name):
    with pytest.raises(ModelNotFoundError, match="neither a directory nor a hub id"):
        resolve_model_dir(name)


def test_file_instead_of_directory(tmp_path: Path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="neither a directory"):
        resolve_model_dir(f)


def test_uncached_hub_id_offline(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not cached") as info:
        # An id nobody has cached (the real Orpheus may be cached on a dev machine).
        resolve_model_dir("voxlane-test/no-such-model")
    assert "--demo" in str(info.value)
