"""Playback: the jitter buffer alone, then the Player on a real PortAudio device.

The device is a PulseAudio null sink started by the ``null_sink`` fixture (Debian packages
``pulseaudio pulseaudio-utils libasound2-plugins libportaudio2``); what the player sends to
it is recorded from the sink's monitor with ``parec`` and checked. Without those packages
the device tests are skipped with that reason; the buffer tests always run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import voxlane
from voxlane.playback import JitterBuffer, Player

from .conftest import KEY, MAX_FRAMES

RATE = 24000

# ------------------------------------------------------------------- jitter buffer


def ramp(start: int, n: int) -> np.ndarray:
    """Distinct non-zero samples: order and loss are visible in the output."""
    return (np.arange(start, start + n, dtype=np.float32) + 1) / 1e6


def read(buffer: JitterBuffer, n: int) -> tuple[np.ndarray, int]:
    out = np.full(n, np.nan, np.float32)
    got = buffer.read(out)
    assert not np.isnan(out).any(), "read must fill the whole block"
    return out, got


def test_buffer_waits_for_the_lead() -> None:
    buffer = JitterBuffer(lead_samples=100)
    buffer.push(ramp(0, 60))
    out, got = read(buffer, 10)
    assert got == 0 and not out.any() and not buffer.playing
    buffer.push(ramp(60, 40))  # 100 buffered: the lead is reached
    out, got = read(buffer, 10)
    assert got == 10 and buffer.playing
    np.testing.assert_array_equal(out, ramp(0, 10))
    assert buffer.buffered == 90 and buffer.played == 10 and buffer.underruns == 0


def test_buffer_plays_a_short_stream_once_finished() -> None:
    buffer = JitterBuffer(lead_samples=1000)
    buffer.push(ramp(0, 30))
    assert read(buffer, 16)[1] == 0  # below the lead: silence
    buffer.finish()
    out, got = read(buffer, 16)
    assert got == 16
    out, got = read(buffer, 16)
    assert got == 14 and not out[14:].any()  # the tail is padded with silence
    assert buffer.drained and buffer.underruns == 0  # the end of a stream is no underrun
    assert buffer.played == 30


def test_buffer_counts_underruns_and_rebuffers() -> None:
    buffer = JitterBuffer(lead_samples=20)
    buffer.push(ramp(0, 25))
    assert read(buffer, 15)[1] == 15
    out, got = read(buffer, 15)  # only 10 left and the input is not finished
    assert got == 10 and buffer.underruns == 1 and not buffer.playing
    np.testing.assert_array_equal(out[:10], ramp(15, 10))
    buffer.push(ramp(25, 10))  # below the lead again: wait rather than stutter
    assert read(buffer, 5)[1] == 0
    buffer.push(ramp(35, 10))
    out, got = read(buffer, 20)
    assert got == 20 and buffer.underruns == 1
    np.testing.assert_array_equal(out, ramp(25, 20))


def test_buffer_running_dry_exactly_is_an_underrun_on_the_next_read() -> None:
    buffer = JitterBuffer(lead_samples=0)
    buffer.push(ramp(0, 10))
    assert read(buffer, 10)[1] == 10 and buffer.underruns == 0
    assert read(buffer, 10)[1] == 0 and buffer.underruns == 1


def test_buffer_clear_drops_everything_at_once() -> None:
    buffer = JitterBuffer(lead_samples=10)
    buffer.push(ramp(0, 500))
    read(buffer, 100)
    assert buffer.clear() == 400
    out, got = read(buffer, 50)
    assert got == 0 and not out.any() and buffer.drained and buffer.underruns == 0
    buffer.push(ramp(0, 5))  # a new stream: waits for the lead again
    assert read(buffer, 5)[1] == 0


@given(
    chunks=st.lists(st.integers(1, 300), min_size=1, max_size=20),
    reads=st.lists(st.integers(1, 257), min_size=1, max_size=10),
    lead=st.integers(0, 600),
)
def test_buffer_output_is_the_input_in_order(chunks: list[int], reads: list[int], lead: int):
    buffer = JitterBuffer(lead_samples=lead)
    total = sum(chunks)
    start = 0
    for n in chunks:
        buffer.push(ramp(start, n))
        start += n
    buffer.finish()
    played: list[np.ndarray] = []
    i = 0
    while not buffer.drained:
        out, got = read(buffer, reads[i % len(reads)])
        assert not out[got:].any()
        played.append(out[:got])
        i += 1
    np.testing.assert_array_equal(np.concatenate(played), ramp(0, total))
    assert buffer.played == total and buffer.underruns == 0


def test_buffer_between_threads_keeps_every_sample_in_order() -> None:
    buffer = JitterBuffer(lead_samples=200)
    out_parts: list[np.ndarray] = []

    def consume() -> None:  # the audio callback's side
        block = np.empty(128, np.float32)
        while not buffer.drained:
            got = buffer.read(block)
            out_parts.append(block[:got].copy())
            if not got:
                time.sleep(0.0005)

    consumer = threading.Thread(target=consume)
    consumer.start()
    sent = 0
    for n in np.random.default_rng(0).integers(1, 1000, size=100):
        buffer.push(ramp(sent, int(n)))
        sent += int(n)
        time.sleep(0)
    buffer.finish()
    consumer.join(30)
    np.testing.assert_array_equal(np.concatenate(out_parts), ramp(0, sent))
    assert buffer.played == sent


def test_player_rejects_a_chunk_at_another_rate() -> None:
    chunk = voxlane.AudioChunk("t", 0, 0, 16000, "pcm_s16le", b"\0\0" * 320)
    with pytest.raises(voxlane.AudioFormatError, match="16000 Hz"):
        Player(24000).feed(chunk)  # checked before any device is opened


# --------------------------------------------------------------- a real device

PULSE_PACKAGES = "pulseaudio pulseaudio-utils libasound2-plugins libportaudio2"


@dataclass
class NullSink:
    device: int
    sink: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def null_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NullSink]:
    """A private PulseAudio daemon with a null sink, as the default PortAudio output."""
    missing = [b for b in ("pulseaudio", "parec") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)}: apt-get install {PULSE_PACKAGES}")
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:
        pytest.skip(f"sounddevice/PortAudio unavailable ({exc}): pip install sounddevice")
    runtime = tmp_path_factory.mktemp("pulse")
    sink = "voxlane_test"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    subprocess.run(
        [
            "pulseaudio",
            "--daemonize=yes",
            "--exit-idle-time=-1",
            "-n",
            f"--load=module-null-sink sink_name={sink}",
            "--load=module-native-protocol-unix",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    socket = runtime / "pulse" / "native"
    deadline = time.monotonic() + 10
    while not socket.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    env |= {"PULSE_SERVER": f"unix:{socket}", "PULSE_SINK": sink}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("XDG_RUNTIME_DIR", "PULSE_SERVER", "PULSE_SINK"):
            mp.setenv(key, env[key])
        sd._terminate()  # PortAudio lists devices once: list them again with the daemon up
        sd._initialize()
        try:
            names = [d["name"] for d in sd.query_devices()]
            if "pulse" not in names:
                pytest.skip(f"PortAudio sees no 'pulse' device ({names}): install {PULSE_PACKAGES}")
            yield NullSink(names.index("pulse"), sink, env)
        finally:
            subprocess.run(["pulseaudio", "--kill"], env=env, check=False)
            sd._terminate()
            sd._initialize()


@contextlib.contextmanager
def recording(sink: NullSink, path: Path) -> Iterator[list[np.ndarray]]:
    """Record the sink's monitor while the block runs; the list gets the samples after."""
    result: list[np.ndarray] = []
    with path.open("wb") as f:
        parec = subprocess.Popen(
            [
                "parec",
                "-d",
                f"{sink.sink}.monitor",
                "--format=float32le",
                f"--rate={RATE}",
                "--channels=1",
                "--raw",
                "--latency-msec=20",
            ],
            stdout=f,
            env=sink.env,
        )
        time.sleep(0.5)  # let the recorder connect before anything plays
        try:
            yield result
            time.sleep(0.3)
        finally:
            parec.terminate()
            parec.wait(10)
    result.append(np.fromfile(path, dtype="<f4"))


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)


