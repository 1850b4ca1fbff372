"""The native CPU decode step: ``native.c``, compiled on first use and called through ctypes.

A TorchScript decode step of the small demo model is ~400 short torch calls around its 32
int8 products, and on a CPU the calls cost about as much as the products themselves. The C
step does a whole batched decode step (embedding, every layer, final norm) in one call, and
the legal-row heads in another; ctypes releases the GIL for each, so the event loop and the
codec thread run meanwhile. Its int8 product reads every weight once per four rows (AVX512-VNNI
where the CPU has it, portable C elsewhere). See docs/architecture-engine.md, "Native step".

The library is built with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``)
for this CPU (``-march=native``) and cached under ``~/.cache/voxlane/native`` (or
``$VOXLANE_CACHE_DIR/native``), keyed by the source, the flags, the compiler and the CPU, so
a build is reused until one of them changes. Without a compiler, or if the build fails, the
engine keeps fbgemm and the TorchScript step (logged once). ``VOXLANE_NATIVE=0`` turns the
native code off; ``VOXLANE_NATIVE=generic`` builds the portable kernel even where VNNI exists.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from voxlane.errors import EngineError

if TYPE_CHECKING:
    from .model import Int8Linear, KVCache, StepModel

__all__ = ["NativeStep", "available", "depthwise", "library", "snake"]

log = logging.getLogger("voxlane.engine")

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11")
_FLAGS += ("-fno-math-errno", "-fno-trapping-math")
_ERRORS = {
    1: "out of memory",
    2: "a token id outside the vocabulary",
    3: "a position outside the cache or the RoPE table",
    4: "a shape the native kernels do not take",
}

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


class _Linear(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("rowsum", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps1", ctypes.c_double),
        ("eps2", ctypes.c_double),
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("inter", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("scaling", ctypes.c_double),
        ("norm_eps", ctypes.c_double),
        ("embed", ctypes.c_void_p),
        ("norm", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("rope_len", ctypes.c_int64),
        ("layers", ctypes.POINTER(_Layer)),
    ]


def _mode() -> str:
    """``VOXLANE_NATIVE``: ``"0"``/``"off"`` disables, ``"generic"`` forces the portable kernel."""
    return os.environ.get("VOXLANE_NATIVE", "1").strip().lower()


def _cache_dir() -> Path:
    root = os.environ.get("VOXLANE_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "voxlane"
    return base / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _build(generic: bool) -> Path:
    """Compile ``native.c`` into the cache (once per source, flags, compiler and CPU). A
    compiler that refuses ``-march=native`` (some targets' clang) gets a build without it."""
    cc = _compiler()
    if cc is None:
        raise EngineError("no C compiler (set CC, or install cc, gcc or clang)")
    flags = [*_FLAGS, "-DVX_GENERIC"] if generic else list(_FLAGS)
    try:
        return _build_with(cc, flags)
    except EngineError as first:
        portable = [f for f in flags if not f.startswith("-march=")]
        if portable == flags:
            raise
        log.info("building %s without -march=native: %s", _SOURCE.name, first)
        return _build_with(cc, portable)


def _build_with(cc: str, flags: list[str]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(flags).encode(), version.stdout.encode()):
        key.update(part)
    key.update(_cpu_id().encode())
    target = _cache_dir() / f"voxlane-native-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: another process may be building the same file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, str(_SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise EngineError(f"{cc} failed to build {_SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.vx_has_vnni.restype = ctypes.c_int
    lib.vx_has_vnni.argtypes = []
    lib.vx_linear_forward.restype = ctypes.c_int
    lib.vx_linear_forward.argtypes = [ctypes.POINTER(_Linear), ptr, ptr, i64]
    lib.vx_decode.restype = ctypes.c_int
    lib.vx_decode.argtypes = [ctypes.POINTER(_Model), i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.vx_heads.restype = ctypes.c_int
    lib.vx_heads.argtypes = [ctypes.POINTER(_Linear), i64, i64, ptr, ptr, ptr, ptr, i64, ptr, i64]
    lib.vx_snake.restype = ctypes.c_int
    lib.vx_snake.argtypes = [ptr, ptr, i64, i64, ptr, ptr]
    lib.vx_depthwise.restype = ctypes.c_int
    lib.vx_depthwise.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr]
    return lib


def library() -> ctypes.CDLL | None:
    """The native library for this process (built or taken from the cache on first use), or
    None where it is turned off (``VOXLANE_NATIVE=0``) or cannot be built (logged once)."""
    mode = _mode()
    if mode in ("0", "off", "false", "no"):
        return None
    with _lock:
        if mode not in _loaded:
            try:
                _loaded[mode] = _bind(ctypes.CDLL(str(_build(generic=mode == "generic"))))
            except (EngineError, OSError) as exc:
                log.warning(
                    "native decode step unavailable (%s); using fbgemm and TorchScript", exc
                )
                _loaded[mode] = None
        return _loaded[mode]


def available() -> bool:
    """True if the native library is built (or can be) on this machine."""
    return library() is not None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise EngineError(f"native {what} failed: {_ERRORS.get(rc, f'error {rc}')}")


def fits(shape: tuple[int, ...] | torch.Size) -> bool:
    """True if the native int8 kernel takes a weight of ``shape`` ``[N, K]`` (both multiples
    of 16)."""
    return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0


def pack(q: Tensor) -> Tensor:
    """int8 ``[N, K]`` -> the kernels' layout ``[N/16, K/4, 16, 4]`` (16 rows by 4 inputs)."""
    n, k = q.shape
    if not fits(q.shape):
        raise EngineError(f"the native int8 kernel needs N and K multiples of 16, got {n}x{k}")
    return q.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def linear_struct(packed: Tensor, scale: Tensor, rowsum: Tensor) -> _Linear:
    """The C description of one int8 map of :func:`pack`-ed weights (the tensors must outlive
    it)."""
    blocks, k4 = packed.shape[:2]
    return _Linear(packed.data_ptr(), scale.data_ptr(), rowsum.data_ptr(), blocks * 16, k4 * 4)


def linear(lib: ctypes.CDLL, desc: _Linear, x: Tensor) -> Tensor:
    """``x [..., K] -> [..., N]`` through the native int8 product (float32 out, CPU)."""
    rows = x.reshape(-1, desc.k).float().contiguous()
    out = torch.empty(rows.shape[0], desc.n)
    if rows.shape[0]:
        rc = lib.vx_linear_forward(ctypes.byref(desc), rows.data_ptr(), out.data_ptr(), len(rows))
        _check(rc, "int8 product")
    return out.view(*x.shape[:-1], desc.n)


def _check_rows(x: Tensor, channels: int) -> None:
    # The C code trusts these: a wrong shape would read past the end of a buffer.
    if x.dim() != 2 or x.shape[1] != channels or x.dtype != torch.float32:
        raise EngineError(f"expected float32 rows [T, {channels}], got {x.dtype} {tuple(x.shape)}")
    if not x.is_contiguous():
        raise EngineError("expected contiguous rows")


def snake(lib: ctypes.CDLL, x: Tensor, alpha: Tensor, inv_alpha: Tensor) -> Tensor:
    """SNAC's Snake on rows ``x`` ``[T, C]`` (float32, contiguous; ``C % 16 == 0``):
    ``x + inv_alpha * sin(alpha * x)^2`` in one pass (``alpha``/``inv_alpha`` ``[C]``)."""
    _check_rows(x, alpha.shape[0])
    y = torch.empty_like(x)
    rc = lib.vx_snake(
        x.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], alpha.data_ptr(), inv_alpha.data_ptr()
    )
    _check(rc, "snake")
    return y


def depthwise(
    lib: ctypes.CDLL, x: Tensor, taps: Tensor, bias: Tensor | None, dilation: int
) -> Tensor:
    """A depthwise dilated convolution over rows ``x`` ``[T, C]`` (float32, contiguous;
    ``C % 16 == 0``) without padding: ``taps`` ``[k, C]``; ``[T - (k - 1) dilation, C]`` out."""
    k, c = taps.shape
    _check_rows(x, c)
    out = torch.empty(max(0, x.shape[0] - (k - 1) * dilation), c)
    if out.shape[0]:
        rc = lib.vx_depthwise(
            x.data_ptr(),
            x.shape[0],
            c,
            taps.data_ptr(),
            None if bias is None else bias.data_ptr(),
            k,
            dilation,
            out.data_ptr(),
        )
        _check(rc, "depthwise convolution")
    return out


def _ptrs(values: list[int]) -> Any:
    return (ctypes.c_void_p * len(values))(*values)


def _int64s(values: list[int]) -> Any:
    return (ctypes.c_int64 * len(values))(*values)


class NativeStep:
    """:meth:`StepModel.decode_batch` and the engine's legal-row heads as native calls.

    Built by :meth:`StepModel` for fused float32 CPU models whose projections are native
    :class:`Int8Linear` maps; :meth:`supports` says whether a model qualifies. Holds
    references to every tensor the C structures point into.
    """

    def __init__(self, lib: ctypes.CDLL, model: StepModel) -> None:
        fused = model._fused
        assert fused is not None
        self.lib = lib
        cfg = model.config
        self._keep: list[Tensor] = []
        self._keep_heads: list[Int8Linear] = []  # the head maps heads_struct describes

        def lin(w: Int8Linear) -> _Linear:
            return w.native_struct()

        def f32(t: Tensor) -> Tensor:
            t = t.detach().float().contiguous()
            self._keep.append(t)
            return t

        layers = (_Layer * len(fused))()
        for i, f in enumerate(fused):
            layers[i] = _Layer(
                f32(f.norm1).data_ptr(),
                f32(f.norm2).data_ptr(),
                f.eps1,
                f.eps2,
                lin(f.wqkv),  # type: ignore[arg-type]
                lin(f.wo),  # type: ignore[arg-type]
                lin(f.w_gate_up),  # type: ignore[arg-type]
                lin(f.w_down),  # type: ignore[arg-type]
            )
        self._layers = layers
        self._weights = [(f.wqkv, f.wo, f.w_gate_up, f.w_down) for f in fused]  # keep alive
        self._rotary = model.rotary
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        embed = model.embed.weight.detach()
        self.model = _Model(
            n_layers=len(fused),
            dim=cfg.hidden_size,
            n_heads=model.n_heads,
            n_kv_heads=model.n_kv_heads,
            head_dim=model.head_dim,
            inter=fused[0].w_down.in_features,  # type: ignore[union-attr]
            vocab=embed.shape[0],
            scaling=float(model.layers[0].self_attn.scaling),
            norm_eps=float(model.norm.variance_epsilon),
            embed=embed.data_ptr(),
            norm=f32(model.norm.weight).data_ptr(),
            cos=None,
            sin=None,
            rope_len=0,
            layers=layers,
        )
        self._embed = embed
        self.dim = cfg.hidden_size
        self._rope(1024)

    @staticmethod
    def supports(model: StepModel) -> str | None:
        """None if ``model`` can run natively, else why not."""
        from .model import Int8Linear

        if model._fused is None:
            return "unfused layers"
        if model.device.type != "cpu" or model.dtype != torch.float32:
            return f"{model.dtype} weights on {model.device} (needs float32 on CPU)"
        weights = [w for f in model._fused for w in (f.wqkv, f.wo, f.w_gate_up, f.w_down)]
        if not all(isinstance(w, Int8Linear) and w.kernel == "native" for w in weights):
            return "projections that are not native int8"
        if model.head_dim % 16 or model.config.hidden_size % 16 or model.head_dim % 2:
            return "a hidden size or head size that is not a multiple of 16"
        if model.n_heads % model.n_kv_heads or model.n_heads // model.n_kv_heads > 64:
            return "query heads not a multiple of KV heads, or more than 64 per KV head"
        if not model.embed.weight.is_contiguous():
            return "a non-contiguous embedding table"
        if model._fused[0].w_down.in_features % 16:  # type: ignore[union-attr]
            return "an MLP width that is not a multiple of 16"
        return None

    def _rope(self, needed: int) -> None:
        """Grow the cos/sin tables (HF's rotary module, so the same values) to ``needed`` rows."""
        if needed <= self.model.rope_len:
            return
        size = max(needed, 2 * self.model.rope_len)
        positions = torch.arange(size).unsqueeze(0)
        probe = torch.zeros(1, 1, self.dim)
        cos, sin = self._rotary(probe, positions)  # [1, size, head_dim]
        self._cos = cos[0].float().contiguous()
        self._sin = sin[0].float().contiguous()
        self.model.cos = self._cos.data_ptr()
        self.model.sin = self._sin.data_ptr()
        self.model.rope_len = size

    @torch.inference_mode()
    def decode(self, caches: list[KVCache], tokens: Tensor, starts: list[int]) -> Tensor:
        """Append ``tokens[b]`` at ``starts[b]`` of ``caches[b]`` (slots reserved, lengths not
        moved); returns the final-norm hidden states ``[B, D]``."""
        bsz = len(caches)
        for c in caches:
            if not (c.k.is_contiguous() and c.v.is_contiguous() and c.k.dtype == torch.float32):
                raise EngineError("the native step needs contiguous float32 caches")
        self._rope(max(starts) + 1)
        toks = tokens.to(torch.int64).contiguous()
        hidden = torch.empty(bsz, self.dim)
        rc = self.lib.vx_decode(
            ctypes.byref(self.model),
            bsz,
            toks.data_ptr(),
            _int64s(starts),
            _ptrs([c.k.data_ptr() for c in caches]),
            _ptrs([c.v.data_ptr() for c in caches]),
            _int64s([c.allocated for c in caches]),
            hidden.data_ptr(),
        )
        _check(rc, "decode step")
        return hidden

    def heads_struct(self, rows: list[Int8Linear]) -> Any:
        """The C array of the legal-row heads (native :class:`Int8Linear` maps, one per frame
        position) for :meth:`heads`."""
        descs = (_Linear * len(rows))(*[r.native_struct() for r in rows])
        self._keep_heads = rows  # the structures point into their tensors
        return descs

    def heads(
        self,
        descs: Any,
        hidden: list[Tensor],
        positions: list[int],
        with_eos: list[bool],
        eos_row: Tensor,
    ) -> list[Tensor]:
        """Legal-row logits of each hidden state ``[D]`` at its frame position, with the EOS
        logit appended where ``with_eos`` (``EngineCore._heads``); rows at the same position
        share one product."""
        bsz = len(hidden)
        n = descs[0].n
        rows = [
            h if h.is_contiguous() and h.dtype == torch.float32 else h.float().contiguous()
            for h in hidden
        ]
        if any(h.numel() != self.dim for h in rows):
            raise EngineError(f"hidden states must have {self.dim} values each")
        out = torch.empty(bsz, n + 1)
        rc = self.lib.vx_heads(
            descs,
            len(descs),
            bsz,
            _ptrs([h.data_ptr() for h in rows]),
            _int64s(positions),
            (ctypes.c_uint8 * bsz)(*with_eos),
            eos_row.data_ptr(),
            self.dim,
            out.data_ptr(),
            n + 1,
        )
        _check(rc, "heads")
        return [out[b] if with_eos[b] else out[b, :n] for b in range(bsz)]
