"""Exact streaming SNAC decoding, batched across streams.

:class:`~voxlane.server.codec.StreamingDecoder` decodes overlapping windows of frames: every call
decodes its context frames again (2 on each side by default, 1.5x the frames it emits) and its
seams are close to, not equal to, a full decode. This module decodes each stream *incrementally,
layer by layer*: every convolution keeps the last inputs its kernel still needs, every
transposed convolution its last input row, every residual unit the skip samples its branch has
not caught up with. A push of new frames runs each layer on exactly the new samples it can
finish, so

- nothing is decoded twice (the cost per frame is that of a full decode),
- the output equals a full decode of all frames to float rounding (no seams at all), and
- the output lags the input by the decoder's right receptive field (:attr:`SnacProgram.delay`,
  4,757 samples = 2.3 frames for SNAC 24 kHz): first audio after 3 frames, like the default
  window setting, and samples become final one layer-delay after their frames arrive.

Every activation is time-major (``[time, channels]``). That makes the 1x1 convolutions and the
transposed convolutions plain GEMMs over rows, lets the depthwise convolutions run on oneDNN's
channels-last path without a copy, and makes batching across streams *ragged*: the rows of all
streams that have new input are concatenated (no padding), each layer runs once over all of
them, and each stream takes back its own rows (a convolution's outputs that straddle two
streams are computed and dropped: kernel-span rows per stream). :meth:`SnacProgram.run` takes
any number of streams at once; :class:`ExactStreamingDecoder` is the one-stream form with the
``push``/``flush`` interface of the window decoder.

``precision="bfloat16"`` runs only the GEMMs (the 1x1 convolutions and the upsamplers, about
half of the work) in bfloat16 and everything else in float32: 1.3-1.6x faster on a CPU with
AMX (see :func:`bf16_supported`), for about 40 dB SNR against the float32 decode instead of
float rounding.

Synchronous model work: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxlane.errors import ModelFormatError, OutOfRangeError
from voxlane.server.engine import native
from voxlane.server.orpheus import FRAME_SIZE, SAMPLE_RATE, SAMPLES_PER_FRAME, Frame, validate_frame

__all__ = [
    "DecodeBatcher",
    "ExactStreamingDecoder",
    "Precision",
    "SnacProgram",
    "SnacStream",
    "bf16_supported",
    "check_run",
]

_FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE

#: Number format of :class:`SnacProgram`'s GEMMs (activations are float32 either way).
Precision = Literal["float32", "bfloat16"]
_GEMM_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` has bfloat16 matrix hardware, so ``precision="bfloat16"`` pays.

    CPU: AMX-BF16 (x86), as ``torch.cpu.get_capabilities()`` reports it; False when this
    torch cannot tell. AVX512-BF16 alone does not count: with oneDNN limited to it (same CPU,
    ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) the program ran 0.8-0.9x as fast as in float32.
    ARM's BF16 extension is not measured and not counted. CUDA:
    ``torch.cuda.is_bf16_supported()``. Other devices: False.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # public since torch 2.9
    return capabilities is not None and bool(capabilities().get("amx_bf16", False))


@dataclass(eq=False)
class SnacStream:
    """The decoding state of one utterance: each layer's pending rows, and counters.

    Made by :meth:`SnacProgram.new_stream`; pass it to :meth:`SnacProgram.run`. After a run
    with ``final=True`` it is finished (a new utterance needs a new stream).
    """

    slots: list[Any]
    frames_in: int = 0
    samples_out: int = 0
    finished: bool = False
    #: Seed of SNAC's noise for this utterance (None: a random one, drawn at its first use).
    noise_seed: int | None = None
    noise: dict[int, np.random.Generator] = field(default_factory=dict)  # per noise block


@dataclass
class _Batch:
    """Per-run context: which streams take part and whether each one ends now."""

    states: list[SnacStream]
    finals: list[bool]
    noise: bool


class _Op:
    """A layer of the program. ``run`` maps each stream's new rows to its finished rows."""

    #: Output rows lag input rows by this many (in this layer's output rate).
    delay: int = 0
    slot: int = -1

    def run(self, xs: list[Tensor], batch: _Batch) -> list[Tensor]:
        raise NotImplementedError

    def init_state(self) -> Any:
        return None


def _native_lib() -> Any:
    """voxlane's native kernels (``engine/native.c``: Snake and depthwise convolutions in one
    pass each) where they build, else None (torch ops)."""
    return native.library()


