"""SNAC 24 kHz: load, decode frames to PCM (whole or streaming), encode reference audio.

Three pieces:

- :func:`load_snac` / :class:`SnacCodec` — the model behind one small API. ``decode``
  turns frames into exactly ``len(frames) * 2048`` float32 samples; ``encode_file`` /
  ``encode_array`` turn reference audio (WAV/FLAC/OGG, any rate, any channel count)
  into frames.
- :class:`StreamingDecoder` — frames in, final PCM out, every frame exactly once.
- :class:`PcmChunker` — PCM in, fixed-duration chunks out (the wire's 20–80 ms).

Why streaming needs care: SNAC's decoder convolutions are centred, so a frame's
samples depend on about 3 frames on each side. The Orpheus reference streamer
decodes a 4-frame window per emitted frame and keeps only the 2nd frame: it pays 4
frames of decoding per frame, never emits the first frame nor the last two, and has
only 1 frame of left context. :class:`StreamingDecoder` decodes ``frames_per_call``
frames per call with ``left`` frames of left context and ``lookahead`` frames of
right context, starts at the true signal edges (where a windowed decode equals the
full decode exactly) and flushes the tail, so its output equals a full decode to the
SNR the settings promise (measured by ``python -m bench codec``):

==============================  =====  =========  ====  =================  ==============
setting                          left  lookahead  max   first audio after  SNR vs full
==============================  =====  =========  ====  =================  ==============
:data:`DEFAULT_STREAMING`           2          2     8  21 tokens          ~85 dB
:data:`LOW_LATENCY_STREAMING`       2          0     8  7 tokens           ~30 dB
==============================  =====  =========  ====  =================  ==============

The server's default decoder is not this one but
:class:`voxlane.server.snac_stream.ExactStreamingDecoder`: incremental layer by layer, equal
to a full decode, a third of this decoder's cost, batched across streams. This one remains
for the low-latency preset and for SNAC variants with attention layers.

Model work here is synchronous; callers run it in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Literal

import numpy as np

from voxlane.errors import AudioFormatError, ModelNotFoundError, OutOfRangeError
from voxlane.protocol import MIN_CLONE_SECONDS
from voxlane.server.hub import resolve_model_dir
from voxlane.server.orpheus import (
    FRAME_SIZE,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    Frame,
    codebooks_to_frames,
    frames_to_codebooks,
    validate_frame,
)

__all__ = [
    "CODEC_PRECISIONS",
    "DEFAULT_STREAMING",
    "LOW_LATENCY_STREAMING",
    "MAX_REFERENCE_BYTES",
    "MAX_REFERENCE_SECONDS",
    "SILENCE_DBFS",
    "PcmChunker",
    "SnacCodec",
    "StreamingDecoder",
    "check_reference",
    "load_snac",
    "read_audio",
    "read_reference",
    "resolve_codec_precision",
]

#: Default longest reference clip :meth:`SnacCodec.encode_file` accepts.
MAX_REFERENCE_SECONDS = 30.0
#: Default largest reference file (encoded bytes) :meth:`SnacCodec.encode_file` accepts.
MAX_REFERENCE_BYTES = 20 * 1024 * 1024
#: Reference audio whose level (RMS over the whole clip) is below this is silence.
SILENCE_DBFS = -60.0

#: Default streaming setting: first audio after 3 frames (21 tokens), then 8 frames per
#: decode call with 2 frames of context on each side (~85 dB vs a full decode, 0.25-0.37x
#: the decode cost of the reference streamer).
DEFAULT_STREAMING: Mapping[str, int] = MappingProxyType(
    {"left": 2, "lookahead": 2, "frames_per_call": 8}
)
#: Low-latency setting: first audio after 1 frame (7 tokens). Without right context a
#: chunk's last frame is approximate (~30 dB vs a full decode overall); its last 512
#: samples are held back and crossfaded into the next decode so seams do not click.
LOW_LATENCY_STREAMING: Mapping[str, int] = MappingProxyType(
    {"left": 2, "lookahead": 0, "frames_per_call": 8, "crossfade": 512}
)

#: Values of ``--codec-precision`` (``voxlane serve``, ``voxlane demo``, the benchmarks): the
#: exact decoder's matrix products in float32, in bfloat16, or ``auto`` (see
#: :func:`resolve_codec_precision`).
CODEC_PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_codec_precision(
    precision: str = "auto", device: str = "cpu"
) -> Literal["float32", "bfloat16"]:
    """The :class:`~voxlane.server.snac_stream.SnacProgram` precision for ``precision``.

    ``"auto"`` is the faster one on ``device``: ``"bfloat16"`` where
    :func:`~voxlane.server.snac_stream.bf16_supported` (bf16 matrix hardware: AMX on x86
    CPUs), else ``"float32"`` (without that hardware bf16 products are slower than float32).
    ``"float32"`` and ``"bfloat16"`` are returned as given. Raises ``ValueError`` otherwise.
    """
    if precision == "float32" or precision == "bfloat16":
        return precision
    if precision != "auto":
        raise ValueError(f"codec precision {precision!r} is not one of {list(CODEC_PRECISIONS)}")
    from voxlane.server.snac_stream import bf16_supported

    return "bfloat16" if bf16_supported(device) else "float32"


_FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE

_SNAC_KWARGS = (
    "sampling_rate",
    "encoder_dim",
    "encoder_rates",
    "latent_dim",
    "decoder_dim",
    "decoder_rates",
    "attn_window_size",
    "codebook_size",
    "codebook_dim",
    "vq_strides",
    "noise",
    "depthwise",
)


def load_snac(
    name_or_path: str | os.PathLike[str] = "hubertsiuzdak/snac_24khz",
    *,
    device: str = "cpu",
    noise: bool = True,
) -> SnacCodec:
    """Load a SNAC 24 kHz checkpoint (``config.json`` + ``pytorch_model.bin`` or
    ``model.safetensors``) from a local directory or an HF hub id.

    ``noise=False`` switches SNAC's noise blocks off, making decoding deterministic
    (tests, benchmarks); :attr:`SnacCodec.noise` switches them back on.
    Raises :class:`~voxlane.errors.ModelNotFoundError` if the files are missing or
    the checkpoint is not a 24 kHz SNAC with Orpheus's 3 codebooks (strides 4, 2, 1).
    """
    import torch
    from snac import SNAC

    path = resolve_model_dir(
        name_or_path, required=("config.json",), any_of=("model.safetensors", "pytorch_model.bin")
    )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path / 'config.json'} is not readable JSON: {exc}") from exc
    if (
        config.get("sampling_rate") != SAMPLE_RATE
        or list(config.get("vq_strides", ())) != [4, 2, 1]
        or math.prod(config.get("decoder_rates", ())) * 4 != SAMPLES_PER_FRAME
    ):
        raise ModelNotFoundError(
            f"{path} is not a SNAC 24 kHz checkpoint (Orpheus needs sampling_rate 24000, "
            f"vq_strides [4, 2, 1], decoder_rates multiplying to 512); config: {config}"
        )
    model = SNAC(**{k: v for k, v in config.items() if k in _SNAC_KWARGS})
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"), device="cpu")
    else:
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    # load_state_dict also accepts the older weight_g/weight_v weight-norm layout.
    model.load_state_dict(state)
    return SnacCodec(model, device=device, noise=noise)


class SnacCodec:
    """A loaded SNAC 24 kHz model: frames <-> PCM at :data:`SAMPLE_RATE`.

    Build it with :func:`load_snac`. Methods are synchronous and run the model:
    call them from a worker thread.
    """

    def __init__(self, model: Any, *, device: str = "cpu", noise: bool = True) -> None:
        import torch
        from snac.layers import NoiseBlock
        from torch.nn.utils import parametrize

        self.device = torch.device(device)
        model = model.eval().to(self.device)
        # Weight norm recomputes every weight from (g, v) on each forward: fold it once,
        # which trims the fixed cost of every (small) streaming decode call.
        for module in model.modules():
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        self.model = model
        self._noise_blocks = [m for m in model.modules() if isinstance(m, NoiseBlock)]
        self._noise = True
        self.noise = noise

    @property
    def noise(self) -> bool:
        """Whether SNAC's noise blocks add ``randn * linear(x)`` (True after loading).

        With noise off, decoding the same frames twice gives the same samples.
        """
        return self._noise

    @noise.setter
    def noise(self, on: bool) -> None:
        for block in self._noise_blocks:
            if on:
                block.__dict__.pop("forward", None)  # back to NoiseBlock.forward
            else:
                block.forward = _identity
        self._noise = bool(on)

    def decode(self, frames: Sequence[Sequence[int]]) -> np.ndarray:
        """Decode frames in one pass: float32 PCM of exactly ``len(frames) * 2048`` samples."""
        frames = list(frames)
        if not frames:
            return np.zeros(0, dtype=np.float32)
        import torch

        codes = [
            torch.tensor(cb, dtype=torch.long, device=self.device).unsqueeze(0)
            for cb in frames_to_codebooks(frames)
        ]
        with torch.inference_mode():
            audio = self.model.decode(codes)  # [1, 1, n * 2048]
        return audio[0, 0].float().cpu().numpy()

    def encode_array(
        self,
        samples: np.ndarray,
        sample_rate: int,
        *,
        max_seconds: float | None = MAX_REFERENCE_SECONDS,
    ) -> list[Frame]:
        """Encode PCM to frames: ``ceil(seconds * 24000 / 2048)`` frames.

        ``samples`` is ``[n]`` or ``[n, channels]`` (soundfile's layout), float in
        [-1, 1] or integer PCM; channels are averaged, the rate is converted to 24 kHz
        with soxr. Raises :class:`~voxlane.errors.AudioFormatError` for empty,
        non-finite or over-long audio.
        """
        import soxr
        import torch

        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise AudioFormatError(f"sample rate must be a positive integer, got {sample_rate!r}")
        x = np.asarray(samples)
        if x.ndim not in (1, 2) or x.dtype.kind not in "fiu":
            raise AudioFormatError(
                f"audio must be a [samples] or [samples, channels] numeric array, "
                f"got shape {x.shape} dtype {x.dtype}"
            )
        if x.dtype.kind in "iu":
            info = np.iinfo(x.dtype)
            x = (x.astype(np.float64) - (info.max + info.min + 1) / 2) / (
                (info.max - info.min + 1) / 2
            )
        if x.ndim == 2:
            if x.shape[1] == 0:
                raise AudioFormatError("audio has no channels")
            x = x.mean(axis=1)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.size == 0:
            raise AudioFormatError("audio is empty (0 samples)")
        seconds = x.size / sample_rate
        if max_seconds is not None and seconds > max_seconds:
            raise AudioFormatError(
                f"reference audio is {seconds:.1f} s long; the limit is {max_seconds:g} s"
            )
        if not np.isfinite(x).all():
            raise AudioFormatError("audio contains NaN or infinite samples")
        if sample_rate != SAMPLE_RATE:
            x = soxr.resample(x, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        if x.size == 0:
            raise AudioFormatError(f"audio is too short ({seconds * 1000:.2f} ms) to encode")
        audio = torch.from_numpy(x).to(self.device).view(1, 1, -1)
        with torch.inference_mode():
            c0, c1, c2 = (c[0].tolist() for c in self.model.encode(audio))
        return codebooks_to_frames(c0, c1, c2)

    def encode_file(
        self,
        source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
        *,
        max_seconds: float | None = MAX_REFERENCE_SECONDS,
        max_bytes: int | None = MAX_REFERENCE_BYTES,
    ) -> list[Frame]:
        """Encode a reference clip (WAV, FLAC, OGG/Vorbis, ... as libsndfile reads) to frames.

        ``source`` is a path, the file's bytes, or a binary file object. Raises
        :class:`~voxlane.errors.AudioFormatError` if it is unreadable, empty, longer
        than ``max_seconds`` or larger than ``max_bytes``.
        """
        samples, rate = read_audio(source, max_seconds=max_seconds, max_bytes=max_bytes)
        return self.encode_array(samples, rate, max_seconds=max_seconds)


def read_audio(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
    *,
    max_seconds: float | None = MAX_REFERENCE_SECONDS,
    max_bytes: int | None = MAX_REFERENCE_BYTES,
) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile: ``([n, channels] float32, sample_rate)``.

    Checks size and duration before decoding the samples; every failure is an
    :class:`~voxlane.errors.AudioFormatError`.
    """
    import soundfile as sf

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
        size = len(data)
        handle: Any = io.BytesIO(data)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise AudioFormatError(f"audio file {name} does not exist")
        size = path.stat().st_size
        handle = str(path)
    elif hasattr(source, "read"):
        name, size, handle = "<file object>", None, source
    else:
        raise AudioFormatError(
            f"audio must be a path, bytes or a binary file object, not {type(source).__name__}"
        )
    if size == 0:
        raise AudioFormatError(f"audio {name} is empty (0 bytes)")
    if size is not None and max_bytes is not None and size > max_bytes:
        raise AudioFormatError(f"audio {name} is {size} bytes; the limit is {max_bytes} bytes")
    try:
        with sf.SoundFile(handle) as f:
            rate, declared = f.samplerate, f.frames
            if max_seconds is not None and declared > max_seconds * rate:
                raise AudioFormatError(
                    f"audio {name} is {declared / rate:.1f} s long; the limit is {max_seconds:g} s"
                )
            limit = -1 if max_seconds is None else int(max_seconds * rate) + 1
            samples = f.read(frames=limit, dtype="float32", always_2d=True)
    except AudioFormatError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise AudioFormatError(f"audio {name} is not a readable audio file: {exc}") from exc
    if samples.shape[0] == 0:
        raise AudioFormatError(f"audio {name} holds no samples")
    return samples, int(rate)


def _identity(x: Any) -> Any:
    return x


class StreamingDecoder:
    """Frames in, final PCM out: the streaming form of :meth:`SnacCodec.decode`.

    ``push(frames)`` returns the samples that became final, ``flush()`` the tail at the
    end of an utterance; together they return every frame's 2,048 samples exactly once
    (first and last included), so an utterance of ``n`` frames yields ``n * 2048``
    samples that match ``codec.decode(all_frames)`` to the setting's SNR.

    A decode call covers ``chunk`` new frames plus ``left`` frames before them (already
    emitted, context only) and ``lookahead`` frames after them (context only; they are
    decoded again, as new frames, by the next call). 3 frames on each side reproduce a
    full decode to float precision; 2 give ~80 dB at a seam.

    The chunk starts at ``first_frames_per_call`` (1: first audio after
    ``(1 + lookahead) * 7`` tokens) and doubles after every call up to
    ``frames_per_call``: 1, 2, 4, 8, 8, ... Growth goes by call count, so the output
    depends only on the frames, never on how they were pushed (bursts or one at a time
    give identical samples). Waiting for a chunk twice the size of the last one keeps
    playback fed only if the speech LM runs at more than twice real time. A caller that
    tracks playback passes ``push(frames, buffered_s=...)`` (audio handed out but not
    played yet): the chunk is then the whole frames that much audio covers (at least 1, at
    most ``frames_per_call``), so the decoder never waits for more audio than playback holds
    (safe down to a real-time LM, at a higher cost per frame while the buffer is short) and
    a later utterance with a deep buffer is decoded in full-size calls without a new ramp.

    ``crossfade`` (samples, default 0; needs ``left >= 1``) holds back the last samples
    of each chunk and fades them into the next call's decode of the same samples. It
    exists for ``lookahead < 2``, where a chunk's last samples are approximate and a
    hard seam would click; :data:`LOW_LATENCY_STREAMING` uses 512.

    Synchronous and not thread-safe: one decoder per stream, driven by one worker
    thread. Invalid settings raise :class:`~voxlane.errors.OutOfRangeError`.
    """

    def __init__(
        self,
        codec: SnacCodec,
        *,
        left: int = 2,
        lookahead: int = 2,
        frames_per_call: int = 8,
        first_frames_per_call: int = 1,
        crossfade: int = 0,
    ) -> None:
        _check_int("left", left, 0, 16)
        _check_int("lookahead", lookahead, 0, 16)
        _check_int("frames_per_call", frames_per_call, 1, 256)
        _check_int("first_frames_per_call", first_frames_per_call, 1, frames_per_call)
        _check_int("crossfade", crossfade, 0, SAMPLES_PER_FRAME)
        if crossfade and left < 1:
            raise OutOfRangeError("crossfade needs left >= 1 (the faded samples are re-decoded)")
        self.codec = codec
        self.left = left
        self.lookahead = lookahead
        self.frames_per_call = frames_per_call
        self.first_frames_per_call = first_frames_per_call
        self.crossfade = crossfade
        # Raised-cosine weights of the new decode; (1 - w) weighs the held-back samples.
        ramp = (np.arange(crossfade, dtype=np.float64) + 0.5) / max(crossfade, 1)
        self._fade_in = (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)
        self.reset()

    @property
    def first_audio_tokens(self) -> int:
        """Audio tokens the first :meth:`push` output needs (without a flush)."""
        return (self.first_frames_per_call + self.lookahead) * FRAME_SIZE

    @property
    def frames_received(self) -> int:
        """Frames pushed since the last reset/flush."""
        return self._received

    @property
    def frames_emitted(self) -> int:
        """Frames whose samples were returned (all but ``crossfade`` held-back samples)."""
        return self._emitted

    def reset(self) -> None:
        """Drop all state (e.g. on barge-in); the next push starts a new utterance."""
        self._frames: list[Frame] = []  # frames from absolute index self._base on
        self._base = 0
        self._received = 0
        self._emitted = 0
        self._chunk = self.first_frames_per_call
        self._held = np.zeros(0, dtype=np.float32)

    def push(
        self, frames: Sequence[Sequence[int]], *, buffered_s: float | None = None
    ) -> np.ndarray:
        """Add frames; return the float32 samples that became final (maybe none).

        ``buffered_s``: seconds of audio already returned that playback has not played
        yet; when given, a decode call takes as many frames as that covers (1 up to
        ``frames_per_call``) instead of following the count schedule, so it never waits for
        more audio than playback holds, and with a deep buffer it decodes in full-size calls
        from the start of an utterance.
        Raises :class:`~voxlane.errors.InvalidTokenError` for a malformed frame
        (nothing of that push is kept).
        """
        checked = [validate_frame(f) for f in frames]
        self._frames.extend(checked)
        self._received += len(checked)
        out: list[np.ndarray] = []
        while True:
            chunk = self._chunk
            if buffered_s is not None:
                # Playback holds buffered_s: decode as many frames as that covers (up to the
                # maximum) — no need to ramp up again at every new utterance, and bigger calls
                # cost less per frame.
                chunk = max(1, min(self.frames_per_call, int(buffered_s / _FRAME_SECONDS)))
            if self._received - self.lookahead - self._emitted < chunk:
                break
            out.append(self._decode(chunk, at_end=False))
            self._chunk = min(self._chunk * 2, self.frames_per_call)
            if buffered_s is not None:
                buffered_s += len(out[-1]) / SAMPLE_RATE
        return _concat(out)

    def flush(self) -> np.ndarray:
        """End the utterance: return the remaining samples and reset for the next one."""
        if self._received > self._emitted:
            tail = self._decode(self._received - self._emitted, at_end=True)
        else:
            tail = self._held  # decoded at the true end already: exact
        self.reset()
        return tail

    def _decode(self, count: int, *, at_end: bool) -> np.ndarray:
        start = max(0, self._emitted - self.left)
        stop = self._received if at_end else self._emitted + count + self.lookahead
        window = self.codec.decode(self._frames[start - self._base : stop - self._base])
        held = len(self._held)
        first = (self._emitted - start) * SAMPLES_PER_FRAME
        pcm = window[first - held : first + count * SAMPLES_PER_FRAME]
        if held:  # == self.crossfade
            pcm[:held] = self._held * (1.0 - self._fade_in) + pcm[:held] * self._fade_in
        self._emitted += count
        if not at_end and self.crossfade:
            self._held = pcm[len(pcm) - self.crossfade :].copy()
            pcm = pcm[: len(pcm) - self.crossfade]
        else:
            self._held = np.zeros(0, dtype=np.float32)
        # Keep only the left context the next call needs.
        drop = max(0, self._emitted - self.left) - self._base
        if drop > 0:
            del self._frames[:drop]
            self._base += drop
        return pcm


class PcmChunker:
    """Cut a PCM stream into chunks of exactly ``chunk_ms`` (the wire's audio messages).

    ``push`` returns the whole chunks available, ``flush`` the shorter remainder at the
    end of an utterance. ``chunk_ms`` must be 20..80 ms, else
    :class:`~voxlane.errors.OutOfRangeError`.
    """

    MIN_MS = 20
    MAX_MS = 80

    def __init__(self, sample_rate: int = SAMPLE_RATE, chunk_ms: float = 40) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise OutOfRangeError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if (
            isinstance(chunk_ms, bool)
            or not isinstance(chunk_ms, (int, float))
            or not self.MIN_MS <= chunk_ms <= self.MAX_MS
        ):
            raise OutOfRangeError(
                f"chunk_ms must be {self.MIN_MS}..{self.MAX_MS} ms, got {chunk_ms!r}"
            )
        self.sample_rate = sample_rate
        self.chunk_ms = chunk_ms
        #: Samples per chunk: ``round(sample_rate * chunk_ms / 1000)`` (960 at 24 kHz, 40 ms).
        self.chunk_samples = round(sample_rate * chunk_ms / 1000)
        self.reset()

    def reset(self) -> None:
        """Drop buffered samples."""
        self._pending = np.zeros(0, dtype=np.float32)

    @property
    def pending(self) -> int:
        """Samples buffered, fewer than one chunk."""
        return len(self._pending)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Add samples; return every complete chunk (each exactly ``chunk_samples`` long)."""
        # Always a private copy: chunks must not alias the caller's buffer.
        x = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        n = len(x) // self.chunk_samples * self.chunk_samples
        chunks = [x[i : i + self.chunk_samples] for i in range(0, n, self.chunk_samples)]
        self._pending = x[n:].copy()
        return chunks

    def flush(self) -> np.ndarray | None:
        """Return the remaining samples (shorter than a chunk), or None if there are none."""
        rest = self._pending
        self.reset()
        return rest if len(rest) else None


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise OutOfRangeError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_reference(
    data: bytes,
    audio_format: str,
    sample_rate: int | None = None,
    *,
    max_seconds: float | None = MAX_REFERENCE_SECONDS,
) -> tuple[np.ndarray, int]:
    """Decode and check the reference audio of a clone: ``([n, channels] float32, rate)``.

    ``audio_format`` is ``"wav"`` (any file libsndfile reads; a WAV whose data chunk holds
    fewer bytes than its header declares is refused as truncated) or ``"pcm_s16le"`` (raw
    mono samples at ``sample_rate``). The audio must pass :func:`check_reference`. Every
    failure is an :class:`~voxlane.errors.AudioFormatError` that says what is wrong.
    """
    if audio_format == "pcm_s16le":
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise AudioFormatError(f"pcm_s16le audio needs a sample rate, got {sample_rate!r}")
        if len(data) % 2:
            raise AudioFormatError(
                f"pcm_s16le audio of {len(data)} bytes is not whole 2-byte samples"
            )
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32).reshape(-1, 1) / 32768.0
        rate = sample_rate
        if max_seconds is not None and samples.shape[0] > max_seconds * rate:
            raise AudioFormatError(
                f"reference audio is {samples.shape[0] / rate:.1f} s long; "
                f"the limit is {max_seconds:g} s"
            )
    elif audio_format == "wav":
        missing = _wav_data_shortfall(data)
        if missing is not None:
            declared, present = missing
            raise AudioFormatError(
                f"WAV is truncated: its header declares {declared} bytes of samples, "
                f"the file holds {present}"
            )
        samples, rate = read_audio(data, max_seconds=max_seconds, max_bytes=None)
    else:
        raise AudioFormatError(f"unknown reference audio format {audio_format!r}")
    check_reference(samples, rate)
    return samples, rate


def check_reference(
    samples: np.ndarray, sample_rate: int, *, min_seconds: float = MIN_CLONE_SECONDS
) -> None:
    """Refuse reference audio a voice cannot be taken from (:class:`AudioFormatError`):
    shorter than ``min_seconds`` or silent (RMS below :data:`SILENCE_DBFS`).

    ``samples`` is ``[n]`` or ``[n, channels]``, float in [-1, 1].
    """
    x = np.asarray(samples, dtype=np.float64)
    seconds = x.shape[0] / sample_rate
    if seconds < min_seconds:
        raise AudioFormatError(
            f"reference audio is {seconds * 1000:.0f} ms long; at least {min_seconds:g} s "
            "of speech is needed to clone a voice"
        )
    mono = x.mean(axis=1) if x.ndim == 2 else x
    rms = float(np.sqrt(np.mean(np.square(mono))))
    if not np.isfinite(rms):
        raise AudioFormatError("audio contains NaN or infinite samples")
    level = 20 * np.log10(rms) if rms > 0 else -np.inf
    if level < SILENCE_DBFS:
        shown = "digital silence" if rms == 0 else f"{level:.0f} dBFS"
        raise AudioFormatError(
            f"reference audio is silent ({shown}, below {SILENCE_DBFS:g} dBFS): no voice to clone"
        )


def _wav_data_shortfall(data: bytes) -> tuple[int, int] | None:
    """``(declared, present)`` bytes of a RIFF/WAVE file's data chunk if it is cut short.

    libsndfile silently reads what is there; a clip cut mid-upload would clone a voice from
    part of the words of its transcript. Sizes 0 and 0xFFFFFFFF mean "unknown" (streamed
    WAVs, RF64) and are not checked; non-RIFF data is left to libsndfile.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            present = len(data) - pos - 8
            if size in (0, 0xFFFFFFFF) or present >= size:
                return None
            return size, present
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    return None
