"""The batched decode step of fused Llama layers as one TorchScript function.

A CPU decode step of the small demo model is ~500 short torch calls. Called from Python, every
one of them pays the interpreter and dispatcher, and releases and retakes the GIL, so every
other Python thread of the server (event loop, SNAC codec thread) can slip in between and
delay the step. Scripted, the whole step runs in TorchScript's C++ interpreter under one GIL
release. Measured on the small model (int8, 1 thread, best of 8 blocks): 7.1 vs 8.7 ms at
B = 1, 7.8 vs 9.7 ms at B = 2, 11.1 vs 13.6 ms at B = 4 on a quiet process; with another
Python thread busy ~10% of the time, 7.7 vs 12.5 ms at B = 1. Same ops in the same order as
:meth:`StepModel.decode_batch`'s Python path, so the results are identical bit for bit.

TorchScript is deprecated in favour of ``torch.compile``, which on this CPU needs tens of
seconds to compile a single MLP; scripting these functions takes well under a second. If a
torch build cannot script them, :func:`decode_fn` returns None and the Python path is used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decode_fn", "heads_fn", "layer_args"]

log = logging.getLogger("voxlane.engine")

_SCRIPTED: dict[str, Any] = {}


# The helpers below are also StepModel's Python path (model.py), so both paths run the same ops.


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    # As HF's LlamaRMSNorm: normalise in float32, scale in the model's dtype.
    y = torch.rms_norm(x.float(), [x.shape[-1]], None, eps)
    return w * y.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention of one query token per sequence over all its cached keys (no mask).

    ``q`` ``[B, H, 1, D]``, ``k``/``v`` ``[B, H_kv, S, D]`` (cache slices) -> ``[B, H, 1, D]``.
    With grouped queries (``H > H_kv``), float32 on CPU and ``S >= 128``, it is two batched
    products, each KV head against its group of ``H / H_kv`` query heads (cache slices viewed,
    never expanded or copied), where SDPA's CPU kernel handles each query head separately.
    Everywhere else SDPA measured faster and is used (1 thread): below 128 keys its one call
    costs less than these four ops; with one query head per KV head (MHA) the products are
    ~10% slower; in bf16 on CPU SDPA is 2-4x faster than the products in float32 (a bf16
    ``bmm`` is slower still and rounds the scores); on a GPU it is one fused kernel that
    accumulates in float32. See docs/architecture-engine.md, "Decode attention".
    """
    bsz, h, d = q.shape[0], q.shape[1], q.shape[3]
    hk, s = k.shape[1], k.shape[2]
    if h == hk or s < 128 or q.dtype != torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    qg = q.reshape(bsz * hk, h // hk, d)  # [B Hkv, G, D]: a KV head's query group
    w = torch.bmm(qg, k.reshape(bsz * hk, s, d).transpose(1, 2)).mul_(scale).softmax(-1)
    return torch.bmm(w, v.reshape(bsz * hk, s, d)).view(bsz, h, 1, d)  # from [B Hkv, G, D]


def _int8(
    x: Tensor,
    packed: torch.classes.quantized.LinearPackedParamsBase,  # type: ignore[name-defined]
    rowsum: Tensor,
    reduce_range: bool,
) -> Tensor:
    # Int8Linear's fbgemm product. Every row is mapped onto exactly [0, 1] (its min to 0, its
    # max to 1), so fbgemm's whole-tensor activation range is [0, 1] whatever the other rows
    # are; the map is undone on the output: W (x' span + lo) = (W x') span + lo (W 1).
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)  # [..., 1] each
    span = (hi - lo).clamp_min_(1e-30)  # a constant row maps to 0, exactly
    y = torch.ops.quantized.linear_dynamic((x - lo).div_(span), packed, reduce_range)
    return y.mul_(span).addcmul_(lo, rowsum)


def _int4(x: Tensor, packed: Tensor, scales_zeros: Tensor, group_size: int) -> Tensor:
    # Int4Linear's product: torch's CPU int4 weight-only kernel on bfloat16 activations; every
    # output row is its own dot products, so a row's result does not depend on the batch.
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(rows, packed, group_size, scales_zeros)
    return y.to(x.dtype).view(list(x.shape[:-1]) + [y.shape[-1]])  # noqa: RUF005 (TorchScript)