def _pack(xs: list[Tensor]) -> Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def _split(y: Tensor, sizes: list[int]) -> list[Tensor]:
    return list(y.split(sizes)) if len(sizes) > 1 else [y]


class _Pointwise(_Op):
    """Any op with no context in time: all streams' rows in one call."""

    def run(self, xs: list[Tensor], batch: _Batch) -> list[Tensor]:
        sizes = [x.shape[0] for x in xs]
        if sum(sizes) == 0:
            return xs
        return _split(self.apply(_pack(xs), batch), sizes)

    def apply(self, x: Tensor, batch: _Batch) -> Tensor:
        raise NotImplementedError


class _Snake(_Pointwise):
    """``x + sin(alpha x)^2 / alpha`` in three passes over memory instead of six."""

    def __init__(self, module: torch.nn.Module) -> None:
        alpha = module.alpha.detach().reshape(-1)
        self.alpha = alpha.contiguous()
        self.inv_alpha = (alpha + 1e-9).reciprocal().contiguous()  # as SNAC computes it
        self.native = _native_lib() if alpha.shape[0] % 16 == 0 else None

    def apply(self, x: Tensor, batch: _Batch) -> Tensor:
        if self.native is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            return native.snake(self.native, x.contiguous(), self.alpha, self.inv_alpha)
        y = torch.mul(x, self.alpha)
        y.sin_()
        y.mul_(y)
        return torch.addcmul(x, y, self.inv_alpha, out=y)


def _gemm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight (+ bias)`` in ``x``'s dtype, the product computed in ``weight``'s dtype.

    ``bias`` has ``x``'s dtype. With a narrower weight (bfloat16) ``x`` is cast for the GEMM
    and the product comes back widened, in the same pass as the bias when there is one."""
    if weight.dtype == x.dtype:
        return _mm_rows(x, weight, bias)
    y = torch.mm(x.to(weight.dtype), weight)
    return y.to(x.dtype) if bias is None else torch.add(bias, y)  # promotes to bias's dtype


#: Most rows of one float32 product with a large weight (see :func:`_mm_rows`).
_BLOCK_ROWS = 128
_LARGE_WEIGHT = 1 << 22


def _mm_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight (+ bias)`` in float32 whose every row is the same however many rows the
    call has, so a stream's samples do not depend on how its frames were split into runs or
    on the rows batched with it (seeded audio reproduces bit for bit).

    MKL's sgemm rounds differently for a single row (a matrix-vector path) and, for SNAC
    24 kHz's first upsampler (1024 x 8192), from about 192 rows on (measured, one thread);
    other sizes from 2 to 16,384 rows agree bit for bit. So a single row is computed as two
    (a zero row added) and a large weight sees at most 128 rows per call: at most 32 frames
    decoded at once, which the server's runs (8 frames at most) never exceed."""
    n = x.shape[0]
    if n == 1:
        return _mm_rows(torch.cat((x, x.new_zeros(1, x.shape[1]))), weight, bias)[:1]
    if n > _BLOCK_ROWS and weight.numel() >= _LARGE_WEIGHT:
        return torch.cat([_mm_rows(b, weight, bias) for b in x.split(_BLOCK_ROWS)])
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


def _gemm_weight(w: Tensor, gemm_dtype: torch.dtype | None) -> Tensor:
    return (w if gemm_dtype is None else w.to(gemm_dtype)).contiguous()


class _Linear(_Pointwise):
    """A 1x1 convolution: one GEMM over the rows (in ``gemm_dtype`` if given)."""

    def __init__(self, conv: torch.nn.Conv1d, gemm_dtype: torch.dtype | None = None) -> None:
        self.weight_t = _gemm_weight(conv.weight.detach()[:, :, 0].t(), gemm_dtype)  # [C_in, C_out]
        self.bias = None if conv.bias is None else conv.bias.detach().contiguous()

    def apply(self, x: Tensor, batch: _Batch) -> Tensor:
        return _gemm(x, self.weight_t, self.bias)


class _Tanh(_Pointwise):
    def apply(self, x: Tensor, batch: _Batch) -> Tensor:
        return torch.tanh(x)


