"""A small Llama forward over a Hugging Face model's own modules, on a position-addressed KV cache.

gpt-fast style: the KV cache is preallocated (``[L, B, H_kv, S_max, D]``) and a token at
position ``i`` lives in slot ``i``. One function, :meth:`StepModel.forward`, serves prefill
(``T`` tokens) and decode (``T == 1``). The weights are the HF model's modules (embeddings,
projections, RMSNorms, MLPs, final norm, ``rotary_emb``), so numerics match HF's forward,
including Llama-3 RoPE scaling.

Keys are cached *after* RoPE. Because rotations compose, rotating a cached key by ``-delta``
equals the key computed at ``position - delta``: :meth:`KVCache.evict` deletes a span and
shifts what follows left, re-indexing the shifted keys, so positions stay contiguous and
bounded however long a session lasts (see docs/architecture-engine.md for the measurement
that chose this over re-prefilling).

``quantize="int8"`` stores every projection of the decoder layers as per-output-channel
symmetric int8 (:class:`Int8Linear`; activations stay float): a CPU decode step is bound by
reading the weights, and int8 reads a quarter of fp32's bytes. ``quantize="int4"``
(:class:`Int4Linear`, CPU) halves that again for decode steps, keeping int8 for prefill.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from voxlane.errors import ContextOverflowError, EngineError, ModelFormatError

from . import native
from .config import Quantize
from .scripted import _attend, _float_linear, _int4, _int8, _rotate_half
from .scripted import _rms as _rms_norm

__all__ = ["Int4Linear", "Int8Kernel", "Int8Linear", "KVCache", "StepModel"]

Int8Kernel = Literal["native", "fbgemm", "weight_only"]


def _has_vnni() -> bool:
    """True if this CPU has AVX512-VNNI (fbgemm's int8 kernels then accumulate without int16
    saturation; torch's own qconfig check)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(capabilities is not None and capabilities().get("avx512_vnni", False))


def _default_kernel(weight: Tensor) -> Int8Kernel:
    """Native for CPU weights of the shapes its kernel takes (when it builds here), else fbgemm
    on CPU, else weight-only."""
    if weight.device.type != "cpu":
        return "weight_only"
    if native.fits(weight.shape) and native.library() is not None:
        return "native"
    return "fbgemm" if _fbgemm_available() else "weight_only"


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic"
    )


