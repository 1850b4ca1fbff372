"""Fixtures of the server tests.

The shared ``speech_service`` (tests/conftest.py) is a real engine + codec. Servers are
real :class:`VoxlaneServer` instances on a loopback port 0, one or more per test; their
teardown checks that nothing leaked (engine sessions and requests, asyncio tasks, threads).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets

from voxlane.protocol import SessionReady, TurnDone
from voxlane.session_protocol import AudioChunk, ClientSession

KEY = "test-key"


@pytest.fixture(scope="session")
def baseline_threads(speech_service: Any) -> set[threading.Thread]:
    return set(threading.enumerate())


async def wait_engine_idle(service: Any, timeout: float = 10.0) -> None:
    """Wait until the engine holds no session and no request (closes are asynchronous)."""
    core = service.engine._core
    deadline = time.monotonic() + timeout
    while core.sessions or core.requests:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"engine still holds sessions {list(core.sessions)} / requests "
                f"{list(core.requests)}"
            )
        await asyncio.sleep(0.01)


async def assert_nothing_leaked(service: Any, baseline: set[threading.Thread]) -> None:
    """No engine session/request, no asyncio task but the caller, no new thread."""
    await wait_engine_idle(service)
    for _ in range(50):  # let closing transports and tasks run their last callbacks
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not others:
            break
        await asyncio.sleep(0.02)
    assert others == [], f"stray asyncio tasks: {others}"
    # asyncio's default executor (getaddrinfo while binding) is the event loop's own.
    extra = [
        t
        for t in set(threading.enumerate()) - baseline
        if t.is_alive() and not t.name.startswith("asyncio_")
    ]
    assert extra == [], f"stray threads: {extra}"


@pytest.fixture
async def start_server(
    speech_service: Any, baseline_threads: set[threading.Thread]
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await start_server(**ServerConfig fields)``: a running server on 127.0.0.1:0.

    Auth is on with :data:`KEY` unless overridden. Teardown closes every server and checks
    that nothing leaked.
    """
    from voxlane.server.app import ServerConfig, VoxlaneServer

    servers: list[VoxlaneServer] = []

    async def start(**overrides: Any) -> VoxlaneServer:
        fields: dict[str, Any] = {"port": 0, "api_keys": (KEY,)}
        fields.update(overrides)
        server = VoxlaneServer(speech_service, ServerConfig(**fields))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
    await assert_nothing_leaked(speech_service, baseline_threads)


@dataclass
class TurnResult:
    """Everything one turn produced, in arrival order."""

    turn_id: str
    events: list[Any] = field(default_factory=list)  # parsed messages and AudioChunks

    @property
    def audio(self) -> list[AudioChunk]:
        return [e for e in self.events if isinstance(e, AudioChunk)]

    @property
    def marks(self) -> list[Any]:
        return [e for e in self.events if getattr(e, "type", None) == "turn.mark"]

    @property
    def done(self) -> TurnDone:
        last = self.events[-1]
        assert isinstance(last, TurnDone), last
        return last

    @property
    def samples(self) -> int:
        return sum(a.num_samples for a in self.audio)


class Client:
    """A raw protocol client: JSON out, parsed messages in (ClientSession checks frame
    continuity: a gap in sequence or sample offset raises)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.session = ClientSession()
        self.ready: SessionReady | None = None

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 30.0) -> Any:
        """The next message: a server message model, or an AudioChunk for binary frames."""
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(data, bytes):
            return self.session.receive_bytes(data)
        return self.session.receive_text(data)

    async def expect(self, kind: str, timeout: float = 30.0) -> Any:
        """The next message, which must be of type ``kind``."""
        message = await self.recv(timeout)
        assert getattr(message, "type", None) == kind, f"expected {kind}, got {message!r}"
        return message

    async def collect(self, turn_id: str, timeout: float = 60.0) -> TurnResult:
        """Everything up to and including ``turn.done`` of ``turn_id``."""
        result = TurnResult(turn_id)
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.1, deadline - time.monotonic()))
            result.events.append(message)
            if isinstance(message, TurnDone) and message.turn_id == turn_id:
                return result

    async def speak(self, turn_id: str, text: str, **start: Any) -> TurnResult:
        """One-shot turn: start with the whole text and end; returns the turn's messages."""
        await self.send(type="turn.start", turn_id=turn_id, text=text, end=True, **start)
        return await self.collect(turn_id)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    """``async with connect(server, **kwargs) as client``; ``token=None`` sends no key."""
    import contextlib

    @contextlib.asynccontextmanager
    async def open_client(
        server: Any, *, token: str | None = KEY, path: str = "/v1/ws", **kwargs: Any
    ) -> AsyncIterator[Client]:
        url = f"ws://127.0.0.1:{server.port}{path}"
        if token is not None:
            url += f"?token={token}"
        async with websockets.connect(url, **kwargs) as ws:
            client = Client(ws)
            client.ready = await client.expect("session.ready")
            yield client

    yield open_client
