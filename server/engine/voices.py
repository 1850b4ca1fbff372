"""Voices and the store of their prefilled prefixes.

A :class:`Voice` says how a segment's prompt is built and which token prefix precedes every
segment. Built-in (finetuned) voices have no prefix: the name goes inside each prompt
(``"tara: text"``). A cloned voice's prefix is the reference transcript's turn plus its audio
tokens (:func:`voxlane.server.orpheus.clone_prefix`); it is prefilled once, in the engine
thread, and kept read-only in a :class:`VoicePrefixStore` (LRU under a byte budget). A session
copies the prefix into its own cache when it starts (a memcpy, far cheaper than the prefill:
see docs/architecture-engine.md); the store entry itself is never written.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from voxlane.server.orpheus import (
    Frame,
    TextEncoder,
    clone_prefix,
    clone_prompt,
    finetuned_prompt,
    validate_frame,
)

__all__ = ["Voice", "VoicePrefix", "VoicePrefixStore"]


@dataclass(frozen=True)
class Voice:
    """A voice handle; cheap, immutable, shareable between sessions.

    ``key`` identifies the prefix in the store: ``"builtin:<name>"`` or ``"clone:<sha256>"``
    of the transcript and reference frames.
    """

    key: str
    name: str | None
    prefix_tokens: tuple[int, ...] = field(repr=False)

    @property
    def is_clone(self) -> bool:
        return self.key.startswith("clone:")

    @classmethod
    def builtin(cls, name: str) -> Voice:
        """A finetuned speaker (``"tara"``, ...); no prefix."""
        return cls(key=f"builtin:{name}", name=name, prefix_tokens=())

    @classmethod
    def clone(
        cls, encode: TextEncoder, transcript: str, reference_frames: Sequence[Sequence[int]]
    ) -> Voice:
        """A zero-shot voice from a reference transcript and its SNAC frames."""
        frames: list[Frame] = [validate_frame(f) for f in reference_frames]
        digest = hashlib.sha256(transcript.encode())
        for f in frames:
            digest.update(bytes(str(f), "ascii"))
        tokens = tuple(clone_prefix(encode, transcript, frames))
        return cls(key=f"clone:{digest.hexdigest()}", name=None, prefix_tokens=tokens)

    def prompt(self, encode: TextEncoder, text: str) -> list[int]:
        """Token ids of a segment speaking ``text`` in this voice."""
        if self.is_clone:
            return clone_prompt(encode, text)
        return finetuned_prompt(encode, self.name, text)


@dataclass(eq=False)
class VoicePrefix:
    """Prefilled keys/values (``[L, 1, H_kv, P, D]``) of a voice prefix; read-only."""

    tokens: tuple[int, ...]
    k: Tensor
    v: Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class VoicePrefixStore:
    """LRU map ``voice key -> VoicePrefix`` under ``budget_bytes``.

    The entry just inserted is always kept, even alone over budget, so a voice that was
    asked for can be used. Only the engine thread touches the store.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, VoicePrefix] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def get(self, key: str) -> VoicePrefix | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, prefix: VoicePrefix) -> None:
        self._entries[key] = prefix
        self._entries.move_to_end(key)
        total = self.nbytes
        while total > self.budget_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            total -= old.nbytes
