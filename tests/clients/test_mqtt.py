"""The MQTT bridge against a real mosquitto broker and a real voxlane server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from voxlane.clients.mqtt import (
    MqttBridge,
    MqttBridgeConfig,
    SayRequest,
    backoff_delay,
    parse_broker_url,
    parse_cancel,
    parse_say,
)
from voxlane.errors import BadMessageError, MessageTooLargeError, OutOfRangeError
from voxlane.protocol import AUDIO_HEADER_SIZE

try:
    import aiomqtt  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("aiomqtt is not installed: pip install 'voxlane[mqtt]'", allow_module_level=True)

from .conftest import KEY, PREFIX, Mosquitto, TurnRecord, devices, free_port, wait_status


@contextlib.asynccontextmanager
async def running(broker: Any, server_url: str, **overrides: Any) -> AsyncIterator[MqttBridge]:
    """A bridge serving every device under PREFIX, online before the block starts."""
    fields: dict[str, Any] = {
        "broker": broker.url,
        "server": server_url,
        "api_key": KEY,
        "prefix": PREFIX,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
        **overrides,
    }
    async with MqttBridge(MqttBridgeConfig(**fields)) as bridge:
        await asyncio.wait_for(bridge.online.wait(), 10)
        yield bridge
    assert not bridge.online.is_set() and bridge.devices == []
    # A stopped bridge leaves nothing running: device workers, publishers, sessions' readers.
    stray = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert stray == [], f"stray asyncio tasks: {stray}"


def assert_well_formed(record: TurnRecord) -> None:
    """Audio frames in order with no gap, consistent with turn.started and turn.done."""
    assert record.started is not None and record.done is not None
    assert record.frames, "no audio"
    assert [f.header.sequence for f in record.frames] == list(range(len(record.frames)))
    offset = 0
    for frame in record.frames:
        assert frame.header.turn_number == record.started["turn_number"]
        assert frame.header.sample_offset == offset
        offset += frame.num_samples
    assert offset == record.done["metrics"]["samples"]


# ---------------------------------------------------------------------- end to end


async def test_text_in_audio_chunks_out_in_order(mosquitto: Any, server: Any) -> None:
    async with running(mosquitto, server.url), devices(mosquitto, "kitchen") as (kitchen,):
        assert await wait_status(mosquitto, "online") == "online"  # retained
        await kitchen.say("Hello there. How are you today?")
        record = await kitchen.turn()
    assert record.errors == []
    assert record.started["voice"] == "tara" and record.started["sample_format"] == "pcm_s16le"
    assert record.done["reason"] == "completed"
    assert record.done["turn_id"] == record.started["turn_id"]
    assert all(m["turn_id"] == record.started["turn_id"] for m in record.marks)
    assert_well_formed(record)
    assert [m["segment"] for m in record.marks] == [0, 1]
    assert record.marks[1]["text"].startswith("How are you")
    # The audio topic carries exactly the WebSocket frame layout: header, then int16 PCM.
    assert all(len(f.pack()) == AUDIO_HEADER_SIZE + 2 * f.num_samples for f in record.frames)


async def test_json_say_sets_voice_and_turn_id_and_queues_behind_a_running_turn(
    mosquitto: Any, server: Any
) -> None:
    async with (
        running(mosquitto, server.url),
        devices(mosquitto, "robot", "kiosk") as (
            robot,
            kiosk,
        ),
    ):
        await robot.say("First one.")
        await robot.say({"text": "Second one.", "voice": "leo", "turn_id": "greet-2"})
        await kiosk.say({"text": "Meanwhile, elsewhere.", "turn_id": "k1"})
        first, second = await robot.turn(), await robot.turn()
        other = await kiosk.turn()
    # The second say waited for the first turn to end: its turn.started came after turn.done.
    assert first.done["reason"] == "completed" and first.started["voice"] == "tara"
    assert second.started["turn_id"] == "greet-2" and second.started["voice"] == "leo"
    assert (second.done["turn_id"], second.done["reason"]) == ("greet-2", "completed")
    assert second.frames[0].header.turn_number > first.frames[0].header.turn_number
    for record in (first, second, other):
        assert_well_formed(record)
    assert other.started["turn_id"] == "k1"  # devices are independent sessions


async def test_cancel_stops_the_turn_and_the_device_keeps_working(
    mosquitto: Any, server: Any
) -> None:
    long_text = " ".join(f"This is sentence number {n}." for n in range(12))
    options = {"session_options": {"max_frames": 8}}
    async with running(mosquitto, server.url, **options), devices(mosquitto, "d1") as (d1,):
        await d1.say({"text": long_text, "turn_id": "long"})
        while (await d1.next())[0] != "audio":
            pass
        await d1.cancel()
        record = await d1.turn()
        await d1.say("Still here?")
        after = await d1.turn()
        with pytest.raises(TimeoutError):
            await d1.next(timeout=0.3)  # nothing of the cancelled turn trails behind
    assert record.done["turn_id"] == "long" and record.done["reason"] == "cancelled"
    full = 12 * 8 * 2048
    assert 1 + len(record.frames) < full // 960, "the whole turn was sent"
    assert after.done["reason"] == "completed"
    assert_well_formed(after)


async def test_interrupt_replaces_the_running_turn_and_drops_queued_ones(
    mosquitto: Any, server: Any
) -> None:
    long_text = " ".join(f"This is sentence number {n}." for n in range(12))
    async with (
        running(mosquitto, server.url, session_options={"max_frames": 8}),
        devices(mosquitto, "d1") as (d1,),
    ):
        await d1.say({"text": long_text, "turn_id": "long"})
        await d1.say({"text": "Queued, then dropped.", "turn_id": "queued"})
        while (await d1.next())[0] != "audio":
            pass
        await d1.say({"text": "Urgent!", "turn_id": "urgent", "interrupt": True})
        interrupted, urgent = await d1.turn(), await d1.turn()
    assert interrupted.done["turn_id"] == "long" and interrupted.done["reason"] == "cancelled"
    assert urgent.started["turn_id"] == "urgent" and urgent.done["reason"] == "completed"


async def test_malformed_payloads_give_error_events_and_the_bridge_keeps_serving(
    mosquitto: Any, server: Any
) -> None:
    cases: list[tuple[str, bytes | str | dict[str, Any], str, str]] = [
        ("say", b"\xff\xfehello", "bad_message", "UTF-8"),
        ("say", b'{"text": "unterminated', "bad_message", "JSON"),
        ("say", {"text": "hi", "speed": 2}, "bad_message", "unknown field 'speed'"),
        ("say", {"text": 42}, "bad_message", "text"),
        ("say", "x" * 2001, "message_too_large", "2001 characters"),
        ("say", b"   ", "bad_message", "no text"),
        ("say", {"text": "hi", "voice": "not a voice!"}, "out_of_range", "voice"),
        ("cancel", b"\xff", "bad_message", "UTF-8"),
        ("cancel", b'{"turn": 1}', "bad_message", "unknown field 'turn'"),
        # Refused by the server, so reported after the ones the bridge catches itself.
        ("say", {"text": "hi", "voice": "nobody"}, "unknown_voice", "nobody"),
    ]
    async with running(mosquitto, server.url) as bridge, devices(mosquitto, "d1") as (d1,):
        for kind, payload, _, _ in cases:
            if kind == "say":
                await d1.say(payload)
            else:
                await d1.client.publish(d1.topic("cancel"), payload, qos=1)
        errors = [await d1.next_event() for _ in cases]
        await d1.say("And now something valid.")
        record = await d1.turn()
        assert bridge.online.is_set() and bridge.connections == 1
    for event, (kind, payload, code, text) in zip(errors, cases, strict=True):
        assert event["type"] == "error", (kind, payload, event)
        assert event["code"] == code and text in event["message"], (kind, payload, event)
    assert record.errors == [] and record.done["reason"] == "completed"


async def test_broker_restart_the_bridge_reconnects_and_serves_again(
    mosquitto: Any, server: Any
) -> None:
    long_text = " ".join(f"This is sentence number {n}." for n in range(12))
    async with running(mosquitto, server.url, session_options={"max_frames": 8}) as bridge:
        async with devices(mosquitto, "d1") as (d1,):
            await d1.say("Before the restart.")
            assert_well_formed(await d1.turn())
            await d1.say(long_text)
            while (await d1.next())[0] != "audio":
                pass
        mosquitto.stop()  # mid-turn: the turn is cancelled, its audio is not kept for later
        for _ in range(200):
            if not bridge.online.is_set():
                break
            await asyncio.sleep(0.02)
        assert not bridge.online.is_set()
        mosquitto.start()  # same port, and no retained messages (persistence is off)
        assert await wait_status(mosquitto, "online") == "online"
        await asyncio.wait_for(bridge.online.wait(), 10)
        assert bridge.connections == 2
        async with devices(mosquitto, "d1") as (d1,):
            await d1.say({"text": "After the restart.", "turn_id": "after"})
            record = await d1.turn()
    assert record.started["turn_id"] == "after" and record.done["reason"] == "completed"
    assert_well_formed(record)


async def test_voxlane_server_down_gives_error_events_and_retries(
    mosquitto: Any, start_server: Any
) -> None:
    port = free_port()
    server = await start_server(port=port)
    overrides = {"say_timeout_s": 30.0}
    async with running(mosquitto, server.url, **overrides), devices(mosquitto, "d1") as (d1,):
        await d1.say("The server is up.")
        assert_well_formed(await d1.turn())
        await server.close()
        await d1.say({"text": "The server went away.", "turn_id": "retry-me"})
        error = await d1.next_event()
        assert error["type"] == "error" and error["code"] == "connection_closed"
        assert error["turn_id"] == "retry-me" and "retrying in" in error["message"]
        await start_server(port=port)
        record = await d1.turn()
    assert record.started["turn_id"] == "retry-me" and record.done["reason"] == "completed"
    assert all(e["code"] == "connection_closed" for e in record.errors)
    assert_well_formed(record)


async def test_a_wrong_api_key_is_reported_once_and_not_retried(
    mosquitto: Any, server: Any
) -> None:
    async with running(mosquitto, server.url, api_key="wrong"), devices(mosquitto, "d1") as (d1,):
        await d1.say({"text": "Let me in.", "turn_id": "t-auth"})
        error = await d1.next_event()
        with pytest.raises(TimeoutError):
            await d1.next(timeout=0.5)
    assert error["code"] == "unauthorized" and error["turn_id"] == "t-auth"


async def test_a_full_queue_refuses_more_says(mosquitto: Any, server: Any) -> None:
    async with running(mosquitto, server.url, max_queued=1), devices(mosquitto, "d1") as (d1,):
        for n in range(3):
            await d1.say({"text": f"Say number {n}.", "turn_id": f"s{n}"})
        first = await d1.turn()
        second = await d1.turn()
    assert [e["code"] for e in first.errors] == ["too_many_turns"]
    assert first.errors[0]["turn_id"] == "s2"
    assert (first.done["turn_id"], second.done["turn_id"]) == ("s0", "s1")


async def test_idle_sessions_are_closed_and_reopened(mosquitto: Any, server: Any) -> None:
    async with (
        running(mosquitto, server.url, idle_timeout_s=0.3) as bridge,
        devices(mosquitto, "d1") as (d1,),
    ):
        await d1.say("One.")
        assert_well_formed(await d1.turn())
        assert bridge.devices == ["d1"]
        for _ in range(100):
            if not bridge.devices:
                break
            await asyncio.sleep(0.02)
        assert bridge.devices == []  # the session was closed and the device forgotten
        await d1.say("Two.")
        assert_well_formed(await d1.turn())


async def test_only_the_configured_devices_are_served(mosquitto: Any, server: Any) -> None:
    async with (
        running(mosquitto, server.url, devices=("d1",)),
        devices(mosquitto, "d1", "stranger") as (d1, stranger),
    ):
        await stranger.say("Nobody listens to me.")
        await d1.say("I am served.")
        assert (await d1.turn()).done["reason"] == "completed"
        with pytest.raises(TimeoutError):
            await stranger.next(timeout=0.3)


async def test_broker_credentials(tmp_path: Any, mosquitto: Any) -> None:
    mosquitto.stop()
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "bridge", "s3cret"], check=True)
    passwords.chmod(0o644)
    conf = f"allow_anonymous false\npassword_file {passwords}\n"
    broker = Mosquitto(tmp_path, mosquitto.port, conf)
    broker.start()
    try:
        url = f"mqtt://bridge:s3cret@127.0.0.1:{broker.port}"
        async with MqttBridge(MqttBridgeConfig(broker=url, prefix=PREFIX)) as bridge:
            await asyncio.wait_for(bridge.online.wait(), 10)
        wrong = MqttBridgeConfig(broker=url.replace("s3cret", "wrong"), prefix=PREFIX)
        async with MqttBridge(wrong) as bridge:
            await asyncio.sleep(1.0)
            assert not bridge.online.is_set() and bridge.connections == 0
    finally:
        broker.stop()


async def test_tls_broker_is_verified(tmp_path: Any, mosquitto: Any) -> None:
    mosquitto.stop()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o644)
    broker = Mosquitto(tmp_path, mosquitto.port, f"certfile {cert}\nkeyfile {key}\n")
    broker.start()
    try:
        url = f"mqtts://127.0.0.1:{broker.port}"
        trusted = MqttBridgeConfig(broker=url, prefix=PREFIX, ca_file=str(cert))
        async with MqttBridge(trusted) as bridge:
            await asyncio.wait_for(bridge.online.wait(), 10)
        # The self-signed certificate is not in the system's CAs: refused unless told otherwise.
        async with MqttBridge(MqttBridgeConfig(broker=url, prefix=PREFIX)) as bridge:
            await asyncio.sleep(1.0)
            assert bridge.connections == 0
        insecure = MqttBridgeConfig(broker=url, prefix=PREFIX, tls_insecure=True)
        async with MqttBridge(insecure) as bridge:
            await asyncio.wait_for(bridge.online.wait(), 10)
    finally:
        broker.stop()


# ---------------------------------------------------------------------------- CLI


async def test_cli_serves_publishes_offline_on_shutdown_and_has_a_last_will(
    mosquitto: Any, server: Any
) -> None:
    args = [
        *("-m", "voxlane.cli", "mqtt", "--broker", mosquitto.url, "--server", server.url),
        *("--api-key", KEY, "--prefix", PREFIX, "--max-frames", "3", "--log-level", "WARNING"),
    ]

    async def start() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, stderr=asyncio.subprocess.PIPE
        )
        await wait_status(mosquitto, "online", timeout=30)
        return process

    process = await start()
    try:
        async with devices(mosquitto, "d1") as (d1,):
            await d1.say({"text": "Through the command line.", "voice": "zoe"})
            record = await d1.turn()
        assert record.started["voice"] == "zoe" and record.done["reason"] == "completed"
        process.send_signal(signal.SIGTERM)  # clean shutdown: offline published explicitly
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, stderr.decode()
        assert await wait_status(mosquitto, "offline") == "offline"

        process = await start()
        process.kill()  # a crash: the broker publishes the last will
        await process.wait()
        assert await wait_status(mosquitto, "offline") == "offline"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_cli_parser_does_not_import_aiomqtt() -> None:
    code = (
        "import sys\nfrom voxlane.cli import main\n"
        "try:\n    main(['mqtt', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'aiomqtt' not in sys.modules and 'paho' not in sys.modules, 'imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--broker" in result.stdout and "--audio-qos" in result.stdout


# ---------------------------------------------------------------- payloads (no I/O)


def test_parse_say_plain_and_json() -> None:
    assert parse_say(b" Hello! ") == SayRequest(text=" Hello! ")
    request = parse_say(b'{"text": "Hi", "voice": "leo", "turn_id": "a-1", "interrupt": true}')
    assert request == SayRequest(text="Hi", voice="leo", turn_id="a-1", interrupt=True)
    assert parse_say(b"[1, 2]").text == "[1, 2]"  # only a JSON object is JSON
    with pytest.raises(BadMessageError, match="interrupt"):
        parse_say(b'{"text": "Hi", "interrupt": "yes"}')
    with pytest.raises(OutOfRangeError, match="turn_id"):
        parse_say(b'{"text": "Hi", "turn_id": "has spaces"}')
    with pytest.raises(MessageTooLargeError):
        parse_say("é".encode() * 11, max_chars=10)
    assert parse_say("é".encode() * 10, max_chars=10).text == "é" * 10
    with pytest.raises(MessageTooLargeError):
        parse_say(b"x" * 100_000, max_chars=10)


def test_parse_cancel() -> None:
    assert parse_cancel(b"").turn_id is None
    assert parse_cancel(b" t3\n").turn_id == "t3"
    assert parse_cancel(b'{"turn_id": "t4"}').turn_id == "t4"
    with pytest.raises(OutOfRangeError):
        parse_cancel(b"two words")


def test_broker_url_and_config_validation() -> None:
    assert parse_broker_url("mqtt://h") == parse_broker_url("h:1883")
    tls = parse_broker_url("mqtts://u%40x:p%3Aw@broker.example")
    assert (tls.host, tls.port, tls.tls, tls.username, tls.password) == (
        "broker.example",
        8883,
        True,
        "u@x",
        "p:w",
    )
    with pytest.raises(ValueError, match="mqtt://"):
        parse_broker_url("http://h")
    with pytest.raises(ValueError, match="device"):
        MqttBridgeConfig(devices=("a/b",))
    with pytest.raises(ValueError, match="audio_qos"):
        MqttBridgeConfig(audio_qos=3)
    config = MqttBridgeConfig(prefix="home/voxlane/")
    assert config.topic("d", "say") == "home/voxlane/d/say"
    assert config.status == "home/voxlane/status"
    bridge_topics = MqttBridge.subscriptions.fget  # type: ignore[attr-defined]
    assert bridge_topics(type("B", (), {"config": config})()) == [
        "home/voxlane/+/say",
        "home/voxlane/+/cancel",
    ]


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    lows = [backoff_delay(n, 0.5, 30.0, rand=lambda: 0.0) for n in range(10)]
    highs = [backoff_delay(n, 0.5, 30.0, rand=lambda: 1.0) for n in range(10)]
    assert lows[:4] == [0.25, 0.5, 1.0, 2.0] and highs[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(highs) == 30.0 and lows[-1] == 15.0
    assert json.dumps(backoff_delay(1000, 0.5, 30.0))  # no overflow
