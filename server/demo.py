"""Random-weight demo checkpoints of the exact Orpheus and SNAC architectures.

No model hub is needed: these files are written locally, in the formats the real
checkpoints use, and are loaded by the same functions that load
``canopylabs/orpheus-3b-0.1-ft`` and ``hubertsiuzdak/snac_24khz``. Random weights
make noise, not speech: they exist to test structure, numerics and timing.

Layout under the demo root (``$VOXLANE_DEMO_DIR`` or ``~/.cache/voxlane/demo``)::

    snac/       config.json + pytorch_model.bin        (SNAC 24 kHz, exact config)
    lm-tiny/    config.json + model.safetensors + tokenizer files
    lm-small/   same, hidden 512, 8 layers (benchmarks)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DEMO_SEED",
    "SNAC_24KHZ_CONFIG",
    "default_demo_root",
    "ensure_demo_snac",
    "write_demo_snac",
]

DEMO_SEED = 1234
_FORMAT_VERSION = "1"  # bump when the files written change, so caches are rebuilt

#: The exact configuration of hubertsiuzdak/snac_24khz.
SNAC_24KHZ_CONFIG: dict = {
    "sampling_rate": 24000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}


def default_demo_root() -> Path:
    """Where demo checkpoints live unless a caller names a directory."""
    env = os.environ.get("VOXLANE_DEMO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "voxlane" / "demo"


def _materialize(target: Path, writer: Callable[[Path], None], stamp: str) -> Path:
    """Run ``writer`` into a temporary sibling and move it to ``target`` atomically.

    A ``.voxlane-demo`` stamp records what was written; a directory with the same
    stamp is reused as is, so tests and benchmarks build each checkpoint once.
    """
    marker = target / ".voxlane-demo"
    if marker.is_file() and marker.read_text() == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        writer(tmp)
        (tmp / ".voxlane-demo").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_demo_snac(out_dir: str | os.PathLike[str], *, seed: int = DEMO_SEED) -> Path:
    """Write a random-weight SNAC 24 kHz checkpoint (``config.json`` + ``pytorch_model.bin``).

    This is the file format of ``hubertsiuzdak/snac_24khz``, which
    ``snac.SNAC.from_pretrained`` reads.
    """
    import torch
    from snac import SNAC

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SNAC(**SNAC_24KHZ_CONFIG).eval()
    (out / "config.json").write_text(json.dumps(SNAC_24KHZ_CONFIG, indent=2))
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def ensure_demo_snac(root: str | os.PathLike[str] | None = None) -> Path:
    """Return ``<root>/snac``, writing the demo SNAC checkpoint if it is missing."""
    base = Path(root) if root is not None else default_demo_root()
    stamp = f"snac v{_FORMAT_VERSION} seed {DEMO_SEED}"
    return _materialize(base / "snac", lambda d: write_demo_snac(d), stamp)
