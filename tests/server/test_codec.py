"""SNAC codec: loading, streaming == full decode, PCM chunking, reference-audio encoding.

Random-weight demo SNAC with noise off, small frame counts (decoding is the slow part).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxlane.errors import AudioFormatError, InvalidTokenError, OutOfRangeError
from voxlane.server.codec import (
    DEFAULT_STREAMING,
    LOW_LATENCY_STREAMING,
    PcmChunker,
    SnacCodec,
    StreamingDecoder,
    load_snac,
    read_reference,
    resolve_codec_precision,
)
from voxlane.server.orpheus import SAMPLES_PER_FRAME

F = SAMPLES_PER_FRAME
N = 20  # frames per utterance: covers the 1, 2, 4, 8 chunk ramp, steady state and flush


@pytest.fixture(scope="module")
def codec(demo_snac_dir: Path) -> Iterator[SnacCodec]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much steadier than 2 on a busy 2-core box
    yield load_snac(demo_snac_dir, noise=False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frames() -> list[tuple[int, ...]]:
    rng = np.random.default_rng(7)
    body = [tuple(int(c) for c in row) for row in rng.integers(0, 4096, (N - 2, 7))]
    # Codes 0 and 4095 are legitimate (the reference streamer drops code 0).
    return [(0,) * 7, *body, (4095,) * 7]


@pytest.fixture(scope="module")
def full(codec: SnacCodec, frames: list) -> np.ndarray:
    return codec.decode(frames)


def snr_db(estimate: np.ndarray, target: np.ndarray) -> float:
    noise = float(np.sum((estimate.astype(np.float64) - target) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(target**2.0)) / noise)


def stream(decoder: StreamingDecoder, frames: list, sizes: list[int] | None = None) -> np.ndarray:
    """Push ``frames`` in bursts of ``sizes`` (cycled; default one at a time), then flush."""
    out, i, k = [], 0, 0
    sizes = sizes or [1]
    while i < len(frames):
        out.append(decoder.push(frames[i : i + sizes[k % len(sizes)]]))
        i += sizes[k % len(sizes)]
        k += 1
    out.append(decoder.flush())
    for part in out:
        assert part.dtype == np.float32 and part.ndim == 1
    return np.concatenate(out)


# -- loading and full decode ---------------------------------------------------------------


def test_full_decode_is_exactly_2048_samples_per_frame(codec: SnacCodec, full, frames) -> None:
    assert full.dtype == np.float32 and full.shape == (len(frames) * F,)
    assert np.isfinite(full).all() and full.std() > 0.01
    assert codec.decode([]).shape == (0,)


def test_noise_switch_makes_decoding_deterministic(codec: SnacCodec, frames) -> None:
    few = frames[:2]
    assert np.array_equal(codec.decode(few), codec.decode(few))
    codec.noise = True
    try:
        assert codec.noise
        a, b = codec.decode(few), codec.decode(few)
        assert not np.allclose(a, b, atol=1e-4)
    finally:
        codec.noise = False
    assert not codec.noise
    assert np.array_equal(codec.decode(few), codec.decode(few))


def test_safetensors_checkpoint_loads_like_pytorch_bin(
    codec: SnacCodec, demo_snac_dir: Path, tmp_path: Path, frames
) -> None:
    import torch
    from safetensors.torch import save_file

    state = torch.load(demo_snac_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((demo_snac_dir / "config.json").read_text())
    other = load_snac(tmp_path, noise=False)
    assert np.array_equal(other.decode(frames[:2]), codec.decode(frames[:2]))


def test_missing_checkpoint_is_model_not_found(tmp_path: Path) -> None:
    from voxlane.errors import ModelNotFoundError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"pytorch_model\.bin"):
        load_snac(tmp_path)


# -- streaming == full -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_stream(codec: SnacCodec, frames: list) -> np.ndarray:
    """The default setting's output, frames pushed one at a time."""
    return stream(StreamingDecoder(codec, **DEFAULT_STREAMING), frames)


@pytest.mark.parametrize(
    ("settings", "promised_db"),
    [
        (None, 80.0),  # DEFAULT_STREAMING, pushed one frame at a time
        (dict(left=3, lookahead=3, frames_per_call=4), 110.0),  # exact to float precision
        (dict(LOW_LATENCY_STREAMING), 25.0),
        (dict(left=1, lookahead=1, frames_per_call=3, first_frames_per_call=3), 35.0),
    ],
    ids=["default", "exact", "low_latency", "short_context"],
)
def test_streaming_equals_full_decode(
    codec: SnacCodec, frames, full, default_stream, settings: dict | None, promised_db: float
) -> None:
    out = (
        default_stream if settings is None else stream(StreamingDecoder(codec, **settings), frames)
    )
    assert out.shape == full.shape  # every frame exactly once, first and last included
    assert snr_db(out, full) >= promised_db
    # Frame by frame too: a lost, repeated or shifted frame would sink its SNR.
    for i in range(len(frames)):
        assert snr_db(out[i * F : (i + 1) * F], full[i * F : (i + 1) * F]) >= promised_db - 10


