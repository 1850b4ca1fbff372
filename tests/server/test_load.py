"""Load and fault tests of the WebSocket server (issue 22), bounded for CI.

A real :class:`VoxlaneServer` on loopback with the shared tiny demo engine (the
``start_server`` fixture, whose teardown checks that no engine session, task or thread
leaked), driven by many raw protocol clients at once: concurrent one-turn sessions, clients
that vanish mid-turn, cancel storms, and a client that stops reading beside a normal one.
Nothing here is timed: the assertions are what a user would notice (a turn that does not
complete, an error, audio after a cancel, a refused turn), plus the server's own books.
``python -m bench load`` measures the same scenarios' speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import socket
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from voxlane.protocol import CloseCode, ErrorMessage, TurnCancelled, TurnDone
from voxlane.session_protocol import AudioChunk

from .conftest import Client, wait_engine_idle

TEXT = "Hello there, how are you today? I am fine, thanks."
LONG = {"max_frames": 300, "seed": 3}  # far longer than any test waits for


async def configure(client: Client, **fields: Any) -> None:
    await client.send(type="session.configure", **fields)
    await client.expect("session.configured")


def metric(server: Any, line_start: str) -> float:
    """The value of the first ``/metrics`` sample line starting with ``line_start``."""
    for line in server.metrics.render().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Poll ``condition()`` until true (a bound on a hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def first_audio(client: Client) -> None:
    """Read until the first audio frame of the running turn (which must not end first)."""
    while True:
        message = await client.recv()
        if isinstance(message, AudioChunk):
            return
        assert not isinstance(message, TurnDone), f"the turn ended without audio: {message!r}"


async def assert_server_books_clean(server: Any) -> None:
    """No connection, open session gauge, engine session/request or SNAC stream left."""
    service = server.service
    await wait_for(lambda: not server._connections, "every connection handler returned")
    assert metric(server, "voxlane_sessions ") == 0
    await wait_engine_idle(service)
    assert service.engine.active_sessions == 0, "an engine session (its KV cache) leaked"
    gc.collect()  # dropped decoders release their streams in the codec process
    program = service.snac_program
    if hasattr(program, "live_streams"):
        streams = await asyncio.get_running_loop().run_in_executor(
            service.codec_executor, program.live_streams
        )
        assert streams == 0, f"the SNAC process still holds {streams} streams"


async def test_concurrent_one_turn_sessions_all_complete(start_server: Any, connect: Any) -> None:
    """N sessions at once, one turn each: every turn completes with audio, no error."""
    n = 20  # under the default max_sessions (32); bench load runs 50
    server = await start_server()

    async def one(k: int) -> Any:
        async with connect(server) as client:
            await configure(client, sampling={"max_frames": 4, "seed": k})
            return await client.speak(f"t{k}", TEXT)

    results = await asyncio.gather(*(one(k) for k in range(n)))
    for result in results:
        errors = [e for e in result.events if isinstance(e, ErrorMessage)]
        assert errors == [], errors
        assert result.done.reason == "completed" and result.audio
    assert metric(server, 'voxlane_turns_total{reason="completed"}') == n
    await assert_server_books_clean(server)


async def test_same_seed_gives_the_same_samples_over_the_socket(
    start_server: Any, connect: Any
) -> None:
    """A turn's audio is a function of its text, voice and seed: on a new session, as the
    next turn of a session, and beside other streams."""
    import numpy as np

    server = await start_server()
    sampling = {"max_frames": 12, "seed": 1234, "temperature": 0.9}

    async def speak(client: Client, turn_id: str, seed: int = 1234) -> np.ndarray:
        await configure(client, sampling={**sampling, "seed": seed})
        result = await client.speak(turn_id, TEXT)
        assert result.done.reason == "completed"
        return np.frombuffer(b"".join(a.pcm for a in result.audio), "<i2")

    async def fresh(turn_id: str, seed: int = 1234) -> np.ndarray:
        async with connect(server) as client:
            return await speak(client, turn_id, seed)

    async with connect(server) as client:
        first = await speak(client, "one")
        again = await speak(client, "two")  # the same session's next turn
    assert first.size and np.array_equal(first, again)
    assert np.array_equal(await fresh("new"), first)
    # Three at once, two with the seed: other streams in the batch change nothing but the
    # rounding of SNAC's batched products (the same frames; at most 1 LSB of int16).
    a, b, c = await asyncio.gather(fresh("a"), fresh("b", seed=99), fresh("c"))
    for same in (a, c):
        assert same.shape == first.shape
        assert np.abs(same.astype(int) - first).max() <= 1
    assert not np.array_equal(b, first)


async def test_abrupt_disconnects_mid_turn_leak_nothing(start_server: Any, connect: Any) -> None:
    """Clients that vanish (no close handshake) at any point of a turn cost nothing after."""
    server = await start_server()
    async with contextlib.AsyncExitStack() as stack:
        clients: list[Client] = []
        for k in range(6):
            client = await stack.enter_async_context(connect(server))
            await configure(client, sampling=LONG)
            await client.send(type="turn.start", turn_id=f"gone{k}", text=TEXT, end=True)
            clients.append(client)
        await clients[0].expect("turn.started")  # 0 vanishes before its first audio
        for client in clients[1:]:
            await first_audio(client)
        for client in clients:  # no close frame: the TCP connection just goes
            client.ws.transport.abort()
    await assert_server_books_clean(server)
    assert metric(server, 'voxlane_errors_total{code="internal_error"}') == 0
    async with connect(server) as client:  # and the server still serves
        await configure(client, sampling={"max_frames": 6, "seed": 1})
        assert (await client.speak("after", TEXT)).done.reason == "completed"


async def test_cancel_storm_across_sessions(start_server: Any, connect: Any) -> None:
    """Many cancels at every point of a turn, on several sessions at once: each is acked,
    nothing of the turn follows its ack, the engine never fails (neither the cancelled turns
    nor a bystander's ordinary ones), the sessions go on."""
    sessions, per_session = 4, 25  # 100 cancelled turns
    server = await start_server()

    async def storm(s: int) -> list[str]:
        problems: list[str] = []
        async with connect(server) as client:
            await configure(client, sampling=LONG)
            for k in range(per_session):
                turn_id = f"s{s}-{k}"
                await client.send(type="turn.start", turn_id=turn_id, text=TEXT, end=True)
                when = k % 3
                if when >= 1:
                    await client.expect("turn.started")
                if when == 2:
                    await first_audio(client)
                await client.send(type="turn.cancel", turn_id=turn_id)
                acked = False
                while True:
                    message = await client.recv()
                    if isinstance(message, ErrorMessage):
                        problems.append(f"{turn_id}: error {message.code}: {message.message}")
                    elif isinstance(message, TurnCancelled):
                        acked = True
                    elif isinstance(message, TurnDone):
                        if not acked or message.reason != "cancelled":
                            problems.append(f"{turn_id}: done {message.reason}, acked {acked}")
                        break
                    elif acked and getattr(message, "turn_id", None) == turn_id:
                        problems.append(f"{turn_id}: {message!r} after turn.cancelled")
            await configure(client, sampling={"max_frames": 6, "seed": s})
            result = await client.speak(f"s{s}-after", TEXT)
            if result.done.reason != "completed":
                problems.append(f"s{s}: the turn after the storm ended {result.done.reason}")
        return problems

    storming = asyncio.gather(*map(storm, range(sessions)))

    async def bystander() -> list[str]:
        """A session speaking ordinary turns beside the storm: its streams share the engine's
        batched steps with the ones being cancelled, and must not notice."""
        problems: list[str] = []
        async with connect(server) as client:
            await configure(client, sampling={"max_frames": 6, "seed": 9})
            k = 0
            while not storming.done() or k == 0:
                k += 1
                result = await client.speak(f"by{k}", TEXT)
                errors = [e.code for e in result.events if isinstance(e, ErrorMessage)]
                if errors or result.done.reason != "completed":
                    problems.append(f"by{k}: {result.done.reason} {errors}")
        return problems

    found = await asyncio.gather(storming, bystander())
    problems = [p for session in found[0] for p in session] + found[1]
    assert problems == []
    assert metric(server, 'voxlane_turns_total{reason="cancelled"}') == sessions * per_session
    assert metric(server, 'voxlane_errors_total{code="engine_error"}') == 0
    await assert_server_books_clean(server)


@pytest.mark.parametrize("admission", ["off", "refuse"])
async def test_a_client_that_stops_reading_does_not_hold_up_another(
    start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch, admission: str
) -> None:
    """A non-reading client beside a normal one: the normal one's turns complete (and are not
    refused by admission control, ``voxlane serve``'s default), the stuck one gets 4008."""
    server = await start_server(send_timeout_s=1.0, send_buffer_bytes=8192)
    engine = server.service.engine
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, admission=admission))
    # A small receive buffer and no client-side queueing: the server's writes back up fast.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    async with connect(server, sock=sock, max_queue=1) as stuck, connect(server) as normal:
        await configure(stuck, sample_rate=48000, sample_format="pcm_f32le", sampling=LONG)
        await stuck.send(type="turn.start", turn_id="flood", text=TEXT * 4, end=True)
        await stuck.expect("turn.started")  # and from now on it reads nothing
        await configure(normal, sampling={"max_frames": 8, "seed": 5})
        for k in range(3):
            result = await normal.speak(f"n{k}", TEXT)
            errors = [e for e in result.events if isinstance(e, ErrorMessage)]
            assert errors == [] and result.done.reason == "completed", result.events[-2:]
        await wait_for(
            lambda: metric(server, 'voxlane_errors_total{code="slow_consumer"}') > 0,
            "the server gave up on the client that stopped reading",
            timeout=60,
        )
        with pytest.raises(ConnectionClosed):
            while True:
                await stuck.recv(timeout=10)
        assert stuck.ws.close_code == CloseCode.SLOW_CONSUMER
        # The normal session is still fine after the other was dropped.
        assert (await normal.speak("last", TEXT)).done.reason == "completed"
    await assert_server_books_clean(server)
