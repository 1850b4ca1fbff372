"""Fixtures of the client SDK tests: a real voxlane server on loopback, on demo weights.

The shared ``speech_service`` (tests/conftest.py) is a real engine + codec. Each test gets
its own :class:`VoxlaneServer` on 127.0.0.1 port 0 through ``start_server``; turns stay short
through ``max_frames`` on the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from voxlane.protocol import SamplingParams, SessionConfig

KEY = "sdk-test-key"
MAX_FRAMES = 3
"""Audio frames per text segment in the tests (3 x 85 ms): short turns, quick tests."""

SHORT_TURNS = SessionConfig(sampling=SamplingParams(max_frames=MAX_FRAMES, seed=1))
"""The servers' default session configuration in these tests."""


@pytest.fixture
async def start_server(speech_service: Any) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``server = await start_server(**ServerConfig fields)``; ``server.url`` is its URL.

    Auth is on with :data:`KEY` unless overridden, and sessions start with
    :data:`SHORT_TURNS` (so clients that never configure, the examples say, stay quick);
    every server is closed after the test.
    """
    from voxlane.server.app import ServerConfig, VoxlaneServer

    servers: list[Any] = []

    async def start(**overrides: Any) -> Any:
        fields: dict[str, Any] = {
            "port": 0,
            "api_keys": (KEY,),
            "default_config": SHORT_TURNS,
            **overrides,
        }
        server = VoxlaneServer(speech_service, ServerConfig(**fields))
        await server.start()
        server.url = f"ws://127.0.0.1:{server.port}"
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
    # The client must not leave tasks behind (reader, text feeders) once its session is closed.
    for _ in range(100):
        stray = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not stray:
            break
        await asyncio.sleep(0.02)
    assert stray == [], f"stray asyncio tasks: {stray}"


@pytest.fixture
async def server(start_server: Callable[..., Awaitable[Any]]) -> Any:
    """A default server (auth with :data:`KEY`)."""
    return await start_server()


@pytest.fixture
async def session(server: Any) -> AsyncIterator[Any]:
    """A connected :class:`voxlane.Session` with short, seeded turns."""
    import voxlane

    async with voxlane.connect(server.url, api_key=KEY) as session:
        await session.configure(max_frames=MAX_FRAMES, seed=1)
        yield session