class SmoothFakeCodec:
    """Decodes frame ``(i, ...)`` to the i-th 2048 samples of a 440 Hz sine, and, like SNAC
    without right context, bends the last 1024 samples of every window away from it."""

    def decode(self, frames) -> np.ndarray:
        t = np.arange(frames[0][0] * F, (frames[-1][0] + 1) * F) / 24_000
        out = 0.5 * np.sin(2 * np.pi * 440 * t)
        out[-1024:] += 0.2 * np.linspace(0, 1, 1024) ** 2
        return out.astype(np.float32)


@pytest.mark.parametrize("crossfade", [0, 512])
def test_crossfade_removes_the_click_at_approximate_seams(crossfade: int) -> None:
    frames = [(i, 0, 0, 0, 0, 0, 0) for i in range(N)]
    settings = {**LOW_LATENCY_STREAMING, "crossfade": crossfade}
    out = stream(StreamingDecoder(SmoothFakeCodec(), **settings), frames)  # type: ignore[arg-type]
    assert out.shape == (N * F,)
    sine_step = 2 * np.pi * 440 / 24_000 * 0.5  # the largest step of the clean sine
    worst = float(np.abs(np.diff(out)).max())
    if crossfade:
        assert worst < sine_step + 0.005  # seams are as smooth as the signal
    else:
        assert worst > sine_step + 0.1  # a hard seam after an approximate tail clicks


def test_push_pattern_does_not_change_output(codec: SnacCodec, frames, default_stream) -> None:
    decoder = StreamingDecoder(codec, **DEFAULT_STREAMING)
    # Uneven bursts, then (same decoder after flush: a new utterance) all at once.
    assert np.array_equal(stream(decoder, frames, [3, 1, 7, 2]), default_stream)
    assert np.array_equal(stream(decoder, frames, [len(frames)]), default_stream)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_short_utterance_is_flushed_exactly(codec: SnacCodec, frames, n: int) -> None:
    decoder = StreamingDecoder(codec, **DEFAULT_STREAMING)
    pushed = stream(decoder, frames[:n])
    assert np.array_equal(pushed, codec.decode(frames[:n]))


def test_first_audio_after_promised_tokens(codec: SnacCodec, frames) -> None:
    decoder = StreamingDecoder(codec, **DEFAULT_STREAMING)
    assert decoder.first_audio_tokens == 21
    assert len(decoder.push(frames[:2])) == 0
    assert len(decoder.push(frames[2:3])) == F  # the first frame, before the flush

    fast = StreamingDecoder(codec, **LOW_LATENCY_STREAMING)
    assert fast.first_audio_tokens == 7
    first = fast.push(frames[:1])
    assert len(first) == F - LOW_LATENCY_STREAMING["crossfade"]
    assert len(first) + len(fast.flush()) == F


