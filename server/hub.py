"""Resolve a model name (HF hub id or local directory) to a directory of files.

Real checkpoints (``canopylabs/orpheus-3b-0.1-ft``, ``hubertsiuzdak/snac_24khz``)
and the demo checkpoints that :mod:`voxlane.server.demo` writes go through the
same function, so the demo exercises the real loading path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from voxlane.errors import ModelNotFoundError

__all__ = ["resolve_model_dir"]

_HINT = (
    "Pass a local directory that holds the checkpoint, make the hub reachable "
    "(and the id correct), or run `voxlane demo` / serve with --demo to use the "
    "random-weight demo checkpoints."
)


def resolve_model_dir(
    name_or_path: str | os.PathLike[str],
    *,
    required: tuple[str, ...] = ("config.json",),
    any_of: tuple[str, ...] = (),
) -> Path:
    """Return a local directory holding ``required`` files (and one of ``any_of``).

    ``name_or_path`` is a local directory, or an HF hub id that is looked up in
    the local HF cache first and downloaded only if the hub is reachable.
    Raises :class:`~voxlane.errors.ModelNotFoundError` with one message saying
    what to do when the files cannot be found.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_files(path, str(name_or_path), required, any_of)
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model {name!r} is neither a directory nor a hub id. {_HINT}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelNotFoundError(
            f"model {name!r} is not a local directory and huggingface_hub is not installed. {_HINT}"
        ) from exc
    patterns = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
    local, _ = _try_snapshot(snapshot_download, name, patterns, local_only=True)
    why = "HF_HUB_OFFLINE is set"
    if local is None and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        local, error = _try_snapshot(snapshot_download, name, patterns, local_only=False)
        # The hub's own reason (a gated repo needing a login, a typo, no network) is what
        # tells the user what to fix.
        why = f"{type(error).__name__}: {error}" if error is not None else "unknown reason"
    if local is None:
        why = " ".join(why.split())[:300]
        raise ModelNotFoundError(
            f"model {name!r} is not cached and could not be downloaded ({why}). {_HINT}"
        )
    _check_files(local, name, required, any_of)
    return local


def _try_snapshot(
    download: Callable[..., str], name: str, patterns: list[str], *, local_only: bool
) -> tuple[Path | None, Exception | None]:
    try:
        path = download(repo_id=name, allow_patterns=patterns, local_files_only=local_only)
    except Exception as exc:  # hub errors come in many classes; all mean "not here"
        return None, exc
    return Path(path), None


def _check_files(path: Path, name: str, required: tuple[str, ...], any_of: tuple[str, ...]) -> None:
    missing = [f for f in required if not (path / f).is_file()]
    if any_of and not any((path / f).is_file() for f in any_of):
        missing.append(" or ".join(any_of))
    if missing:
        raise ModelNotFoundError(f"model {name!r} ({path}) lacks {', '.join(missing)}. {_HINT}")
