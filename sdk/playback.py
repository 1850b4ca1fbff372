"""Play a turn's audio on a sound device as it streams in. Needs the ``audio`` extra.

::

    async with voxlane.connect(url) as session:
        await voxlane.play(session.speak("Hello there!"))

:class:`Player` keeps a small jitter buffer between the network and the sound card: it
starts playing once ``lead_ms`` of audio is buffered (or the turn ended), counts an
*underrun* whenever the buffer runs dry mid-stream (it then waits for the lead again rather
than stutter), and :meth:`Player.flush` drops everything queued at once for barge-in.
A sounddevice ``OutputStream`` callback, on PortAudio's thread, pulls from the buffer;
:class:`JitterBuffer` is that buffer alone, thread-safe and testable without a device.

sounddevice is imported when a player starts, never when ``voxlane`` is imported.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterable
from typing import Any

import numpy as np

from voxlane.client import AudioChunk
from voxlane.errors import AudioFormatError

__all__ = ["JitterBuffer", "Player", "play"]


class JitterBuffer:
    """A thread-safe FIFO of float32 samples with a start-up lead and underrun accounting.

    The producer (the event loop) calls :meth:`push` and :meth:`finish`; the consumer (the
    audio callback) calls :meth:`read`, which always fills its output (silence where no
    audio is ready). States:

    * *waiting*: output is silence until ``lead_samples`` are buffered, or the input
      finished with anything buffered (a short turn plays without waiting for the lead).
    * *playing*: samples flow out. Running dry before :meth:`finish` is an underrun: it
      is counted and the buffer waits for the lead again. Running dry after
      :meth:`finish` is the normal end; the next :meth:`push` starts a new stream, which
      waits for the lead again.
    """

    def __init__(self, lead_samples: int) -> None:
        if lead_samples < 0:
            raise ValueError("lead_samples must be >= 0")
        self.lead_samples = lead_samples
        self._lock = threading.Lock()
        self._chunks: deque[np.ndarray] = deque()
        self._head = 0  # samples of _chunks[0] already read
        self._buffered = 0
        self._playing = False
        self._finished = False
        self.underruns = 0
        """Times the buffer ran dry while playing, before the input finished."""
        self.played = 0
        """Samples handed to the consumer so far (silence not counted)."""

    @property
    def buffered(self) -> int:
        """Samples queued and not yet read."""
        return self._buffered

    @property
    def playing(self) -> bool:
        """True between reaching the lead and running dry."""
        return self._playing

    @property
    def drained(self) -> bool:
        """True when the input finished and every sample was read (or dropped)."""
        with self._lock:
            return self._finished and self._buffered == 0

    def push(self, samples: np.ndarray) -> None:
        """Queue mono float32 samples (the array must not be modified afterwards)."""
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples, got shape {samples.shape}")
        if not len(samples):
            return
        with self._lock:
            self._chunks.append(samples)
            self._buffered += len(samples)
            self._finished = False

    def finish(self) -> None:
        """No more input for now: play out what is buffered even below the lead."""
        with self._lock:
            self._finished = True

    def clear(self) -> int:
        """Drop everything queued now (barge-in); returns the samples dropped.

        Counts as the end of the stream: the next :meth:`push` waits for the lead again.
        """
        with self._lock:
            dropped = self._buffered
            self._chunks.clear()
            self._head = 0
            self._buffered = 0
            self._playing = False
            self._finished = True
            return dropped

    def read(self, out: np.ndarray) -> int:
        """Fill ``out`` (1-D float32) with the next samples; returns how many were audio.

        The rest of ``out`` is silence. Called from the audio thread: never blocks longer
        than a copy.
        """
        n = len(out)
        with self._lock:
            if not self._playing:
                if self._buffered and (self._buffered >= self.lead_samples or self._finished):
                    self._playing = True
                else:
                    out[:] = 0.0
                    return 0
            got = 0
            while got < n and self._chunks:
                head = self._chunks[0]
                take = min(n - got, len(head) - self._head)
                out[got : got + take] = head[self._head : self._head + take]
                got += take
                self._head += take
                if self._head == len(head):
                    self._chunks.popleft()
                    self._head = 0
            out[got:] = 0.0
            self._buffered -= got
            self.played += got
            if self._buffered == 0 and (got < n or self._finished):
                if not self._finished:
                    self.underruns += 1
                self._playing = False
            return got


def _as_float32(audio: AudioChunk | np.ndarray) -> np.ndarray:
    if isinstance(audio, AudioChunk):
        return audio.to_float32()
    samples = np.asarray(audio)
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    return samples.astype(np.float32, copy=False)


def _sounddevice() -> Any:
    try:
        import sounddevice
    except ImportError as exc:
        raise ImportError("playback needs sounddevice: pip install 'voxlane[audio]'") from exc
    except OSError as exc:  # sounddevice is there, the PortAudio library is not
        raise ImportError(
            f"playback needs the PortAudio library ({exc}); on Debian/Ubuntu: "
            "apt-get install libportaudio2"
        ) from exc
    return sounddevice


class Player:
    """Plays mono audio chunks on an output device through a jitter buffer.

    ``lead_ms`` is how much audio is buffered before sound starts (and again after an
    underrun): more absorbs more network and generation jitter, less starts sooner.
    ``device`` is a sounddevice device (index or name; ``None`` for the default).
    Use it as an async context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        sample_rate: int = 24000,
        *,
        lead_ms: float = 120.0,
        device: int | str | None = None,
        blocksize_ms: float = 10.0,
        latency: str | float = "low",
    ) -> None:
        self.sample_rate = int(sample_rate)
        self.lead_ms = lead_ms
        self.device = device
        self.buffer = JitterBuffer(round(self.sample_rate * lead_ms / 1000))
        self._blocksize = max(1, round(self.sample_rate * blocksize_ms / 1000))
        self._latency = latency
        self._stream: Any = None
        self.device_underflows = 0
        """Callbacks PortAudio flagged as output underflow (the callback itself was late)."""

    @property
    def underruns(self) -> int:
        """Times the jitter buffer ran dry mid-stream (audio arrived slower than real time)."""
        return self.buffer.underruns

    @property
    def played_samples(self) -> int:
        """Samples handed to the device so far: how much of the audio was heard."""
        return self.buffer.played

    @property
    def output_latency_s(self) -> float:
        """The device's output latency reported by PortAudio (0 before :meth:`start`)."""
        return float(self._stream.latency) if self._stream is not None else 0.0

    def start(self) -> None:
        """Open and start the output stream (done by the first :meth:`feed`)."""
        if self._stream is not None:
            return
        sd = _sounddevice()
        read = self.buffer.read

        def callback(outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
            if status.output_underflow:
                self.device_underflows += 1
            read(outdata[:, 0])

        stream = sd.OutputStream(
            samplerate=self.sample_rate,
            channels=1,
            dtype="float32",
            blocksize=self._blocksize,
            latency=self._latency,
            device=self.device,
            callback=callback,
        )
        stream.start()
        self._stream = stream

    def feed(self, audio: AudioChunk | np.ndarray) -> None:
        """Queue a chunk (or int16/float32 samples at the player's rate) for playback."""
        if isinstance(audio, AudioChunk) and audio.sample_rate != self.sample_rate:
            raise AudioFormatError(
                f"a {audio.sample_rate} Hz chunk fed to a {self.sample_rate} Hz player: "
                "configure the session's sample_rate or make the player at the chunk's rate"
            )
        self.start()
        self.buffer.push(_as_float32(audio))

    async def play(self, events: AsyncIterable[Any]) -> None:
        """Play every audio chunk of ``events`` (a :class:`~voxlane.Turn`, say), then drain.

        Marks and other events are skipped. Returns when the last sample has been played;
        if the turn is cancelled its iterator ends, and with :meth:`flush` this returns at
        once.
        """
        try:
            async for event in events:
                if isinstance(event, (AudioChunk, np.ndarray)):
                    self.feed(event)
        finally:
            self.buffer.finish()
        await self.drain()

    async def drain(self) -> None:
        """Wait until everything fed has been played (call after the last :meth:`feed`)."""
        self.buffer.finish()
        if self._stream is None:
            return
        while not self.buffer.drained:
            await asyncio.sleep(0.005)
        # The last block is in the device's own buffer: let it reach the speaker.
        await asyncio.sleep(self.output_latency_s)

    def flush(self) -> int:
        """Barge-in: drop all queued audio now; returns the samples dropped.

        What the device already holds (``output_latency_s``, a few ms) still plays.
        """
        return self.buffer.clear()

    def close(self) -> None:
        """Stop at once (queued audio is dropped) and release the device."""
        self.buffer.clear()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()
            stream.close()

    async def __aenter__(self) -> Player:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def play(
    events: AsyncIterable[Any], *, lead_ms: float = 120.0, device: int | str | None = None
) -> Player:
    """Play a turn (or any iterator of audio chunks) on the default device and wait for it.

    The player is made at the first chunk's sample rate and closed at the end; it is
    returned so ``underruns`` and ``played_samples`` can be read.
    """
    player: Player | None = None
    try:
        async for event in events:
            if isinstance(event, AudioChunk):
                if player is None:
                    player = Player(event.sample_rate, lead_ms=lead_ms, device=device)
                player.feed(event)
        if player is not None:
            await player.drain()
    finally:
        if player is not None:
            player.close()
    return player if player is not None else Player(lead_ms=lead_ms, device=device)