class _Noise(_Pointwise):
    """SNAC's NoiseBlock (``x + randn[t] * W x``); the identity while the codec's noise is off.

    Each stream draws its own ``randn[t]`` from a generator of its own per noise block, seeded
    by ``(stream.noise_seed, index)`` and advanced row by row in time order: a stream's noise
    does not depend on how its frames were split into runs nor on the streams batched with
    it, so a seeded utterance decodes to the same samples every time. (numpy's
    ``standard_normal`` gives the same values drawn in one call or in pieces; torch's CPU
    ``randn`` does not.)
    """

    def __init__(
        self, module: torch.nn.Module, gemm_dtype: torch.dtype | None = None, index: int = 0
    ) -> None:
        self.linear = _Linear(module.linear, gemm_dtype)
        self.index = index

    def run(self, xs: list[Tensor], batch: _Batch) -> list[Tensor]:
        sizes = [x.shape[0] for x in xs]
        if not batch.noise or sum(sizes) == 0:
            return xs
        rows = np.concatenate(
            [self._rows(state, n) for state, n in zip(batch.states, sizes, strict=True)]
        )
        x = _pack(xs)
        noise = torch.from_numpy(rows).to(device=x.device, dtype=x.dtype).unsqueeze(1)
        return _split(torch.addcmul(x, noise, self.linear.apply(x, batch)), sizes)

    def _rows(self, state: SnacStream, n: int) -> np.ndarray:
        rng = state.noise.get(self.index)
        if rng is None:
            if state.noise_seed is None:
                state.noise_seed = secrets.randbits(63)
            rng = state.noise[self.index] = np.random.default_rng([state.noise_seed, self.index])
        return rng.standard_normal(n, dtype=np.float32)


def _as_nchw(x: Tensor) -> Tensor:
    """``[T, C]`` rows as a ``[1, C, 1, T]`` channels-last image (a view, no copy).

    The strides are spelled out: ``x.t().unsqueeze(0).unsqueeze(2)`` has the same layout but
    ambiguous strides on its size-1 dimensions, and oneDNN then copies the input to another
    layout first (10x slower for SNAC's depthwise convolutions)."""
    t, c = x.shape
    return x.as_strided((1, c, 1, t), (t * c, 1, t * c, c))


class _Conv(_Op):
    """A stride-1 convolution with symmetric zero padding, any kernel, dilation and groups.

    State per stream: the input rows not yet consumed (starting with the left zero padding).
    Output row ``t`` needs input rows ``t - pad .. t + pad``; it is computed once they are all
    there. The final run appends the right zero padding.
    """

    def __init__(self, conv: torch.nn.Conv1d) -> None:
        (k,), (d,), (s,) = conv.kernel_size, conv.dilation, conv.stride
        span = d * (k - 1)
        pad = conv.padding[0] if isinstance(conv.padding, tuple) else None
        if s != 1 or pad is None or 2 * pad != span or conv.padding_mode != "zeros":
            raise ModelFormatError(f"streaming SNAC needs stride-1 'same' convolutions, got {conv}")
        self.span = span
        self.pad = pad
        self.delay = pad
        self.dilation = d
        self.groups = conv.groups
        self.in_channels = conv.in_channels
        self.weight = conv.weight.detach().unsqueeze(2).contiguous()  # [C_out, C_in/g, 1, k]
        self.bias = None if conv.bias is None else conv.bias.detach().contiguous()
        # Depthwise (SNAC's residual units): the native kernel, taps as [k, C].
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.native = _native_lib() if depthwise and conv.in_channels % 16 == 0 else None
        self.taps = self.weight[:, 0, 0].t().contiguous() if self.native is not None else None

    def init_state(self) -> Any:
        return torch.zeros((self.pad, self.in_channels), dtype=self.weight.dtype)

    def run(self, xs: list[Tensor], batch: _Batch) -> list[Tensor]:
        windows: list[Tensor] = []
        outs: list[int] = []
        for i, (x, state) in enumerate(zip(xs, batch.states, strict=True)):
            parts = [state.slots[self.slot], x]
            if batch.finals[i]:
                parts.append(x.new_zeros((self.pad, x.shape[1])))
            window = torch.cat(parts) if parts[0].shape[0] else _pack(parts[1:])
            n_out = max(0, window.shape[0] - self.span)
            windows.append(window)
            outs.append(n_out)
            # Keep the rows the next outputs still need (a copy: the window is freed).
            state.slots[self.slot] = window[n_out:].clone() if not batch.finals[i] else None
        empty = xs[0].new_zeros((0, self.weight.shape[0]))
        live = [w for w, n in zip(windows, outs, strict=True) if n > 0]
        if not live:
            return [empty for _ in xs]
        packed = _pack(live)
        if self.native is not None and packed.dtype == torch.float32:
            y = native.depthwise(
                self.native, packed.contiguous(), self.taps, self.bias, self.dilation
            )
        else:
            y = F.conv2d(
                _as_nchw(packed),
                self.weight,
                self.bias,
                dilation=(1, self.dilation),
                groups=self.groups,
            )[0, :, 0].t()  # [T - span, C_out]
        result: list[Tensor] = []
        offset = 0
        for w, n in zip(windows, outs, strict=True):
            if n == 0:
                result.append(empty)
                continue
            result.append(y[offset : offset + n])
            offset += w.shape[0]  # rows straddling two windows are skipped
        return result