def as_chunks(samples: np.ndarray, size: int = 960) -> list[voxlane.AudioChunk]:
    return [
        voxlane.AudioChunk(
            "t", i, start, RATE, "pcm_s16le", samples[start : start + size].tobytes()
        )
        for i, start in enumerate(range(0, len(samples), size))
    ]


def loud(samples: np.ndarray) -> int:
    return int((np.abs(samples) > 0.05).sum())


async def test_player_plays_streamed_chunks_on_a_device(null_sink: NullSink, tmp_path: Path):
    with recording(null_sink, tmp_path / "rec.raw") as rec:
        # A lead of the whole second: sound starts after the last feed (or drain), so a
        # busy machine cannot turn this into an underrun test.
        async with Player(RATE, lead_ms=1000, device=null_sink.device) as player:
            for chunk in as_chunks(tone(1.0)):
                player.feed(chunk)
            await player.drain()
            assert player.played_samples == RATE and player.underruns == 0
    heard = rec[0]
    spectrum = np.abs(np.fft.rfft(heard))
    assert np.argmax(spectrum) * RATE / len(heard) == pytest.approx(440, abs=5)
    # The whole second reached the sink: no more (nothing doubled), hardly less.
    assert 0.85 * RATE * 0.94 < loud(heard) < 1.1 * RATE


