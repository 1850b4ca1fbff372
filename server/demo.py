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
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEMO_LM_SIZES",
    "DEMO_SEED",
    "ORPHEUS_3B_CONFIG",
    "SNAC_24KHZ_CONFIG",
    "DemoLMSize",
    "default_demo_root",
    "demo_lm_config",
    "ensure_demo_lm",
    "ensure_demo_snac",
    "write_demo_lm",
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


#: The configuration of ``canopylabs/orpheus-3b-0.1-ft`` (Llama-3.2-3B with the
#: vocabulary grown to 156,940 rows), in the legacy key layout its config.json uses.
#: The hub is unreachable here; assembled from stored copies found with the search
#: tool: the Orpheus Llama config in Blaizzy/mlx-audio's TTS tests (hidden 3072,
#: 28 layers, 24 heads, 8 KV heads, head_dim 128, intermediate 8192, rope llama3
#: 32/4/1/8192, theta 500000, tied embeddings, vocab 156940), a "voicehub" Orpheus
#: test asset (bos 128000, eos 128009, pad 128004, the same rope and tying) and
#: meta-llama/Llama-3.2's config for the rest (rms_norm_eps, silu, no biases).
ORPHEUS_3B_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "pad_token_id": 128004,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 24,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 156940,
}


@dataclass(frozen=True)
class DemoLMSize:
    """The size fields of a demo LM; everything else is :data:`ORPHEUS_3B_CONFIG`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        # Same rule as the real model: 3072 / 24 heads = 128.
        return self.hidden_size // self.num_attention_heads


#: ``tiny`` keeps tests fast; ``small`` is for benchmarks.
DEMO_LM_SIZES: dict[str, DemoLMSize] = {
    "tiny": DemoLMSize(128, 2, 4, 2, 256),
    "small": DemoLMSize(512, 8, 8, 2, 2048),
}


def demo_lm_config(size: str = "tiny") -> dict:
    """The config.json fields of demo LM ``size``: Orpheus 3B's with smaller dimensions."""
    try:
        dims = DEMO_LM_SIZES[size]
    except KeyError:
        raise ValueError(
            f"unknown demo LM size {size!r}; choose one of {sorted(DEMO_LM_SIZES)}"
        ) from None
    return {
        **ORPHEUS_3B_CONFIG,
        "hidden_size": dims.hidden_size,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "intermediate_size": dims.intermediate_size,
        "head_dim": dims.head_dim,
    }


def write_demo_lm(
    out_dir: str | os.PathLike[str], size: str = "tiny", *, seed: int = DEMO_SEED
) -> Path:
    """Write a random-weight Orpheus-architecture LM with its tokenizer to ``out_dir``.

    The files are those of ``canopylabs/orpheus-3b-0.1-ft``: ``config.json``,
    ``model.safetensors`` (bfloat16, like the released weights; tied embeddings
    stored once) and the tokenizer. The same ``seed`` gives byte-identical weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from voxlane.server.tokenizer import build_orpheus_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = demo_lm_config(size)
    fields.pop("architectures")
    fields.pop("model_type")
    fields.pop("torch_dtype")
    config = LlamaConfig(**fields)
    # Initialise in float32 on CPU under a fixed seed (the random stream does not
    # depend on the thread count), then store bfloat16 as the real checkpoint does.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    build_orpheus_tokenizer().save_pretrained(out)
    # transformers 5 records its new class name; the released checkpoint (and older
    # transformers) use PreTrainedTokenizerFast, which transformers 5 still maps.
    tok_config = out / "tokenizer_config.json"
    fields = json.loads(tok_config.read_text())
    fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(fields, indent=2) + "\n")
    return out


def ensure_demo_lm(size: str = "tiny", root: str | os.PathLike[str] | None = None) -> Path:
    """Return ``<root>/lm-<size>``, writing the demo LM there if it is missing.

    ``root`` defaults to :func:`default_demo_root`. Load the result with
    :func:`voxlane.server.lm.load_speech_lm`.
    """
    demo_lm_config(size)  # reject an unknown size before touching the disk
    base = Path(root) if root is not None else default_demo_root()
    stamp = f"lm-{size} v{_FORMAT_VERSION} seed {DEMO_SEED}"
    return _materialize(base / f"lm-{size}", lambda d: write_demo_lm(d, size), stamp)
