"""The Orpheus text tokenizer, built offline from the Llama-3 BPE file.

Orpheus (``canopylabs/orpheus-3b-0.1-ft``) uses the Llama-3 tokenizer unchanged
for text, plus 28,684 added tokens ``<custom_token_N>`` at id ``128256 + N``
(control tokens and the 7 x 4,096 audio tokens of :mod:`voxlane.server.orpheus`).
:func:`build_orpheus_tokenizer` rebuilds exactly that tokenizer from the BPE
ranks shipped in the ``llama-models`` wheel, so no model hub is needed.

Loading: ``AutoTokenizer.from_pretrained`` spends several seconds deep-copying
the 28,940 added-token records it parses out of the JSON files in Python.
:func:`load_orpheus_tokenizer` hands ``tokenizer.json`` straight to the Rust
``tokenizers`` backend instead (same vocabulary, merges, added tokens and
post-processor, so the same ids) and is 4-5x faster.

Encoding user text: the full tokenizer matches its 28,940 added tokens *inside* text, so
the string ``<custom_token_4>`` would become id 128260 (end of the human turn) and
``<|eot_id|>`` id 128009. :class:`TextEncoder` encodes with the BPE model alone: any
text, whatever it spells, becomes Llama-3 text ids (below 128,000), as plain characters.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "EOT_TOKEN",
    "LLAMA3_SPECIAL_TOKENS",
    "NUM_CUSTOM_TOKENS",
    "PAD_TOKEN",
    "TEXT_VOCAB_SIZE",
    "TextEncoder",
    "build_orpheus_tokenizer",
    "custom_token",
    "llama3_bpe_file",
    "load_orpheus_tokenizer",
]

BOS_TOKEN = "<|begin_of_text|>"  # id 128000
EOT_TOKEN = "<|eot_id|>"  # id 128009, the eos of the Orpheus config
PAD_TOKEN = "<|finetune_right_pad_id|>"  # id 128004, the pad of the Orpheus config

_LLAMA3_BASE_VOCAB = 128_000
TEXT_VOCAB_SIZE = _LLAMA3_BASE_VOCAB
"""Ids below this are text (the BPE vocabulary); every id from it up is a control or audio
token: the 256 Llama-3 specials, then Orpheus' custom tokens."""
_LLAMA3_NUM_SPECIAL = 256
_FIRST_CUSTOM_ID = _LLAMA3_BASE_VOCAB + _LLAMA3_NUM_SPECIAL  # 128256
NUM_CUSTOM_TOKENS = 28_684  # 128256 + 28684 = 156,940 = orpheus.VOCAB_SIZE
_MODEL_MAX_LENGTH = 131_072  # max_position_embeddings of Llama-3.2-3B / Orpheus

# Same order and names as llama_models/llama3/tokenizer.py: ids 128000..128255.
_NAMED_SPECIALS = (
    BOS_TOKEN,
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD_TOKEN,
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    EOT_TOKEN,
    "<|python_tag|>",
    "<|image|>",
)
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIALS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(_LLAMA3_NUM_SPECIAL - len(_NAMED_SPECIALS))
)


def custom_token(n: int) -> str:
    """Name of Orpheus added token ``n`` (id ``128256 + n``), e.g. ``<custom_token_10>``."""
    return f"<custom_token_{n}>"


def llama3_bpe_file() -> Path:
    """Path of the Llama-3 tiktoken BPE ranks shipped in the ``llama-models`` wheel."""
    try:
        import llama_models
    except ImportError as exc:
        raise ImportError(
            "The offline Orpheus tokenizer needs the `llama-models` package "
            "(pip install 'voxlane[server]')."
        ) from exc
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"llama-models does not ship {path}")
    return path


def _llama3_split_pattern() -> str:
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.pat_str