class _ConvTranspose(_Op):
    """SNAC's upsampler (``kernel = 2 stride``): one GEMM, then an overlap-add of two halves.

    Output block ``i`` (``stride`` rows) is the first half of input row ``i``'s products plus
    the second half of row ``i - 1``'s, so the state is the last input row. The transposed
    convolution's ``padding`` crops its first ``padding`` output rows; the final run adds one
    zero input row to finish the last rows. The GEMM runs in ``gemm_dtype`` if given.
    """

    def __init__(
        self, conv: torch.nn.ConvTranspose1d, gemm_dtype: torch.dtype | None = None
    ) -> None:
        (k,), (s,), (p,), (op,) = (
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.output_padding,
        )
        if k != 2 * s or conv.groups != 1 or conv.dilation != (1,) or p > s:
            raise ModelFormatError(f"streaming SNAC needs kernel = 2 x stride upsamplers: {conv}")
        if (s - 2 * p + op) != 0:
            raise ModelFormatError(f"upsampler {conv} does not map n rows to exactly n x stride")
        self.stride = s
        self.crop = p
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        w = conv.weight.detach()  # [C_in, C_out, k]
        w = w.permute(0, 2, 1).reshape(self.in_channels, k * self.out_channels)
        self.weight = _gemm_weight(w, gemm_dtype)
        self.bias = None if conv.bias is None else conv.bias.detach().contiguous()

    def init_state(self) -> Any:
        # (last input row, output rows still to crop at the start)
        return torch.zeros((1, self.in_channels)), self.crop

    def run(self, xs: list[Tensor], batch: _Batch) -> list[Tensor]:
        s, c_out = self.stride, self.out_channels
        windows: list[Tensor] = []
        for i, (x, state) in enumerate(zip(xs, batch.states, strict=True)):
            prev, _ = state.slots[self.slot]
            parts = [prev, x]
            if batch.finals[i]:
                parts.append(x.new_zeros((1, x.shape[1])))
            windows.append(torch.cat(parts))
        z = _gemm(_pack(windows), self.weight).view(-1, 2, s, c_out)
        result: list[Tensor] = []
        offset = 0
        for i, (w, state) in enumerate(zip(windows, batch.states, strict=True)):
            rows = w.shape[0]
            zi = z[offset : offset + rows]
            offset += rows
            block = (zi[1:, 0] + zi[:-1, 1]).reshape(-1, c_out)  # [(rows - 1) * s, C_out]
            if self.bias is not None:
                block += self.bias
            _, crop = state.slots[self.slot]
            if batch.finals[i]:
                # The zero row finishes the last real rows; only `crop` more rows exist.
                block = block[: block.shape[0] - s + self.crop]
            drop = min(crop, block.shape[0])
            result.append(block[drop:])
            state.slots[self.slot] = None if batch.finals[i] else (w[-1:].clone(), crop - drop)
        return result


class _Residual(_Op):
    """SNAC's ResidualUnit: ``x + block(x)``, the skip rows held until the block catches up."""

    def __init__(self, ops: list[_Op], channels: int) -> None:
        self.ops = ops
        self.channels = channels
        self.delay = sum(op.delay for op in ops)

    def init_state(self) -> Any:
        return torch.zeros((0, self.channels))

    def run(self, xs: list[Tensor], batch: _Batch) -> list[Tensor]:
        ys = xs
        for op in self.ops:
            ys = op.run(ys, batch)
        out: list[Tensor] = []
        for i, (x, y, state) in enumerate(zip(xs, ys, batch.states, strict=True)):
            held = state.slots[self.slot]
            skip = torch.cat((held, x)) if held.shape[0] else x
            n = y.shape[0]
            out.append(skip[:n] + y)
            state.slots[self.slot] = None if batch.finals[i] else skip[n:].clone()
        return out


