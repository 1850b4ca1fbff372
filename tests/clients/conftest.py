"""Fixtures of the bridge tests: a real mosquitto broker and a real voxlane server on loopback.

The broker is a ``mosquitto`` process per test (it starts in milliseconds) on a fixed port, so
a test can stop and restart it. CI installs it from Debian (``apt-get install mosquitto``);
without the binary the tests skip locally and fail in CI. The voxlane server mirrors
``tests/sdk/conftest.py``: one :class:`SpeechService` (tiny random LM, demo SNAC) per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from voxlane.protocol import AudioFrame, SamplingParams, SessionConfig

KEY = "mqtt-test-key"
SHORT_TURNS = SessionConfig(sampling=SamplingParams(max_frames=3, seed=1))
"""Sessions start with 3 audio frames per text segment: short turns, quick tests."""
PREFIX = "vt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A mosquitto process on 127.0.0.1:``port`` that can be stopped and started again."""

    def __init__(self, workdir: Path, port: int, conf: str = "") -> None:
        self.port = port
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        # persistence off: a restarted broker has no retained messages, so a retained status
        # seen after a restart was published again by the bridge.
        self.conf.write_text(
            f"listener {port} 127.0.0.1\npersistence false\n"
            # As root mosquitto would switch to user mosquitto, who cannot read a private tmp.
            + ("user root\n" if os.geteuid() == 0 else "")
            + ("" if "allow_anonymous" in conf else "allow_anonymous true\n")
            + conf
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Any:
    """A running broker (``broker.url``); ``broker.stop()`` / ``broker.start()`` restart it."""
    if shutil.which("mosquitto") is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path, free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
async def start_server(speech_service: Any) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``server = await start_server(**ServerConfig fields)``; ``server.url`` is its URL."""
    from voxlane.server.app import ServerConfig, VoxlaneServer

    servers: list[Any] = []

    async def start(**overrides: Any) -> Any:
        fields = {"port": 0, "api_keys": (KEY,), "default_config": SHORT_TURNS, **overrides}
        server = VoxlaneServer(speech_service, ServerConfig(**fields))
        await server.start()
        server.url = f"ws://127.0.0.1:{server.port}"
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def server(start_server: Callable[..., Awaitable[Any]]) -> Any:
    return await start_server()


# ---------------------------------------------------------------------------- devices


@dataclass
class TurnRecord:
    """What a device saw of one turn on its events and audio topics."""

    started: dict[str, Any] | None = None
    marks: list[dict[str, Any]] = field(default_factory=list)
    frames: list[AudioFrame] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    audio_after_done: int = 0


class Device:
    """A test device: publishes says and cancels, records events and audio in arrival order."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def topic(self, kind: str) -> str:
        return f"{PREFIX}/{self.name}/{kind}"

    async def say(self, payload: str | bytes | dict[str, Any]) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        await self.client.publish(self.topic("say"), payload, qos=1)

    async def cancel(self, turn_id: str = "") -> None:
        await self.client.publish(self.topic("cancel"), turn_id, qos=1)

    async def next(self, timeout: float = 30.0) -> tuple[str, Any]:
        """The next ("event", dict) or ("audio", AudioFrame)."""
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        while True:
            kind, item = await self.next(timeout)
            if kind == "event":
                return item

    async def turn(self, timeout: float = 60.0) -> TurnRecord:
        """Collect events until a turn.done (errors before it land in ``errors``)."""
        record = TurnRecord()
        while record.done is None:
            kind, item = await self.next(timeout)
            if kind == "audio":
                record.frames.append(item)
            elif item["type"] == "turn.started":
                record.started = item
            elif item["type"] == "turn.mark":
                record.marks.append(item)
            elif item["type"] == "error":
                record.errors.append(item)
            elif item["type"] == "turn.done":
                record.done = item
        return record


async def _pump(client: Any, devices: dict[str, Device]) -> None:
    async for message in client.messages:
        _, name, kind = message.topic.value.rsplit("/", 2)
        device = devices.get(name)
        if device is None:
            continue
        if kind == "events":
            device.inbox.put_nowait(("event", json.loads(message.payload)))
        elif kind == "audio":
            device.inbox.put_nowait(("audio", AudioFrame.unpack(message.payload)))


@contextlib.asynccontextmanager
async def devices(broker: Any, *names: str) -> AsyncIterator[list[Device]]:
    """Connect test devices to ``broker``, subscribed to their events and audio topics."""
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        by_name = {name: Device(client, name) for name in names}
        for name in names:
            await client.subscribe(f"{PREFIX}/{name}/events", qos=1)
            await client.subscribe(f"{PREFIX}/{name}/audio", qos=1)
        pump = asyncio.create_task(_pump(client, by_name))
        try:
            yield list(by_name.values())
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump


async def wait_status(broker: Any, expected: str, timeout: float = 15.0) -> str:
    """Subscribe to the bridge status; return once it reads ``expected``."""
    import aiomqtt

    async def watch() -> str:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe(f"{PREFIX}/status", qos=1)
            async for message in client.messages:
                if message.payload.decode() == expected:
                    return expected
        raise AssertionError("unreachable")

    return await asyncio.wait_for(watch(), timeout)
