"""Load the Orpheus speech LM (a Llama-architecture causal LM) and its tokenizer.

One loader for every checkpoint: the real ``canopylabs/orpheus-3b-0.1-ft`` on a
user's machine, any local finetune in the same format, and the random-weight
demo models that :mod:`voxlane.server.demo` writes. Loading never runs on an
asyncio event loop (it takes seconds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from voxlane.errors import ModelFormatError
from voxlane.server.hub import resolve_model_dir
from voxlane.server.orpheus import END_OF_TEXT, START_OF_TEXT, VOCAB_SIZE
from voxlane.server.tokenizer import TextEncoder, load_orpheus_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_SPEECH_LM", "WEIGHT_FILES", "SpeechLM", "load_speech_lm"]

DEFAULT_SPEECH_LM = "canopylabs/orpheus-3b-0.1-ft"
#: A checkpoint directory needs config.json and one of these.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

DTypeName = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class SpeechLM:
    """A loaded speech LM: the model (eval mode), its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    _text: TextEncoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_text", TextEncoder(self.tokenizer))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, starting with BOS (128000) as Orpheus prompts expect.

        Text is only ever text: spellings of special or added tokens (``<|eot_id|>``,
        ``<custom_token_4>``) become the ids of their characters, never control or audio ids.
        """
        return self._text(text)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The ``[vocab, hidden]`` output projection (the embedding when tied)."""
        return self.model.get_output_embeddings().weight

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (at least :data:`~voxlane.server.orpheus.VOCAB_SIZE`)."""
        return int(self.lm_head_weight.shape[0])

    @property
    def device(self) -> torch.device:
        """Device holding the weights."""
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.lm_head_weight.dtype


def _torch_dtype(dtype: DTypeName | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    try:
        return names[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}") from None


def _dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the weights' dtype in the installed transformers.

    ``dtype`` exists from 4.56 (older versions pass it on to the model's ``__init__``, which
    fails with a ``TypeError``); ``torch_dtype`` is deprecated from 4.56 on.
    """
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _check_config(config: object, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    if model_type != "llama" or (architectures and "LlamaForCausalLM" not in architectures):
        raise ModelFormatError(
            f"{where} is a {model_type!r} model ({', '.join(architectures) or 'no architectures'});"
            " the speech LM must be a Llama-architecture causal LM (LlamaForCausalLM) "
            "such as canopylabs/orpheus-3b-0.1-ft"
        )
    vocab = getattr(config, "vocab_size", 0) or 0
    if vocab < VOCAB_SIZE:
        raise ModelFormatError(
            f"{where} has a vocabulary of {vocab} ids; an Orpheus speech LM needs at least "
            f"{VOCAB_SIZE} (text, control and 7 x 4096 audio tokens)"
        )


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    for name, expected in (("<|begin_of_text|>", START_OF_TEXT), ("<|eot_id|>", END_OF_TEXT)):
        actual = tokenizer.convert_tokens_to_ids(name)
        if actual != expected:
            raise ModelFormatError(
                f"the tokenizer of {where} maps {name} to {actual}, not {expected}: "
                "it is not the Llama-3 tokenizer Orpheus uses"
            )


def load_speech_lm(
    name_or_path: str | os.PathLike[str] = DEFAULT_SPEECH_LM,
    *,
    dtype: DTypeName | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> SpeechLM:
    """Load an Orpheus speech LM from a hub id or a local checkpoint directory.

    The directory must hold ``config.json``, the weights (one of
    :data:`WEIGHT_FILES`) and the tokenizer. For the random-weight demo, pass
    ``voxlane.server.demo.ensure_demo_lm("tiny")``.

    Raises :class:`~voxlane.errors.ModelNotFoundError` (with what to do) if the
    checkpoint cannot be found, and :class:`~voxlane.errors.ModelFormatError`
    if it is not a Llama causal LM covering the Orpheus vocabulary.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    torch_dtype = _torch_dtype(dtype)
    path = resolve_model_dir(name_or_path, required=("config.json",), any_of=WEIGHT_FILES)
    where = f"model {str(name_or_path)!r} ({path})"
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:  # unknown model_type, malformed JSON
        raise ModelFormatError(f"{where}: config.json cannot be read: {exc}") from exc
    _check_config(config, where)
    try:
        tokenizer = load_orpheus_tokenizer(path)
    except (ValueError, OSError) as exc:
        raise ModelFormatError(f"{where}: no usable tokenizer files: {exc}") from exc
    _check_tokenizer(tokenizer, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, **{_dtype_keyword(): torch_dtype}
        )
    except (ValueError, OSError, RuntimeError) as exc:  # truncated or mismatched weights
        raise ModelFormatError(f"{where}: weights cannot be loaded: {exc}") from exc
    if not isinstance(model, LlamaForCausalLM):  # pragma: no cover - guarded by _check_config
        raise ModelFormatError(f"{where} loaded as {type(model).__name__}, not LlamaForCausalLM")
    model = model.to(device).eval()
    return SpeechLM(model=model, tokenizer=tokenizer, path=path)