class Int8Linear:
    """``x @ weight.T`` with ``weight`` stored as per-output-channel symmetric int8.

    Row ``r`` is ``round(weight[r] / s[r])`` clamped to -127..127, ``s[r] = max|weight[r]| / 127``;
    activations stay float. Two kernels behind the same call:

    - ``"fbgemm"`` (CPU): fbgemm's prepacked int8 GEMM (``torch.ops.quantized.linear_dynamic``),
      which quantizes its input to uint8 on the fly with one range for the whole tensor. To
      make that range per row, each row is first mapped affinely onto exactly ``[0, 1]``
      (``x' = (x - lo) / (hi - lo)``, undone on the output with the weight's row sums). So
      every row (token) gets its own full 8-bit range, and a row's result does not depend on
      the other rows of the batch: ``decode_batch`` rows equal single forwards bit for bit.
    - ``"native"`` (CPU): the same scheme in voxlane's own C kernel (``native.c``, built on
      first use; AVX512-VNNI where the CPU has it). It also serves the native decode step
      (:class:`~voxlane.server.engine.native.NativeStep`), which runs whole decode steps of
      such layers in one call.
    - ``"weight_only"`` (any device, meant for GPUs, where fbgemm does not exist): the int8
      weight is converted to the input's dtype per call and the scale applied to the output
      (``F.linear(x, w.to(x.dtype)) * s``, as gpt-fast does). It keeps a quarter (bf16: half)
      of the weight bytes resident; its speed depends on the device (on a CPU it is slower
      than float: use fbgemm there).

    ``kernel=None`` picks, for CPU weights, native when it builds here, else fbgemm when this
    torch build has it; weight-only elsewhere.
    """

    def __init__(self, weight: Tensor, kernel: Int8Kernel | None = None) -> None:
        if weight.dim() != 2:
            raise EngineError(f"Int8Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        if kernel is None:
            kernel = _default_kernel(weight)
        if kernel == "native" and (weight.device.type != "cpu" or native.library() is None):
            raise EngineError(
                f"the native int8 kernel needs CPU weights and a C compiler, not {weight.device}"
                + ("" if weight.device.type != "cpu" else " (it did not build: see the log)")
            )
        if kernel == "fbgemm" and (weight.device.type != "cpu" or not _fbgemm_available()):
            raise EngineError(
                f"the fbgemm int8 kernel needs a CPU build with fbgemm, not {weight.device}"
            )
        self.kernel: Int8Kernel = kernel
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        w = weight.detach().float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # [out]; 0-rows stay 0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self._packed: object | None = None
        # fbgemm quantizes activations to 8 bits (asymmetric, per call). Without VNNI its
        # AVX2/AVX512 kernels add u8 x s8 products pairwise in saturating int16, which 8-bit
        # activations can overflow; 7 bits ("reduce_range") cannot, but cost ~3 dB of logit
        # SNR on the small model (docs/architecture-engine.md). So: 8 bits only with VNNI.
        self.reduce_range = not _has_vnni()
        self._q: Tensor | None = None
        self._scale: Tensor | None = None
        self._rowsum: Tensor | None = None
        # (packed weights, their C description, the library): built once, used every call.
        self._native: tuple[Tensor, native._Linear, Any] | None = None
        if kernel == "native":
            self._rowsum = q.float().sum(dim=1) * scale  # [out]: W_int8 @ 1, in float
            self._scale = scale.float().contiguous()
            packed = native.pack(q)
            desc = native.linear_struct(packed, self._scale, self._rowsum)
            self._native = (packed, desc, native.library())
        elif kernel == "fbgemm":
            self._rowsum = q.float().sum(dim=1) * scale  # [out]: W_int8 @ 1, in float
            with warnings.catch_warnings():
                # torch deprecates quantized tensor creation; the packed kernel is what we use.
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
        else:
            self._q = q  # [out, in] int8
            self._scale = scale.to(weight.dtype)  # [out]

    def __call__(self, x: Tensor) -> Tensor:
        if self._native is not None:
            y = native.linear(self._native[2], self._native[1], x)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self._packed is not None:
            y = _int8(x.float(), self._packed, self._rowsum, self.reduce_range)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        return F.linear(x, self._q.to(x.dtype)) * self._scale.to(x.dtype)  # type: ignore[union-attr]

    def native_struct(self) -> native._Linear:
        """The C description of this map for the native step (``kernel="native"`` only)."""
        if self._native is None:
            raise EngineError(f"this Int8Linear uses the {self.kernel} kernel, not the native one")
        return self._native[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 values and scales (fbgemm's packed layout adds a little padding)."""
        return self.out_features * (self.in_features + 4)


def _int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


#: Group sizes torch's CPU int4 kernel takes, largest (fewest scale bytes) first.
INT4_GROUP_SIZES = (128, 64, 32)


class Int4Linear:
    """``x @ weight.T`` for decode steps from 4-bit weights; prefill chunks from an int8 copy.

    A CPU decode step reads every weight once per token, so its time follows the weight bytes:
    int4 reads half of int8's. Each group of ``group_size`` consecutive inputs of an output row
    gets its own scale and offset (asymmetric, as gpt-fast's int4 and llama.cpp's Q4 formats):
    ``w ~ (q - 8) * scale + zero`` with ``q`` in 0..15 and ``scale``/``zero`` in bfloat16.
    The product is torch's CPU int4 weight-only kernel (``_weight_int4pack_mm_for_cpu``) on
    bfloat16 activations, accumulated in float32. Every output row is its own dot products, so a
    ``decode_batch`` row equals the same token decoded alone bit for bit.

    The int4 kernel unpacks every weight for every input row: it beats fbgemm's int8 GEMM at
    1-2 rows, is level at ~4 and slower beyond (docs/architecture-engine.md, "int4 weights"). A
    prefill chunk (``x`` ``[B, T, D]`` with ``T > 1``, up to thousands of rows) therefore runs
    an :class:`Int8Linear` of the same float weights, kept alongside: 1.5 bytes per weight
    resident instead of int8's 1 (Orpheus 3B: ~4.5 GB against 3 GB int8 and 6 GB bf16).

    CPU only (no GPU kernel is wired up here). ``group_size`` (default: the largest of
    :data:`INT4_GROUP_SIZES` that fits) must divide the input features, and the output features
    must be a multiple of 16 (the kernel's tiles); Llama layers of any published size fit.
    """

    def __init__(self, weight: Tensor, group_size: int | None = None) -> None:
        if weight.dim() != 2:
            raise EngineError(f"Int4Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        if weight.device.type != "cpu":
            raise EngineError(
                f"int4 weights run on CPU only, not {weight.device}: use quantize='int8' or 'none'"
            )
        if not _int4_available():
            raise EngineError("this torch build has no CPU int4 kernel: use quantize='int8'")
        n, k = weight.shape
        if group_size is None:
            group_size = next((g for g in INT4_GROUP_SIZES if k % g == 0), None)
        if group_size not in INT4_GROUP_SIZES or k % group_size:
            raise EngineError(
                f"int4 groups of {group_size} do not fit {k} input features"
                f" (the kernel takes groups of {', '.join(map(str, INT4_GROUP_SIZES))})"
            )
        if n % 16:
            raise EngineError(f"int4 weights need a multiple of 16 output features, not {n}")
        self.out_features, self.in_features = n, k
        self.group_size = group_size
        self.dtype = weight.dtype
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [n, groups]
        # Rounded to bfloat16 first, so the codes are chosen against the values the kernel uses.
        scale = ((hi - lo) / 15).clamp_min(1e-12).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()  # the value of code 8
        q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15)
        codes = q.to(torch.int32).reshape(n, k)
        self._int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self._scales_zeros = (
            torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
        )  # [groups, n, 2], the kernel's layout
        self.prefill = Int8Linear(weight)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and x.shape[1] > 1:  # [B, T > 1, D]: a prefill chunk
            return self.prefill(x)
        return _int4(x, self._int4, self._scales_zeros, self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the 4-bit codes, their scales and offsets, and the int8 prefill copy."""
        groups = self.in_features // self.group_size
        return self.out_features * (self.in_features // 2 + 4 * groups) + self.prefill.nbytes


#: A projection weight as the forward uses it: a float ``[out, in]`` tensor, int8 or int4.
_Weight = Tensor | Int8Linear | Int4Linear


def _linear(x: Tensor, w: _Weight) -> Tensor:
    return _float_linear(x, w) if isinstance(w, Tensor) else w(x)


@dataclass(frozen=True, eq=False)
class _FusedLayer:
    """One decoder layer's weights, fused so a step runs fewer, larger ops.

    ``wqkv`` and ``w_gate_up`` are single tensors; the HF modules' own ``weight`` parameters are
    re-pointed at row slices of them (views), so the model keeps working as before and no weight
    is stored twice. With int8 the four projections are :class:`Int8Linear` instead.
    """

    norm1: Tensor
    norm2: Tensor
    eps1: float
    eps2: float
    wqkv: _Weight  # [(H + 2 H_kv) D, D_model]
    wo: _Weight
    w_gate_up: _Weight  # [2 I, D_model]
    w_down: _Weight


def _projections(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """q, k, v, o, gate, up, down of a LlamaDecoderLayer."""
    attn, mlp = layer.self_attn, layer.mlp
    return (
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _fuse(layer: torch.nn.Module) -> _FusedLayer | None:
    """Fuse a LlamaDecoderLayer's projections; ``None`` where the plain modules must be used
    (biases, another activation, an unusual norm)."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = _projections(layer)
    projs = linears[:4]
    released = [mode for lin in linears if (mode := getattr(lin, _RELEASED, None))]
    if released:
        raise EngineError(
            "this model's layer weights were moved into a quantized StepModel"
            f" (quantize={released[0]!r}): load the checkpoint again to build another model from it"
        )
    if any(lin.bias is not None for lin in linears):
        return None
    if getattr(mlp, "act_fn", None) is None or mlp.config.hidden_act != "silu":
        return None
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not all(hasattr(n, "variance_epsilon") for n in norms):
        return None

    def fuse_rows(mods: tuple[torch.nn.Module, ...]) -> Tensor:
        fused = torch.cat([m.weight.detach() for m in mods]).contiguous()
        row = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = fused[row : row + n]  # a view: the HF module still works
            row += n
        return fused

    return _FusedLayer(
        norm1=norms[0].weight,
        norm2=norms[1].weight,
        eps1=float(norms[0].variance_epsilon),
        eps2=float(norms[1].variance_epsilon),
        wqkv=fuse_rows(projs[:3]),
        wo=attn.o_proj.weight,
        w_gate_up=fuse_rows((mlp.gate_proj, mlp.up_proj)),
        w_down=mlp.down_proj.weight,
    )


#: Attribute set on an HF projection whose float weight a quantized StepModel released (the
#: value is the ``quantize`` mode).
_RELEASED = "_voxlane_released"


def _released_forward(module: torch.nn.Module, args: object) -> None:
    raise EngineError(
        "this layer's float weights were released by the engine's quantized StepModel"
        f" (quantize={getattr(module, _RELEASED)!r}): run the model through the engine, or load"
        " it again to run it in float"
    )


def _quantize(
    fused: _FusedLayer,
    layer: torch.nn.Module,
    quantize: Quantize,
    kernel: Int8Kernel | None,
) -> _FusedLayer:
    """``fused`` with int8 or int4 projections; the layer's float projection weights are released.

    The HF modules' weights are views of the fused tensors (or the tensors themselves), so the
    float memory is freed only once every module lets go of them: each is replaced by an empty
    tensor and the module refuses to run (a clear error instead of wrong numbers).
    """
    weights = (fused.wqkv, fused.wo, fused.w_gate_up, fused.w_down)
    # One int4 group size for the whole layer: the scripted step passes a single one.
    inputs = {w.shape[1] for w in weights}  # type: ignore[union-attr]
    group = next((g for g in INT4_GROUP_SIZES if all(k % g == 0 for k in inputs)), None)

    def make(weight: _Weight) -> _Weight:
        assert isinstance(weight, Tensor)
        if quantize == "int4":
            return Int4Linear(weight, group or INT4_GROUP_SIZES[-1])  # no fit: Int4Linear says so
        return Int8Linear(weight, kernel)

    quantized = replace(
        fused,
        wqkv=make(fused.wqkv),
        wo=make(fused.wo),
        w_gate_up=make(fused.w_gate_up),
        w_down=make(fused.w_down),
    )
    for module in _projections(layer):
        w = module.weight
        module.weight.data = torch.empty(0, dtype=w.dtype, device=w.device)
        module.register_forward_pre_hook(_released_forward)
        setattr(module, _RELEASED, quantize)
    return quantized


@dataclass(eq=False)
class KVCache:
    """Keys (post-RoPE) and values of one sequence, addressed by position.

    ``k`` and ``v`` are ``[L, B, H_kv, S, D]``; slots ``0 .. length-1`` are valid.
    Truncating (rollback) is free: only ``length`` changes.

    ``S`` (:attr:`allocated`) may be less than :attr:`capacity` (``limit``): :meth:`reserve`
    then grows the tensors (doubling, up to the limit, copying the valid slots), so a session
    holds memory for the context it uses rather than for the most it may ever use.
    """

    k: Tensor
    v: Tensor
    length: int = 0
    limit: int | None = None  # most slots it may grow to (None: what is allocated)

    @property
    def capacity(self) -> int:
        """Most slots this cache holds, grown or not."""
        return self.allocated if self.limit is None else self.limit

    @property
    def allocated(self) -> int:
        """Slots allocated now."""
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reserve(self, n: int) -> None:
        """Make slots ``0 .. n-1`` writable: grow the tensors if needed (at least doubling,
        capped at :attr:`capacity`). Raises ``ContextOverflowError`` beyond the capacity."""
        if n <= self.allocated:
            return
        if n > self.capacity:
            raise ContextOverflowError(f"{n} slots do not fit a context of {self.capacity}")
        size = min(self.capacity, max(n, 2 * self.allocated))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:3], size, old.shape[4]))
            new[:, :, :, : self.length].copy_(old[:, :, :, : self.length])
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (a cancelled or failed segment)."""
        if not 0 <= length <= self.length:
            raise EngineError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def load(self, k: Tensor, v: Tensor) -> None:
        """Copy a read-only prefix (``[L, B, H_kv, P, D]``) into slots ``0 .. P-1``."""
        n = k.shape[3]
        if n > self.capacity:
            raise ContextOverflowError(
                f"a voice prefix of {n} tokens does not fit a context of {self.capacity}"
            )
        self.length = 0  # nothing to keep when growing
        self.reserve(n)
        self.k[:, :, :, :n].copy_(k)
        self.v[:, :, :, :n].copy_(v)
        self.length = n

    def snapshot(self) -> tuple[Tensor, Tensor]:
        """Compact copies of the valid slots (used to build a voice prefix)."""
        n = self.length
        return self.k[:, :, :, :n].clone(), self.v[:, :, :, :n].clone()


class StepModel:
    """Forward pass of an HF ``LlamaForCausalLM`` on a :class:`KVCache`.

    ``forward`` returns the final-norm hidden states; the caller picks which rows of the LM
    head to multiply them with (:meth:`head_rows` is a view of ``lm_head.weight``, no copy).

    int8 models whose projections use the native kernel (the CPU default) decode through
    :class:`~voxlane.server.engine.native.NativeStep`: the whole step in one C call.
    ``scripted`` (default True): :meth:`decode_batch` runs all layers of fused float, fbgemm
    int8 or int4 models as one TorchScript function (``scripted.py``: same ops, same results,
    one GIL release per step instead of ~500); False keeps the Python path.

    ``quantize="int8"``: the q/k/v, o, gate/up and down projections of every layer become
    :class:`Int8Linear` (``int8_kernel``: None picks fbgemm on CPU, weight-only elsewhere);
    ``quantize="int4"``: :class:`Int4Linear` (4-bit decode, int8 prefill; CPU only).
    Prefill and decode both run them (on CPU int8 is faster than float at every row count
    measured, 1 to 256), and :meth:`head_slice` returns int8 legal-row slices. Embeddings,
    norms and the LM head itself stay float. The model's float projection weights are
    released (the HF modules then refuse to run: use this object, or load the checkpoint
    again), so the layers keep about a quarter of their fp32 bytes resident (int4: 3/8, its
    4-bit decode weights plus the int8 prefill copy).
    """

    def __init__(
        self,
        hf_model: torch.nn.Module,
        *,
        quantize: Quantize = "none",
        int8_kernel: Int8Kernel | None = None,
        scripted: bool = True,
    ) -> None:
        if quantize not in ("none", "int8", "int4"):
            raise EngineError(f"quantize {quantize!r} is not 'none', 'int8' or 'int4'")
        cfg = hf_model.config
        hf_model.requires_grad_(False)  # inference only; lets plain ops mix with cache tensors
        base = hf_model.model
        self.config = cfg
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.head_weight: Tensor = hf_model.lm_head.weight  # [V, D_model]
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.vocab_size = self.head_weight.shape[0]
        self.dtype = self.head_weight.dtype
        self.device = self.head_weight.device
        # Fused weights cut the ops of a decode step by about a third; CPU decode is bound by
        # per-op overhead, not FLOPs, so that is most of the step time.
        fused = [_fuse(layer) for layer in self.layers]
        self._fused: list[_FusedLayer] | None = None if None in fused else fused  # type: ignore[assignment]
        self.quantize: Quantize = quantize
        self._int8_kernel = int8_kernel
        if quantize != "none":
            if self._fused is None:
                raise ModelFormatError(
                    f"quantize={quantize!r} needs Llama layers without projection biases and with"
                    " a SiLU MLP; this model's layers differ: use quantize='none'"
                )
            self._fused = [
                _quantize(f, layer, quantize, int8_kernel)
                for f, layer in zip(self._fused, self.layers, strict=True)
            ]
        self._scripted: tuple[Any, tuple[Any, ...]] | None = self._script(scripted)
        self._native: native.NativeStep | None = None
        lib = native.library() if quantize == "int8" else None
        if lib is not None and native.NativeStep.supports(self) is None:
            self._native = native.NativeStep(lib, self)

    def _script(self, enabled: bool) -> tuple[Any, tuple[Any, ...]] | None:
        """The scripted decode step (``scripted.py``) and its weight arguments, where it applies:
        fused layers with float weights, fbgemm int8 ones (not the weight-only kernel) or int4."""
        if not enabled or self._fused is None:
            return None
        if any(
            isinstance(w, Int8Linear) and w.kernel != "fbgemm"
            for layer in self._fused
            for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
        ):
            return None
        from . import scripted

        fn = scripted.decode_fn()
        if fn is None:
            return None
        floats, packed, rowsums, int4, int4_scales = scripted.layer_args(self._fused)
        first = self._fused[0].wqkv
        reduce_range = isinstance(first, Int8Linear) and first.reduce_range  # one CPU, one answer
        group_size = first.group_size if isinstance(first, Int4Linear) else 0
        args = (
            [f.norm1 for f in self._fused],
            [f.norm2 for f in self._fused],
            [f.eps1 for f in self._fused],
            [f.eps2 for f in self._fused],
            floats,
            packed,
            rowsums,
            int4,
            int4_scales,
            group_size,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            float(self.layers[0].self_attn.scaling),
            reduce_range,
        )
        return fn, args

    # -- cache ---------------------------------------------------------------------------
    def new_cache(self, capacity: int, batch: int = 1, *, allocate: int | None = None) -> KVCache:
        """An empty cache of ``capacity`` slots (not zeroed). ``allocate``: slots to allocate
        now (default all); the cache grows on demand up to ``capacity`` (:meth:`KVCache.reserve`).
        """
        size = capacity if allocate is None else max(1, min(allocate, capacity))
        shape = (self.n_layers, batch, self.n_kv_heads, size, self.head_dim)
        return KVCache(
            k=torch.empty(shape, dtype=self.dtype, device=self.device),
            v=torch.empty(shape, dtype=self.dtype, device=self.device),
            limit=capacity,
        )

    def head_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start..stop-1`` of the LM head: a contiguous view, no copy."""
        return self.head_weight[start:stop]

    def head_slice(self, start: int, stop: int) -> Callable[[Tensor], Tensor]:
        """``hidden [..., D_model] -> logits [..., stop - start]`` over LM head rows
        ``start..stop-1``. Float: a product with :meth:`head_rows` (a view, no copy). int8: an
        :class:`Int8Linear` of those rows, made by this call (build each slice once); the head
        itself stays float (Orpheus ties it to the embeddings), so this adds the slice in int8.
        """
        rows = self.head_rows(start, stop)
        if self.quantize != "none":  # int4 models keep int8 heads (see Int4Linear)
            kernel = self._int8_kernel
            if kernel is None and self._native is None and _fbgemm_available():
                kernel = "fbgemm"  # what the scripted heads run (EngineCore._script_heads)
            return Int8Linear(rows, kernel)
        return functools.partial(_float_linear, w=rows)  # a row alone: as in a batch

    # -- per-layer pieces shared by forward and decode_batch ---------------------------------
    def _qkv(self, i: int, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer ``i``'s RoPE'd queries ``[B, H, T, D]``, keys and values ``[B, Hkv, T, D]``."""
        bsz, t, _ = x.shape
        h, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        fused = self._fused[i] if self._fused is not None else None
        if fused is None:
            attn = self.layers[i].self_attn
            a = self.layers[i].input_layernorm(x)
            q = attn.q_proj(a).view(bsz, t, h, d).transpose(1, 2)
            k = attn.k_proj(a).view(bsz, t, hk, d).transpose(1, 2)
            v = attn.v_proj(a).view(bsz, t, hk, d).transpose(1, 2)
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v
        a = _rms_norm(x, fused.norm1, fused.eps1)
        qkv = _linear(a, fused.wqkv).view(bsz, t, h + 2 * hk, d).transpose(1, 2)
        qk = qkv[:, : h + hk]  # [B, H + Hkv, T, D]: one RoPE for queries and keys
        qk = qk * cos + _rotate_half(qk) * sin
        return qk[:, :h], qk[:, h:], qkv[:, h + hk :]

    def _out_and_mlp(self, i: int, x: Tensor, o: Tensor) -> Tensor:
        """Residual stream after layer ``i``, given its attention output ``o`` ``[B, H, T, D]``."""
        bsz, t, _ = x.shape
        o = o.transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)
        fused = self._fused[i] if self._fused is not None else None
        if fused is None:
            layer = self.layers[i]
            x = x + layer.self_attn.o_proj(o)
            return x + layer.mlp(layer.post_attention_layernorm(x))
        x = x + _linear(o, fused.wo)
        gate, up = _linear(_rms_norm(x, fused.norm2, fused.eps2), fused.w_gate_up).chunk(2, -1)
        return x + _linear(F.silu(gate) * up, fused.w_down)

    # -- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """Run ``tokens`` (``[B, T]``) at positions ``cache.length ..``; append them to the cache.

        Returns the final-norm hidden states ``[B, T, D_model]``.
        """
        t = tokens.shape[1]
        if self._native is not None and t == 1 and tokens.shape[0] == 1 and cache.k.shape[1] == 1:
            # The native step, so that a single-token forward equals a decode_batch row.
            return self.decode_batch([cache], tokens.view(1)).view(1, 1, -1)
        start = cache.length
        end = start + t
        if end > cache.capacity:
            raise ContextOverflowError(
                f"{t} more tokens after {start} do not fit a context of {cache.capacity}"
            )
        cache.reserve(end)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)  # [1, T]
        x = self.embed(tokens)  # [B, T, D_model]
        cos, sin = self.rotary(x, positions)  # [1, T, D] each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, T, D]
        mask = None
        causal = t > 1 and start == 0
        if t > 1 and start > 0:
            # Row i (position start+i) sees slots 0..start+i: SDPA's is_causal would align
            # the diagonal top-left, which is wrong when a cached prefix precedes the chunk.
            rows = torch.arange(start, end, device=self.device).unsqueeze(1)  # [T, 1]
            cols = torch.arange(end, device=self.device).unsqueeze(0)  # [1, S]
            mask = cols <= rows  # [T, S]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, x, cos, sin)
            cache.k[i, :, :, start:end] = k
            cache.v[i, :, :, start:end] = v
            kc, vc = cache.k[i, :, :, :end], cache.v[i, :, :, :end]  # [B, Hkv, S, D]
            if t == 1:  # decode_batch's attention, so a decoded row equals it exactly
                o = _attend(q, kc, vc, layer.self_attn.scaling)
            else:
                o = F.scaled_dot_product_attention(
                    q,
                    kc,
                    vc,
                    attn_mask=mask,
                    is_causal=causal,
                    scale=layer.self_attn.scaling,
                    enable_gqa=True,
                )  # [B, H, T, D]
            x = self._out_and_mlp(i, x, o)
        cache.length = end
        return self.norm(x)

    @torch.inference_mode()
    def decode_batch(self, caches: list[KVCache], tokens: Tensor) -> Tensor:
        """One decode step of ``B`` independent sequences: ``tokens[b]`` (``[B]``) is appended
        to ``caches[b]`` at that cache's own position.

        Embeddings, projections, norms and MLPs run batched (``[B, 1, D]``); attention runs per
        sequence over its own cache (``scripted._attend`` of ``[1, H, 1, D]`` against its valid
        slots: two grouped-query products in float32 on CPU from 128 keys on, SDPA otherwise),
        so caches of different lengths need no padding, masks or copies. Row ``b`` equals
        :meth:`forward` of ``tokens[b]`` alone up to float rounding (single-token forwards run
        the same attention; with fbgemm int8 they are equal bit for bit). Returns
        ``[B, D_model]``.
        """
        bsz = tokens.shape[0]
        if bsz != len(caches):
            raise EngineError(f"{bsz} tokens for {len(caches)} caches")
        starts = [c.length for c in caches]
        for c, s in zip(caches, starts, strict=True):
            if s + 1 > c.capacity:
                raise ContextOverflowError(f"1 more token after {s} does not fit {c.capacity}")
            if c.k.shape[1] != 1:
                raise EngineError("decode_batch needs caches of batch size 1")
        for c, s in zip(caches, starts, strict=True):
            c.reserve(s + 1)
        if self._native is not None:
            hidden = self._native.decode(caches, tokens, starts)
            for cache, s in zip(caches, starts, strict=True):
                cache.length = s + 1
            return hidden
        positions = torch.tensor(starts, device=self.device).unsqueeze(1)  # [B, 1]
        x = self.embed(tokens.view(bsz, 1))  # [B, 1, D_model]
        cos, sin = self.rotary(x, positions)  # [B, 1, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]
        if self._scripted is not None:
            fn, args = self._scripted
            x = fn(x, cos, sin, [c.k for c in caches], [c.v for c in caches], starts, *args)
            for cache, s in zip(caches, starts, strict=True):
                cache.length = s + 1
            return self.norm(x)[:, 0]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, x, cos, sin)  # [B, H, 1, D], [B, Hkv, 1, D] x2
            outs = []
            for b, (cache, s) in enumerate(zip(caches, starts, strict=True)):
                cache.k[i, 0, :, s] = k[b, :, 0]
                cache.v[i, 0, :, s] = v[b, :, 0]
                kc, vc = cache.k[i, :, :, : s + 1], cache.v[i, :, :, : s + 1]  # [1, Hkv, s+1, D]
                outs.append(_attend(q[b : b + 1], kc, vc, layer.self_attn.scaling))  # [1, H, 1, D]
            x = self._out_and_mlp(i, x, torch.cat(outs))
        for cache, s in zip(caches, starts, strict=True):
            cache.length = s + 1
        return self.norm(x)[:, 0]

    # -- eviction ------------------------------------------------------------------------
    @torch.inference_mode()
    def evict(self, cache: KVCache, start: int, stop: int) -> None:
        """Delete slots ``start..stop-1`` and shift the tail left, re-indexing its RoPE.

        A key cached at position ``p`` becomes exactly (up to rounding) the key that a fresh
        prefill would compute at ``p - (stop - start)``. Cost: one copy and one rotation of the
        tail, no model forward.
        """
        n = cache.length
        if not 0 <= start <= stop <= n:
            raise EngineError(f"cannot evict slots {start}..{stop} of a cache of length {n}")
        delta = stop - start
        if delta == 0:
            return
        tail = n - stop
        if tail:
            cos, sin = self._rotation(-delta)  # [D]
            k = cache.k[:, :, :, stop:n]  # [L, B, Hkv, tail, D]
            shifted = k * cos + _rotate_half(k) * sin  # a new tensor: safe to overlap-copy
            cache.k[:, :, :, start : start + tail] = shifted
            cache.v[:, :, :, start : start + tail] = cache.v[:, :, :, stop:n].clone()
        cache.length = n - delta

    def _rotation(self, delta: int) -> tuple[Tensor, Tensor]:
        """cos/sin of a rotation by ``delta`` positions (angles in float64 for accuracy)."""
        inv_freq = self.rotary.inv_freq.to(torch.float64)  # [D/2]
        angles = float(delta) * inv_freq
        angles = torch.cat((angles, angles))  # [D]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)