def test_playback_hint_keeps_chunks_within_the_buffered_audio(
    codec: SnacCodec, frames, full
) -> None:
    few = frames[:8]
    decoder = StreamingDecoder(codec, **DEFAULT_STREAMING)
    parts = [decoder.push([f], buffered_s=0.1) for f in few]
    # 0.1 s of playback covers one 85 ms frame: one frame per call once 3 are in.
    assert [len(p) for p in parts] == [0, 0] + [F] * (len(few) - 2)
    out = np.concatenate([*parts, decoder.flush()])
    # Every frame is a seam at 1 frame per call: a little under the 8-frame setting's SNR.
    assert out.shape == (len(few) * F,) and snr_db(out, codec.decode(few)) >= 75
    # With a deep buffer (a later segment of a turn) calls are full size from the start.
    decoder = StreamingDecoder(codec, **DEFAULT_STREAMING)
    sizes = [len(decoder.push([f], buffered_s=10.0)) // F for f in frames[:12]]
    assert [s for s in sizes if s] == [8]
    assert sizes.index(8) == 9  # 8 frames plus 2 of lookahead were needed


def test_reset_discards_the_utterance(codec: SnacCodec, frames) -> None:
    decoder = StreamingDecoder(codec, **DEFAULT_STREAMING)
    assert len(decoder.push(frames[:4])) == F
    decoder.reset()
    assert decoder.frames_received == 0 and decoder.frames_emitted == 0
    assert np.array_equal(stream(decoder, frames[:3]), codec.decode(frames[:3]))


def test_malformed_frames_are_rejected(codec: SnacCodec) -> None:
    decoder = StreamingDecoder(codec)
    with pytest.raises(InvalidTokenError):
        decoder.push([(1, 2, 3)])
    with pytest.raises(InvalidTokenError):
        decoder.push([(0, 0, 0, 0, 0, 0, 4096)])
    assert decoder.frames_received == 0


@pytest.mark.parametrize(
    "settings",
    [
        dict(frames_per_call=0),
        dict(left=-1),
        dict(first_frames_per_call=9, frames_per_call=8),
        dict(left=0, lookahead=0, crossfade=256),
        dict(crossfade=F + 1),
    ],
)
def test_bad_streaming_settings(codec: SnacCodec, settings: dict) -> None:
    with pytest.raises(OutOfRangeError):
        StreamingDecoder(codec, **settings)


# -- PCM chunking ------------------------------------------------------------------------------


def test_chunker_emits_exact_chunks_and_a_short_last_one() -> None:
    chunker = PcmChunker(24_000, chunk_ms=40)
    assert chunker.chunk_samples == 960
    pcm = np.arange(10_000, dtype=np.float32)
    chunks = []
    edges = np.cumsum([0, 1, 959, 2048, 5000, 1992])  # 10,000 samples in uneven pushes
    for a, b in itertools.pairwise(edges):
        chunks += chunker.push(pcm[a:b])
    last = chunker.flush()
    assert [len(c) for c in chunks] == [960] * 10
    assert last is not None and len(last) == 400
    assert np.array_equal(np.concatenate([*chunks, last]), pcm)
    assert chunker.flush() is None


def test_chunks_do_not_alias_the_callers_buffer() -> None:
    chunker = PcmChunker(24_000, chunk_ms=20)
    pcm = np.ones(480, dtype=np.float32)
    (chunk,) = chunker.push(pcm)
    pcm[:] = 0
    assert chunk.sum() == 480


@pytest.mark.parametrize("ms", [19, 81, 0, True])
def test_chunker_rejects_out_of_range_durations(ms) -> None:
    with pytest.raises(OutOfRangeError):
        PcmChunker(24_000, chunk_ms=ms)


# -- encoding reference audio -------------------------------------------------------------------


def tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    hiss = np.random.default_rng(0).standard_normal(t.size)
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * hiss
    return np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels", "seconds"),
    [
        ("WAV", "PCM_16", 16_000, 2, 0.5),
        ("FLAC", "PCM_16", 44_100, 1, 0.3),
        ("OGG", "VORBIS", 48_000, 2, 0.7),
        ("WAV", "FLOAT", 24_000, 1, 0.2),
    ],
)
def test_encode_file_any_format_rate_and_channels(
    codec: SnacCodec, tmp_path: Path, fmt, subtype, rate, channels, seconds
) -> None:
    path = tmp_path / f"ref.{fmt.lower()}"
    sf.write(path, tone(seconds, rate, channels), rate, format=fmt, subtype=subtype)
    expected = math.ceil(seconds * 24_000 / F)
    from_path = codec.encode_file(path)
    assert len(from_path) == expected
    assert all(len(f) == 7 and all(0 <= c < 4096 for c in f) for f in from_path)
    assert codec.encode_file(path.read_bytes()) == from_path


def test_encode_array_accepts_int_pcm_like_float(codec: SnacCodec) -> None:
    x = tone(0.2, 22_050, 1)[:, 0]
    as_int = np.round(x * 32767).astype(np.int16)
    frames = codec.encode_array(as_int, 22_050)
    assert len(frames) == math.ceil(0.2 * 24_000 / F)
    assert frames == codec.encode_array(as_int.astype(np.float32) / 32768, 22_050)


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("source", "limits", "message"),
    [
        (b"RIFF\x00\x00garbage" * 20, {}, "not a readable audio file"),
        (b"", {}, "empty"),
        ("text-file", {}, "not a readable audio file"),
        ("missing-file", {}, "does not exist"),
        (12345, {}, "not int"),
        ("zero-length-wav", {}, "no samples"),
        ("long-wav", {"max_seconds": 1.0}, "limit is 1 s"),
        ("long-wav", {"max_bytes": 1000}, "limit is 1000 bytes"),
    ],
)
def test_bad_audio_is_audio_format_error(
    codec: SnacCodec, tmp_path: Path, source, limits: dict, message: str
) -> None:
    if source == "text-file":
        source = tmp_path / "notes.wav"
        source.write_text("this is not audio\n" * 50)
    elif source == "missing-file":
        source = tmp_path / "nope.wav"
    elif source == "zero-length-wav":
        source = _wav_bytes(np.zeros((0, 1), dtype=np.float32), 16_000)
    elif source == "long-wav":
        source = _wav_bytes(np.zeros((16_000 * 3, 1), dtype=np.float32), 16_000)
    with pytest.raises(AudioFormatError, match=message) as info:
        codec.encode_file(source, **limits)
    assert info.value.code == "bad_audio"