async def test_flush_drops_queued_audio_on_a_device(null_sink: NullSink, tmp_path: Path):
    with recording(null_sink, tmp_path / "rec.raw") as rec:
        async with Player(RATE, lead_ms=50, device=null_sink.device) as player:
            for chunk in as_chunks(tone(4.0)):
                player.feed(chunk)
            while player.played_samples < RATE // 4:
                await asyncio.sleep(0.01)
            dropped = player.flush()  # barge-in
            await player.drain()
            assert dropped > RATE  # seconds of queued audio were dropped, not played
            assert player.played_samples + dropped == 4 * RATE
    assert loud(rec[0]) < 4 * RATE - dropped * 0.9


async def test_play_a_turn_from_the_server(null_sink: NullSink, server: Any) -> None:
    async with voxlane.connect(server.url, api_key=KEY) as session:
        await session.configure(max_frames=MAX_FRAMES, seed=1)
        turn = session.speak("Hello there. How are you?")
        player = await voxlane.play(turn, lead_ms=80, device=null_sink.device)
        assert turn.done.reason == "completed"
        assert player.played_samples == turn.metrics.samples > 0


async def test_say_plays_on_the_device(null_sink: NullSink, server: Any) -> None:
    from .test_cli import run

    args = ["-m", "voxlane.cli", "say", "Hello there.", "--url", server.url, "--api-key", KEY]
    code, stdout, stderr = await run(*args, "--play", "--device", "pulse", env=null_sink.env)
    assert code == 0, stderr
    assert "first sound" in stdout and "playback lead" in stdout and "player underruns" in stdout


async def test_example_barge_in(null_sink: NullSink, server: Any) -> None:
    from .test_cli import EXAMPLES, run

    args = [str(EXAMPLES / "barge_in.py"), "--after", "0.3", "--device", "pulse"]
    code, stdout, stderr = await run(
        *args, "--url", server.url, "--api-key", KEY, env=null_sink.env
    )
    assert code == 0, stderr
    interrupted = re.search(r"interrupted after ([0-9.]+) s", stdout)
    assert interrupted is not None, stdout  # cancelled, not played to the end
    assert float(interrupted.group(1)) >= 0.3
    assert "heard (at least the start of): 'Paris is the capital" in stdout