def _snac_classes() -> dict[str, type]:
    from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit, Snake1d

    return {
        "DecoderBlock": DecoderBlock,
        "NoiseBlock": NoiseBlock,
        "ResidualUnit": ResidualUnit,
        "Snake1d": Snake1d,
    }


class SnacProgram:
    """SNAC's decoder (codes to PCM) as a chain of streaming layers.

    Built once per :class:`~voxlane.server.codec.SnacCodec` (``SnacProgram(codec)``); it holds
    views of the codec's weights (plus the three codebooks projected to latent space, 38 MB for
    SNAC 24 kHz) and no per-stream state. Raises :class:`~voxlane.errors.ModelFormatError` for
    a decoder with layers it cannot stream (SNAC's local attention, used by the 32/44 kHz
    models but not by the 24 kHz one).

    ``precision`` is the number format of the GEMMs: the 1x1 convolutions (also inside the
    noise blocks) and the upsamplers. ``"float32"`` (default): the output equals a full decode
    to float rounding (~120 dB SNR). ``"bfloat16"``: those GEMMs use bfloat16 copies of their
    weights (made here) and their inputs cast to bfloat16, and return float32; the Snake
    activations, depthwise convolutions, residual sums, codebook tables and stream states stay
    float32 (:attr:`dtype`). That costs accuracy — about 40 dB SNR against the float32 decode
    on random codes: close, no longer exact — and pays only with bfloat16 matrix hardware
    (:func:`bf16_supported`): CPUs with AMX (1.3-1.6x less CPU per audio second, one core) or
    GPUs. Without it bfloat16 GEMMs can be slower than float32 (0.8-0.9x measured with
    AVX512-BF16 alone).

    Batch invariance: in float32 a stream's samples do not depend on how its frames were split
    into runs nor on the streams batched with it (bit for bit with one torch thread, the
    codec's default: single-row products and the first upsampler's large ones are kept on
    the row counts MKL rounds alike, see :func:`_mm_rows`). SNAC's noise is drawn per stream
    from its ``noise_seed`` (:meth:`new_stream`), so that holds with noise on too. In
    bfloat16 on AMX they do, slightly: oneDNN's AMX GEMMs round a few outputs one bfloat16
    step differently depending on the rows in the call, and later layers carry that on
    (measured ~45 dB SNR between batched and separate runs: the size of the bfloat16 error
    itself). With oneDNN kept off AMX (AVX512-BF16 kernels) bfloat16 is bit-exact here too.

    Raises :class:`~voxlane.errors.OutOfRangeError` for another ``precision``.
    """

    def __init__(self, codec: Any, *, precision: Precision = "float32") -> None:
        if not isinstance(precision, str) or precision not in _GEMM_DTYPES:
            raise OutOfRangeError(
                f"precision must be one of {', '.join(map(repr, _GEMM_DTYPES))}, got {precision!r}"
            )
        self.precision: Precision = precision
        self._gemm_dtype = _GEMM_DTYPES[precision]
        self.codec = codec
        model = codec.model
        quantizers = list(model.quantizer.quantizers)
        self.strides = [int(q.stride) for q in quantizers]
        if self.strides != [4, 2, 1]:
            raise ModelFormatError(f"SNAC with vq strides {self.strides}, Orpheus needs [4, 2, 1]")
        with torch.inference_mode(False), torch.no_grad():
            # Each codebook entry through its output projection, once: a code is then a row
            # (float32 in either precision: built once, then only looked up).
            self.tables = [
                _Linear(q.out_proj).apply(q.codebook.weight.detach(), None)  # type: ignore[arg-type]
                for q in quantizers
            ]
        self.dtype = self.tables[0].dtype
        self.device = self.tables[0].device
        self._slots = 0
        self._noise_blocks = 0
        self.ops = self._compile(list(model.decoder.model))
        #: Output samples by which the finished audio lags the frames pushed (right context).
        self.delay = self._delay(self.ops)

    # -- building -------------------------------------------------------------------------
    def _slot(self, op: _Op) -> _Op:
        op.slot = self._slots
        self._slots += 1
        return op

    def _compile(self, modules: list[torch.nn.Module]) -> list[_Op]:
        classes = _snac_classes()
        ops: list[_Op] = []
        for m in modules:
            if isinstance(m, classes["DecoderBlock"]):
                ops.extend(self._compile(list(m.block)))
            elif isinstance(m, classes["ResidualUnit"]):
                inner = self._compile(list(m.block))
                ops.append(self._slot(_Residual(inner, m.block[0].alpha.shape[1])))
            elif isinstance(m, classes["Snake1d"]):
                ops.append(_Snake(m))
            elif isinstance(m, classes["NoiseBlock"]):
                self._noise_blocks += 1
                ops.append(_Noise(m, self._gemm_dtype, index=self._noise_blocks))
            elif isinstance(m, torch.nn.ConvTranspose1d):
                ops.append(self._slot(_ConvTranspose(m, self._gemm_dtype)))
            elif isinstance(m, torch.nn.Conv1d):
                if m.kernel_size == (1,) and m.stride == (1,) and m.groups == 1:
                    ops.append(_Linear(m, self._gemm_dtype))
                else:
                    ops.append(self._slot(_Conv(m)))
            elif isinstance(m, torch.nn.Tanh):
                ops.append(_Tanh())
            else:
                raise ModelFormatError(
                    f"SNAC decoder layer {type(m).__name__} cannot be decoded incrementally "
                    "(use the window StreamingDecoder for this model)"
                )
        return ops

    def _delay(self, ops: list[_Op]) -> int:
        """How many output samples the finished audio lags the input (right context)."""
        total, scale = 0, 1  # walk backwards: a lag before an upsampler counts stride times
        for op in reversed(ops):
            if isinstance(op, _ConvTranspose):
                total += scale * op.crop  # its first `crop` output rows are cut
                scale *= op.stride
            else:
                total += scale * op.delay
        return total

    def _init_slots(self, ops: list[_Op], slots: list[Any]) -> None:
        for op in ops:
            if op.slot >= 0:
                slots[op.slot] = op.init_state()
            if isinstance(op, _Residual):
                self._init_slots(op.ops, slots)

    # -- running --------------------------------------------------------------------------
    def new_stream(self, noise_seed: int | None = None) -> SnacStream:
        """Fresh state for one utterance; ``noise_seed`` seeds SNAC's noise (None: random)."""
        slots: list[Any] = [None] * self._slots
        self._init_slots(self.ops, slots)
        for i, s in enumerate(slots):
            if isinstance(s, Tensor):
                slots[i] = s.to(device=self.device, dtype=self.dtype)
            elif isinstance(s, tuple):
                slots[i] = (s[0].to(device=self.device, dtype=self.dtype), s[1])
        return SnacStream(slots=slots, noise_seed=noise_seed)

    def latents(self, frames: Sequence[Frame]) -> Tensor:
        """Frames to SNAC latent rows (``[4 n, latent_dim]``): three table lookups."""
        codes = torch.tensor(frames, dtype=torch.long, device=self.device).view(-1, FRAME_SIZE)
        # Orpheus frame layout: c0 | c1[0] | c2[0] c2[1] | c1[1] | c2[2] c2[3].
        c0 = codes[:, 0]
        c1 = codes[:, [1, 4]].reshape(-1)
        c2 = codes[:, [2, 3, 5, 6]].reshape(-1)
        z = self.tables[2][c2]
        z += self.tables[1][c1].repeat_interleave(2, dim=0)
        z += self.tables[0][c0].repeat_interleave(4, dim=0)
        return z

    @torch.inference_mode()
    def run(self, jobs: Sequence[tuple[SnacStream, Sequence[Frame], bool]]) -> list[np.ndarray]:
        """Decode new frames of several streams in one pass: ``(stream, frames, final)`` each.

        Returns each stream's newly finished float32 samples. ``final`` ends the stream's
        utterance: its remaining samples come out and the stream is finished. Over a stream's
        life the samples total ``frames * 2048`` and equal :meth:`SnacCodec.decode` of all its
        frames to float rounding. Frames must be valid (see ``validate_frame``).
        """
        if not jobs:
            return []
        states = check_run(jobs)
        batch = _Batch(states=states, finals=[bool(j[2]) for j in jobs], noise=self.codec.noise)
        xs: list[Tensor] = []
        for state, frames, _ in jobs:
            if len(frames):
                xs.append(self.latents(frames))
            else:
                xs.append(torch.zeros((0, self.tables[0].shape[1]), dtype=self.dtype))
            state.frames_in += len(frames)
        for op in self.ops:
            xs = op.run(xs, batch)
        out: list[np.ndarray] = []
        for state, final, y in zip(states, batch.finals, xs, strict=True):
            pcm = y[:, 0].float().cpu().numpy()
            state.samples_out += pcm.size
            if final:
                state.finished = True
            out.append(pcm)
        return out