def _float_linear(x: Tensor, w: Tensor) -> Tensor:
    """``F.linear(x, w)`` whose rows do not depend on how many rows there are (up to 64).

    MKL rounds a product differently with its row count (a single row takes its
    matrix-vector kernel; small products pick kernels by size: 1, 2, 3-15 and 16+ rows gave
    four different roundings at 512 wide), so a stream decoded alone drifted from the same
    stream batched with others: in float32 a sampled token flipped now and then and the
    frames parted (8 of 24 streams of 100 frames on the tiny model; int8 rows are exact
    either way). Up to 64 rows (a decode step's requests, the heads) go in blocks of exactly
    2, zero-padded: the same call shape for every row, so a seeded stream gives the same
    frames alone or batched. 2 because a 2-row product costs what one row does here (0.53
    vs 0.60 ms at 512 x 4096, one thread), where 4 rows cost 1.2 ms and 8 rows 1.9 ms; a
    batch pays one call per pair of rows. Larger products (prefill chunks) are one call.
    CPU only: on a GPU one call per pair of rows would cost a kernel launch each, so there
    a seeded stream is reproducible alone but may part from the same stream batched. Only
    rows of one token each (a decode step ``[B, 1, D]``, the heads ``[n, D]``): a prefill
    chunk ``[1, T, D]`` runs alone, so its call is the same whatever else runs, and blocks
    of 2 would cost a short prompt one call per token pair (first audio ~30% later)."""
    n = x.numel() // x.shape[-1]
    if n > 64 or x.device.type != "cpu" or (x.dim() > 2 and x.shape[-2] > 1):
        return F.linear(x, w)
    block = 2  # any fixed count gave the same bits at every row position (64-3,072 wide)
    rows = x.reshape(n, x.shape[-1])
    pad = (block - n % block) % block
    if pad > 0:
        zeros = torch.zeros([pad, rows.shape[1]], dtype=rows.dtype, device=rows.device)
        rows = torch.cat([rows, zeros])
    outs: list[Tensor] = []
    for i in range(0, n + pad, block):
        outs.append(F.linear(rows[i : i + block], w))
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    shape = list(x.shape[:-1])
    shape.append(w.shape[0])
    return y[:n].reshape(shape)


def _linear(
    x: Tensor,
    i: int,
    floats: list[Tensor],
    packed: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    rowsums: list[Tensor],
    int4: list[Tensor],
    int4_scales: list[Tensor],
    group_size: int,
    reduce_range: bool,
) -> Tensor:
    if len(floats) > 0:
        return _float_linear(x, floats[i])
    if len(int4) > 0:
        return _int4(x, int4[i], int4_scales[i], group_size)
    return _int8(x, packed[i], rowsums[i], reduce_range)


def _decode_layers(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_caches: list[Tensor],
    v_caches: list[Tensor],
    starts: list[int],
    norm1: list[Tensor],
    norm2: list[Tensor],
    eps1: list[float],
    eps2: list[float],
    floats: list[list[Tensor]],
    packed: list[list[torch.classes.quantized.LinearPackedParamsBase]],  # type: ignore[name-defined]
    rowsums: list[list[Tensor]],
    int4: list[list[Tensor]],
    int4_scales: list[list[Tensor]],
    group_size: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    scaling: float,
    reduce_range: bool,
) -> Tensor:
    """All layers of one decode step. ``floats``, ``packed``/``rowsums`` (int8) and
    ``int4``/``int4_scales`` hold, per projection kind (qkv, o, gate_up, down), one entry per
    layer; the lists of the kinds of weight the model does not have are empty."""
    bsz = x.shape[0]
    h, hk, d = n_heads, n_kv_heads, head_dim
    for i in range(len(norm1)):
        # Per kind (qkv, o, gate_up, down): its float, int8 (packed, row sums) and int4 lists.
        wq = (floats[0], packed[0], rowsums[0], int4[0], int4_scales[0])
        wo = (floats[1], packed[1], rowsums[1], int4[1], int4_scales[1])
        wg = (floats[2], packed[2], rowsums[2], int4[2], int4_scales[2])
        wd = (floats[3], packed[3], rowsums[3], int4[3], int4_scales[3])
        a = _rms(x, norm1[i], eps1[i])
        qkv = _linear(a, i, wq[0], wq[1], wq[2], wq[3], wq[4], group_size, reduce_range)
        qkv = qkv.view(bsz, 1, h + 2 * hk, d).transpose(1, 2)
        qk = qkv[:, : h + hk]
        qk = qk * cos + _rotate_half(qk) * sin
        q = qk[:, :h]
        k = qk[:, h:]
        v = qkv[:, h + hk :]
        outs: list[Tensor] = []
        for b in range(bsz):
            s = starts[b]
            kc = k_caches[b]
            vc = v_caches[b]
            kc[i, 0, :, s] = k[b, :, 0]
            vc[i, 0, :, s] = v[b, :, 0]
            outs.append(_attend(q[b : b + 1], kc[i, :, :, : s + 1], vc[i, :, :, : s + 1], scaling))
        o = torch.cat(outs).transpose(1, 2).reshape(bsz, 1, h * d)
        x = x + _linear(o, i, wo[0], wo[1], wo[2], wo[3], wo[4], group_size, reduce_range)
        a = _rms(x, norm2[i], eps2[i])
        gate_up = _linear(a, i, wg[0], wg[1], wg[2], wg[3], wg[4], group_size, reduce_range)
        gate, up = gate_up.chunk(2, -1)
        m = F.silu(gate) * up
        x = x + _linear(m, i, wd[0], wd[1], wd[2], wd[3], wd[4], group_size, reduce_range)
    return x


