"""Audio files: write a turn's audio to WAV, read reference audio. Needs the ``audio`` extra.

soundfile is imported when a function runs, never when ``voxlane`` is imported.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxlane.client import AudioChunk

if TYPE_CHECKING:
    import numpy as np

__all__ = ["WavWriter", "read_audio", "save_wav", "write_wav"]


def _soundfile() -> Any:
    try:
        import soundfile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading and writing audio files needs soundfile: pip install 'voxlane[audio]'"
        ) from exc
    return soundfile


def _subtype(sample_format: str) -> str:
    return "PCM_16" if sample_format == "pcm_s16le" else "FLOAT"


class WavWriter:
    """Write audio chunks to a mono WAV file as they arrive.

    The file's rate and sample format are taken from the first chunk unless given
    (``pcm_s16le`` is written as 16-bit PCM, ``pcm_f32le`` as 32-bit float)::

        with WavWriter("out.wav") as wav:
            async for chunk in turn.audio():
                wav.write(chunk)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_rate: int | None = None,
        *,
        sample_format: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.sample_format = sample_format
        self.samples_written = 0
        self._file: Any = None

    def write(self, audio: AudioChunk | np.ndarray) -> None:
        """Append a chunk (or an int16/float32 array at the writer's rate)."""
        if isinstance(audio, AudioChunk):
            if self.sample_rate is None:
                self.sample_rate = audio.sample_rate
            elif audio.sample_rate != self.sample_rate:
                from voxlane.errors import AudioFormatError

                raise AudioFormatError(
                    f"chunk at {audio.sample_rate} Hz written to a {self.sample_rate} Hz WAV"
                )
            self.sample_format = self.sample_format or audio.sample_format
            samples = audio.samples
        else:
            samples = audio
            if self.sample_format is None:
                self.sample_format = "pcm_s16le" if samples.dtype.kind in "iu" else "pcm_f32le"
        if self._file is None:
            if self.sample_rate is None:
                raise ValueError("WavWriter needs a sample_rate to write a plain array")
            self._file = _soundfile().SoundFile(
                self.path,
                "w",
                samplerate=self.sample_rate,
                channels=1,
                subtype=_subtype(self.sample_format),
                format="WAV",
            )
        self._file.write(samples)
        self.samples_written += len(samples)

    @property
    def duration_s(self) -> float:
        """Seconds of audio written so far."""
        return self.samples_written / self.sample_rate if self.sample_rate else 0.0

    def close(self) -> None:
        """Finish the file (an empty WAV is written if nothing came, given a rate)."""
        if self._file is None and self.sample_rate is not None:
            import numpy as np

            self.write(np.zeros(0, np.int16))
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_wav(path: str | os.PathLike[str], audio: np.ndarray, sample_rate: int) -> Path:
    """Write a mono array (int16 -> 16-bit PCM, float -> 32-bit float) to a WAV file."""
    with WavWriter(path, sample_rate) as wav:
        wav.write(audio)
    return wav.path


async def save_wav(
    path: str | os.PathLike[str], events: AsyncIterable[Any], sample_rate: int | None = None
) -> WavWriter:
    """Write every audio chunk of ``events`` (a :class:`~voxlane.Turn`, say) to a WAV file.

    Other events (marks) are skipped. Returns the closed writer (``samples_written``,
    ``duration_s``).
    """
    with WavWriter(path, sample_rate) as wav:
        async for event in events:
            if isinstance(event, AudioChunk):
                wav.write(event)
    return wav


def read_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read any file soundfile supports as mono float32; returns ``(samples, rate)``."""
    samples, rate = _soundfile().read(str(path), dtype="float32", always_2d=True)
    return samples.mean(axis=1), int(rate)
