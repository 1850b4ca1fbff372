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


def test_download_failure_reason_is_in_the_message(monkeypatch, tmp_path: Path):
    import huggingface_hub

    def snapshot_download(*, repo_id, allow_patterns, local_files_only):
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        raise PermissionError(f"401 Client Error: {repo_id} is gated.\nLog in to access it.")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelNotFoundError, match="not cached") as info:
        resolve_model_dir("voxlane-test/gated-model")
    message = str(info.value)
    # What the hub said (a gated repo, here) is what tells the user what to fix.
    assert "PermissionError: 401 Client Error: voxlane-test/gated-model is gated. Log in" in message
    assert "--demo" in message


def test_offline_is_named_as_the_reason(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model_dir("voxlane-test/no-such-model")