def _legal_heads(
    hidden: list[Tensor],
    positions: list[int],
    with_eos: list[bool],
    floats: list[Tensor],
    packed: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    rowsums: list[Tensor],
    eos_row: Tensor,
    reduce_range: bool,
) -> list[Tensor]:
    """Legal-row logits of each hidden state at its frame position (``EngineCore._heads``):
    one product per position for all the rows there, plus the EOS logit where ``with_eos``
    (position 0 only)."""
    no_int4: list[Tensor] = []  # the heads are float or int8 (see StepModel.head_slice)
    out: list[Tensor] = []
    for _ in range(len(hidden)):
        out.append(eos_row)  # placeholders, all replaced below
    for p in range(len(rowsums) if len(floats) == 0 else len(floats)):
        rows: list[int] = []
        for b in range(len(hidden)):
            if positions[b] == p:
                rows.append(b)
        if len(rows) == 0:
            continue
        h = torch.stack([hidden[b] for b in rows])
        logits = _linear(h, p, floats, packed, rowsums, no_int4, no_int4, 0, reduce_range)
        eos = _float_linear(h, eos_row) if p == 0 else h  # [n, 1] (unused elsewhere)
        for j in range(len(rows)):
            b = rows[j]
            out[b] = torch.cat((logits[j], eos[j])) if p == 0 and with_eos[b] else logits[j]
    return out


def _script(name: str, fn: Callable[..., Any]) -> Callable[..., Any] | None:
    if name not in _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
                _SCRIPTED[name] = torch.jit.script(fn)
        except Exception:  # an old or future torch without these features: Python path
            log.debug("scripting %s failed; using the Python path", name, exc_info=True)
            _SCRIPTED[name] = None
    return _SCRIPTED[name]


def decode_fn() -> Callable[..., Tensor] | None:
    """The scripted :func:`_decode_layers` (compiled once per process), or None if this torch
    build cannot script it."""
    return _script("decode", _decode_layers)


def heads_fn() -> Callable[..., list[Tensor]] | None:
    """The scripted :func:`_legal_heads`, or None."""
    return _script("heads", _legal_heads)


def weight_args(
    weights: list[Any],
) -> tuple[list[Tensor], list[Any], list[Tensor], list[Tensor], list[Tensor]]:
    """``(floats, packed, rowsums, int4, int4_scales)`` for :func:`_linear`: float weights as
    they are, fbgemm packed weights and row sums (:class:`~voxlane.server.engine.model.Int8Linear`),
    or int4 packed weights and their scales and zeros
    (:class:`~voxlane.server.engine.model.Int4Linear`); the other lists empty."""
    if all(isinstance(w, Tensor) for w in weights):
        return list(weights), [], [], [], []
    if all(hasattr(w, "_int4") for w in weights):
        return [], [], [], [w._int4 for w in weights], [w._scales_zeros for w in weights]
    return [], [w._packed for w in weights], [w._rowsum for w in weights], [], []


def layer_args(fused: list[Any]) -> tuple[list[list[Any]], ...]:
    """Per projection kind (qkv, o, gate_up, down), :func:`weight_args` of the layers:
    ``(floats, packed, rowsums, int4, int4_scales)``, each a list of four lists."""
    kinds = ("wqkv", "wo", "w_gate_up", "w_down")
    args = [weight_args([getattr(layer, kind) for layer in fused]) for kind in kinds]
    return tuple([a[j] for a in args] for j in range(5))