def check_run(jobs: Sequence[tuple[Any, Sequence[Frame], bool]]) -> list[Any]:
    """The streams of a run's ``(stream, frames, final)`` jobs; ``ValueError`` if one appears
    twice or already ended (shared by every program with :meth:`SnacProgram.run`'s interface).
    """
    states = [job[0] for job in jobs]
    if len({id(s) for s in states}) != len(states):
        raise ValueError("a stream appears twice in one run")
    for s in states:
        if s.finished:
            raise ValueError("this stream already ended (final=True); start a new one")
    return states


class ExactStreamingDecoder:
    """Frames in, final PCM out, decoded incrementally (:class:`SnacProgram`): the output equals
    a full decode of the utterance to float rounding, with no frame decoded twice.

    Same interface as :class:`~voxlane.server.codec.StreamingDecoder` (``push``, ``flush``,
    ``reset``, ``first_audio_tokens``). ``push`` decodes the frames it holds once there are
    ``frames_per_call`` of them, or — with ``buffered_s`` (audio handed out, not yet played) —
    as many as that audio covers (at least 1), so playback is never left waiting for a large
    call; larger calls cost less per frame. Synchronous and not thread-safe.
    """

    def __init__(self, program: SnacProgram, *, frames_per_call: int = 8) -> None:
        if isinstance(frames_per_call, bool) or not 1 <= frames_per_call <= 256:
            raise OutOfRangeError(f"frames_per_call must be 1..256, got {frames_per_call!r}")
        self.program = program
        self.frames_per_call = frames_per_call
        self.reset()

    @property
    def first_audio_tokens(self) -> int:
        """Audio tokens before the first sample is final (3 frames for SNAC 24 kHz)."""
        return (self.program.delay // SAMPLES_PER_FRAME + 1) * FRAME_SIZE

    @property
    def frames_received(self) -> int:
        """Frames pushed since the last reset/flush."""
        return self._stream.frames_in + len(self._pending)

    def reset(self) -> None:
        """Drop all state (e.g. on barge-in); the next push starts a new utterance."""
        self._stream = self.program.new_stream()
        self._pending: list[Frame] = []

    def chunk_frames(self, buffered_s: float | None) -> int:
        """Frames one decode call waits for, given the audio playback holds."""
        if buffered_s is None:
            return self.frames_per_call
        return max(1, min(self.frames_per_call, int(buffered_s / _FRAME_SECONDS)))

    def take(self, frames: Sequence[Sequence[int]], buffered_s: float | None) -> list[Frame]:
        """Validate and hold ``frames``; return the frames to decode now (maybe none).

        The first half of :meth:`push`, for a caller that batches the decode of many streams
        (:meth:`SnacProgram.run` on ``self.stream``)."""
        checked = [validate_frame(f) for f in frames]  # all or nothing
        self._pending.extend(checked)
        if len(self._pending) < self.chunk_frames(buffered_s):
            return []
        ready, self._pending = self._pending, []
        return ready

    def take_rest(self) -> list[Frame]:
        """The frames still held, for the final decode of the utterance."""
        ready, self._pending = self._pending, []
        return ready

    @property
    def stream(self) -> SnacStream:
        """The program state of the current utterance."""
        return self._stream

    def seed_noise(self, seed: int) -> None:
        """Seed SNAC's noise for the current utterance: the same frames and seed then give
        the same samples (in float32 bit for bit, however the frames arrive and whatever is
        batched alongside; see :class:`SnacProgram` for bfloat16). Call before the
        utterance's first decode; the next utterance (after :meth:`flush` or :meth:`reset`)
        draws a random seed again unless seeded too."""
        if self._stream.frames_in:
            raise ValueError("seed_noise after the utterance started decoding")
        self._stream.noise_seed = int(seed)

    def push(
        self, frames: Sequence[Sequence[int]], *, buffered_s: float | None = None
    ) -> np.ndarray:
        """Add frames; return the float32 samples that became final (maybe none).

        Raises :class:`~voxlane.errors.InvalidTokenError` for a malformed frame (nothing of
        that push is kept)."""
        ready = self.take(frames, buffered_s)
        if not ready:
            return np.zeros(0, dtype=np.float32)
        return self.program.run([(self._stream, ready, False)])[0]

    def flush(self) -> np.ndarray:
        """End the utterance: return the remaining samples and reset for the next one."""
        if self._stream.frames_in == 0 and not self._pending:
            self.reset()
            return np.zeros(0, dtype=np.float32)
        tail = self.program.run([(self._stream, self.take_rest(), True)])[0]
        self.reset()
        return tail


class DecodeBatcher:
    """Continuous batching of many streams' SNAC decodes on one worker thread.

    Each turn awaits :meth:`push` / :meth:`flush` with its own :class:`ExactStreamingDecoder`.
    Decode calls queue up; the worker (``executor``, normally the service's single codec thread)
    takes everything queued when it becomes free and runs it as one ragged batch
    (:meth:`SnacProgram.run`): with many streams the per-call costs (reading the upsamplers'
    weights, per-layer overheads) are paid once per batch instead of once per stream. A run
    takes queued calls in order up to ``max_streams`` streams and ``max_frames`` new frames
    (one call at least): small calls gain from sharing a run, while large ones only grow the
    activations past the CPU caches (measured by ``python -m bench codec``). A stream that
    already ended fails alone; a run that fails inside the model fails (and ends) the streams
    it carried.
    """

    def __init__(
        self,
        program: SnacProgram,
        executor: Any,
        *,
        max_streams: int = 32,
        max_frames: int = 8,
    ) -> None:
        import threading

        if max_streams < 1:
            raise OutOfRangeError(f"max_streams must be >= 1, got {max_streams}")
        self.program = program
        self.executor = executor
        self.max_streams = max_streams
        self.max_frames = max_frames
        self._lock = threading.Lock()
        self._queue: list[tuple[SnacStream, list[Frame], bool, Any, Any]] = []
        self._draining = False
        #: Decode runs so far and the stream-calls they carried (batching ratio = calls / runs).
        self.runs = 0
        self.calls = 0

    async def push(
        self,
        decoder: ExactStreamingDecoder,
        frames: Sequence[Sequence[int]],
        *,
        buffered_s: float | None = None,
    ) -> np.ndarray:
        """:meth:`ExactStreamingDecoder.push`, batched with the other streams' decodes."""
        ready = decoder.take(frames, buffered_s)
        if not ready:
            return np.zeros(0, dtype=np.float32)
        return await self._submit(decoder.stream, ready, False)

    async def flush(self, decoder: ExactStreamingDecoder) -> np.ndarray:
        """:meth:`ExactStreamingDecoder.flush`, batched with the other streams' decodes."""
        stream = decoder.stream
        rest = decoder.take_rest()
        decoder.reset()
        if stream.frames_in == 0 and not rest:
            return np.zeros(0, dtype=np.float32)
        return await self._submit(stream, rest, True)

    async def _submit(self, stream: SnacStream, frames: list[Frame], final: bool) -> np.ndarray:
        import asyncio

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._queue.append((stream, frames, final, future, loop))
            start = not self._draining
            self._draining = True
        if start:
            try:
                loop.run_in_executor(self.executor, self._drain)
            except RuntimeError:  # executor shut down
                with self._lock:
                    self._draining = False
                    self._queue.clear()
                raise
        return await future

    def _drain(self) -> None:
        while True:
            with self._lock:
                n, frames = 0, 0
                for job in self._queue[: self.max_streams]:
                    if n and frames + len(job[1]) > self.max_frames:
                        break
                    n, frames = n + 1, frames + len(job[1])
                jobs = self._queue[:n]
                del self._queue[:n]
                if not jobs:
                    self._draining = False
                    return
            outs: list[Any] = [None] * len(jobs)
            live = []
            for i, job in enumerate(jobs):
                if job[0].finished:
                    outs[i] = ValueError("this stream already ended; start a new one")
                else:
                    live.append(i)
            if live:
                self.runs += 1
                self.calls += len(live)
                try:
                    results = self.program.run([jobs[i][:3] for i in live])
                except Exception as exc:
                    # A failure inside the layers leaves these streams half-advanced: end them.
                    for i in live:
                        jobs[i][0].finished = True
                    results = [exc] * len(live)
                for i, out in zip(live, results, strict=True):
                    outs[i] = out
            for (_, _, _, future, loop), out in zip(jobs, outs, strict=True):
                with contextlib.suppress(RuntimeError):  # that turn's loop closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, future, out)


def _resolve(future: Any, out: Any) -> None:
    if future.done():  # the turn was cancelled meanwhile
        return
    if isinstance(out, BaseException):
        future.set_exception(out)
    else:
        future.set_result(out)
