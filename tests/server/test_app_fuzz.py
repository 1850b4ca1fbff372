"""Protocol fuzzer over a real socket (issue 22): hypothesis sends a real server (loopback, the
tiny demo engine) short bursts of anything a client could send (fuzzed and valid messages,
raw text, deep nesting, lone surrogates, stray binary frames, voice.clone with random audio).

Whatever arrives, the server answers with typed ``error`` messages of client-side codes, never
closes with 1011 (only 1008 after too many errors or 1009 for a message too large, each
announced by a fatal ``error``), and the session (or a new one, if it was closed) still speaks
a valid turn to its end. The number of examples is bounded (each one is a WebSocket session).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from voxlane.protocol import ErrorMessage, Limits, TurnDone, TurnStarted

from ..protocol_fuzz import (
    CLIENT_CODES,
    any_text,
    deep_json,
    json_value,
    shaped_message,
    valid_messages,
)
from .conftest import Client

SENTINEL = "zz-sentinel"  # turn.cancel of a turn never opened: its error ends a burst
TEXT = "Hello there, how are you today?"


@st.composite
def clone_with_audio(draw: st.DrawFn) -> list[str | bytes]:
    """voice.clone and the binary that follows, of the announced length or not."""
    audio = draw(st.binary(min_size=0, max_size=2048))
    announced = draw(st.sampled_from([len(audio), len(audio) + 1, 0]))
    fmt = draw(st.sampled_from(["wav", "pcm_s16le"]))
    message = {"type": "voice.clone", "request_id": "r1", "transcript": "Hi there."}
    message |= {"audio_bytes": announced, "audio_format": fmt, "sample_rate": 16000}
    return [json.dumps(message), audio]


# A whole turn whose text holds a lone surrogate (as a JSON escape): refused with a typed
# error, or spoken; the marks that echo its text must still be sendable.
surrogate_turn = st.builds(
    lambda before, code: json.dumps(
        {"type": "turn.start", "text": f"{before}{chr(code)} and more.", "end": True}
    ),
    st.sampled_from(["Hello ", "", "Well, "]),
    st.integers(0xD800, 0xDFFF),
)

items = st.one_of(
    surrogate_turn.map(lambda m: [m]),
    valid_messages.map(lambda m: [m]),
    valid_messages.map(lambda m: [m]),
    shaped_message().map(lambda m: [m]),
    json_value.map(lambda v: [json.dumps(v)]),
    any_text.map(lambda s: [s]),
    deep_json().map(lambda s: [s]),
    st.binary(max_size=64).map(lambda b: [b]),
    clone_with_audio(),
)
bursts = st.lists(items, min_size=1, max_size=6).map(lambda xs: [x for x in xs for x in x])


async def send(client: Client, item: str | bytes) -> None:
    if isinstance(item, str):
        try:
            item.encode()
        except UnicodeEncodeError:
            # websockets sends text as UTF-8, which has no lone surrogates: send them the way
            # JSON can carry them, as "\udxxx" escapes (json.loads gives them back).
            try:
                item = json.dumps(json.loads(item))
            except ValueError:
                item = json.dumps(item)
    await client.ws.send(item)


async def read_until_sentinel(client: Client, log: dict[str, Any]) -> bool:
    """Read the burst's replies; False if the server closed the session."""
    try:
        while True:
            message = await client.recv(timeout=60)
            if isinstance(message, ErrorMessage):
                log["errors"].append(message)
                if message.turn_id == SENTINEL:
                    return True
            elif isinstance(message, TurnStarted):
                log["open"].add(message.turn_id)
            elif isinstance(message, TurnDone):
                log["open"].discard(message.turn_id)
    except ConnectionClosed:
        return False


async def finish_open_turns(client: Client, log: dict[str, Any]) -> None:
    """Cancel every turn still open, then read until each is done and every reply is in (a
    turn may finish on its own meanwhile: its cancel is then answered with an error)."""
    for turn_id in list(log["open"]):
        await client.send(type="turn.cancel", turn_id=turn_id)
    await client.send(type="turn.cancel", turn_id=SENTINEL)
    replied = False
    while log["open"] or not replied:
        message = await client.recv(timeout=60)
        if isinstance(message, TurnDone):
            log["open"].discard(message.turn_id)
        elif isinstance(message, ErrorMessage):
            log["errors"].append(message)
            replied |= message.turn_id == SENTINEL


async def speaks(client: Client, turn_id: str) -> None:
    await client.send(type="session.configure", sampling={"max_frames": 3, "seed": 1})
    result = await client.speak(turn_id, TEXT)
    errors = [e for e in result.events if isinstance(e, ErrorMessage) and e.request_id is None]
    assert errors == [] and result.done.reason == "completed", result.events


@settings(
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(burst=bursts)
async def test_fuzzed_input_over_the_socket_never_breaks_the_server(
    start_server: Any, connect: Any, burst: list[str | bytes]
) -> None:
    server = await start_server(limits=Limits(max_turn_chars=300, max_errors=16))
    log: dict[str, Any] = {"errors": [], "open": set()}
    async with connect(server) as client:
        await client.send(type="session.configure", sampling={"max_frames": 3, "seed": 1})
        await client.expect("session.configured")
        try:
            for item in burst:
                await send(client, item)
            await client.send(type="turn.cancel", turn_id=SENTINEL)
        except ConnectionClosed:
            pass
        alive = await read_until_sentinel(client, log)
        if alive:
            await finish_open_turns(client, log)
            await speaks(client, "zz-after")
        else:
            assert client.ws.close_code in (1008, 1009), client.ws.close_code
            assert any(e.fatal for e in log["errors"]), "closed without a fatal error"
    codes = {e.code for e in log["errors"]}
    assert codes <= CLIENT_CODES, f"server-side errors for client input: {codes - CLIENT_CODES}"
    if not alive:
        async with connect(server) as client:  # the server itself is fine
            await speaks(client, "zz-new")