@pytest.mark.parametrize(
    ("samples", "rate"),
    [
        (np.zeros(0, dtype=np.float32), 24_000),
        (np.full(100, np.nan, dtype=np.float32), 24_000),
        (np.zeros((10, 2, 2), dtype=np.float32), 24_000),
        (np.zeros(100, dtype=np.float32), 0),
        (np.zeros(24_000 * 31, dtype=np.float32), 24_000),
    ],
    ids=["empty", "nan", "3d", "rate0", "too-long"],
)
def test_bad_arrays_are_audio_format_error(codec: SnacCodec, samples, rate) -> None:
    with pytest.raises(AudioFormatError):
        codec.encode_array(samples, rate)


# ------------------------------------------------------------- clone references (issue 22)


def _pcm16(samples: np.ndarray) -> bytes:
    return np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def test_read_reference_accepts_a_voice_clip() -> None:
    clip = tone(1.5, 16_000, 2)
    samples, rate = read_reference(_wav_bytes(clip, 16_000), "wav")
    assert rate == 16_000 and samples.shape == clip.shape
    samples, rate = read_reference(_pcm16(clip[:, 0]), "pcm_s16le", 16_000)
    assert rate == 16_000 and samples.shape == (clip.shape[0], 1)
    assert np.allclose(samples[:, 0], clip[:, 0], atol=1e-4)


def _truncated_wav() -> bytes:
    data = _wav_bytes(tone(2.0, 16_000, 1), 16_000)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "audio_format", "rate", "message"),
    [
        (_truncated_wav(), "wav", None, "WAV is truncated: its header declares 64000 bytes"),
        (_wav_bytes(tone(2.0, 16_000, 1)[:1], 16_000), "wav", None, "0 ms long; at least 1 s"),
        (_wav_bytes(tone(0.9, 16_000, 1), 16_000), "wav", None, "900 ms long"),
        (_wav_bytes(np.zeros((32_000, 1), np.float32), 16_000), "wav", None, "digital silence"),
        (_pcm16(np.full(32_000, 1e-4)), "pcm_s16le", 16_000, r"silent \(-8\d dBFS"),
        (_pcm16(tone(2.0, 16_000, 1)[:, 0]) + b"\x00", "pcm_s16le", 16_000, "whole 2-byte"),
        (_pcm16(tone(2.0, 16_000, 1)[:, 0]), "pcm_s16le", None, "needs a sample rate"),
        (_pcm16(tone(2.0, 8_000, 1)[:, 0]), "pcm_s16le", 8_000, None),  # passes
    ],
    ids=["truncated", "one-sample", "short", "silence", "near-silence", "odd", "no-rate", "ok"],
)
def test_read_reference_says_what_is_wrong(
    data: bytes, audio_format: str, rate: int | None, message: str | None
) -> None:
    if message is None:
        read_reference(data, audio_format, rate)
        return
    with pytest.raises(AudioFormatError, match=message) as info:
        read_reference(data, audio_format, rate)
    assert info.value.code == "bad_audio"


def test_a_wav_with_chunks_after_its_samples_is_not_truncated() -> None:
    data = _wav_bytes(tone(1.2, 16_000, 1), 16_000)
    tail = b"LIST" + (4).to_bytes(4, "little") + b"INFO"
    samples, _ = read_reference(data + tail, "wav")
    assert samples.shape[0] == round(1.2 * 16_000)


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
def test_auto_codec_precision_is_bf16_only_with_bf16_hardware(
    monkeypatch: pytest.MonkeyPatch, amx: bool
) -> None:
    from voxlane.server import snac_stream

    # Without AMX, bf16 products are slower than float32 (architecture.md): auto must not pick them.
    monkeypatch.setattr(snac_stream, "bf16_supported", lambda device="cpu": amx)
    assert resolve_codec_precision("auto") == ("bfloat16" if amx else "float32")
    assert resolve_codec_precision("float32") == "float32"
    assert resolve_codec_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="auto"):
        resolve_codec_precision("float16")