@functools.lru_cache(maxsize=1)
def _orpheus_backend_json() -> str:
    """The serialized ``tokenizers`` backend (built once per process: deriving the
    BPE merges from the ranks is the slow part)."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern = _llama3_split_pattern()
    # Only the converter's BPE model (vocabulary and merges from the ranks): its `converted()`
    # takes the special tokens under a keyword that transformers renamed in 4.56
    # (`additional_special_tokens` -> `extra_special_tokens`), so the rest is done here.
    backend = TikTokenConverter(vocab_file=str(llama3_bpe_file()), pattern=pattern).tokenizer()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(name, normalized=False, special=True) for name in LLAMA3_SPECIAL_TOKENS]
    )
    if backend.get_vocab_size() != _FIRST_CUSTOM_ID:  # pragma: no cover - wheel changed
        raise RuntimeError(f"Llama-3 tokenizer has {backend.get_vocab_size()} ids, not 128256")
    # Orpheus added these with `add_tokens`: plain (non-special, normalized) added tokens.
    backend.add_tokens(
        [
            AddedToken(custom_token(n), normalized=True, special=False)
            for n in range(NUM_CUSTOM_TOKENS)
        ]
    )
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return backend.to_str()


def build_orpheus_tokenizer() -> PreTrainedTokenizerFast:
    """Build the Orpheus tokenizer (156,940 ids) from the Llama-3 BPE file, offline.

    Text ids are those of Llama-3; encoding prepends ``<|begin_of_text|>`` (128000)
    through a post-processor, as the released tokenizer does. The first call takes a
    few seconds (later calls reuse the conversion); each call returns a new object.
    """
    from transformers import PreTrainedTokenizerFast

    # Through a file: `tokenizer_object=` would deep-copy (re-serialize) the backend.
    with tempfile.TemporaryDirectory(prefix="voxlane-tok-") as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(_orpheus_backend_json(), encoding="utf-8")
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path),
            bos_token=BOS_TOKEN,
            eos_token=EOT_TOKEN,
            pad_token=PAD_TOKEN,
            model_max_length=_MODEL_MAX_LENGTH,
        )


def _token_string(value: object) -> str | None:
    # tokenizer_config.json stores a special token as a string or an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_orpheus_tokenizer(model_dir: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved in ``model_dir`` (a real Orpheus checkpoint or a demo).

    With a ``tokenizer.json`` the Rust backend reads it directly (fast path);
    the named special tokens and ``model_max_length`` come from
    ``tokenizer_config.json``. Otherwise falls back to ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(model_dir)
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        return AutoTokenizer.from_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    kwargs: dict[str, object] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = _token_string(config.get(key))
        if token is not None:
            kwargs[key] = token
    if isinstance(config.get("model_max_length"), int):
        kwargs["model_max_length"] = config["model_max_length"]
    if isinstance(config.get("chat_template"), str):
        kwargs["chat_template"] = config["chat_template"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **kwargs)
    tokenizer.name_or_path = str(path)
    return tokenizer


class TextEncoder:
    """Text -> token ids for prompts, starting with ``<|begin_of_text|>``; user text can
    never produce a control or audio id.

    ``tokenizer`` is the loaded Orpheus tokenizer (a fast one). Only its BPE model and
    pre-tokenizer are used (shared, not copied): no added-token matching and no
    post-processor, so ``"<|eot_id|>"`` or ``"<custom_token_4>"`` in text is encoded as
    the characters it is made of. Every id but the leading BOS is below
    :data:`TEXT_VOCAB_SIZE`. Thread-safe (the Rust tokenizer is).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from tokenizers import Tokenizer

        from voxlane.errors import ModelFormatError

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelFormatError("the Orpheus tokenizer must be a fast (tokenizers) one")
        plain = Tokenizer(backend.model)
        plain.pre_tokenizer = backend.pre_tokenizer
        if backend.normalizer is not None:
            plain.normalizer = backend.normalizer
        if plain.get_vocab_size() > TEXT_VOCAB_SIZE:
            # The model's own vocabulary holds non-text ids: the guarantee would not hold.
            raise ModelFormatError(
                f"the tokenizer's BPE vocabulary has {plain.get_vocab_size()} ids, "
                f"more than Llama-3's {TEXT_VOCAB_SIZE} text ids"
            )
        self._plain = plain
        self.bos_id = int(backend.token_to_id(BOS_TOKEN))

    def __call__(self, text: str) -> list[int]:
        """``[BOS, *text ids]``; a lone surrogate (not encodable) is taken as U+FFFD."""
        from voxlane.protocol import replace_lone_surrogates

        text = replace_lone_surrogates(text)
        return [self.bos_id, *self._plain.encode(text, add_special_tokens=False).ids]
