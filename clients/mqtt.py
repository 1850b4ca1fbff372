"""MQTT bridge: small devices send text and receive audio through any MQTT broker.

Speakers, kiosks and robots often speak MQTT rather than WebSocket. The bridge subscribes to
per-device command topics on a broker and drives one voxlane session per device through the
client SDK (:func:`voxlane.connect`); it is a thin adapter, the SDK does the protocol::

    PREFIX/DEVICE/say      device -> bridge   plain UTF-8 text, or a JSON object
                                              {"text", "voice", "turn_id", "interrupt"}
    PREFIX/DEVICE/cancel   device -> bridge   stop the current turn, drop queued ones
                                              (payload: empty, a turn id, or {"turn_id": ...})
    PREFIX/DEVICE/audio    bridge -> device   binary: the 20-byte AudioHeader of the WebSocket
                                              audio frames, then mono PCM
    PREFIX/DEVICE/events   bridge -> device   JSON: turn.started, turn.mark, turn.done, error
    PREFIX/status          bridge -> all      retained "online"; "offline" on a clean shutdown
                                              and as the last will

``DEVICE`` is one topic level; the bridge serves a fixed set of devices or every device that
publishes to ``PREFIX/+/say``. Each device gets two tasks: a *worker* that speaks its says one
after another (a new say queues behind a running one unless it asks to ``interrupt``) and a
*publisher* that is the only task publishing to the device's topics, so audio and events
leave in the order they were produced. Malformed payloads become an ``error`` event on the
device's events topic; the bridge keeps serving. A broker outage cancels the turns in flight
(undeliverable audio is not buffered), then the bridge reconnects with exponential backoff
and jitter, subscribes again and re-publishes its retained ``online`` status. See
``docs/mqtt.md``.

aiomqtt (the ``mqtt`` extra) is imported when a bridge runs, so importing this module and
building the ``voxlane mqtt`` argument parser stay light.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import voxlane
from voxlane.errors import (
    AuthenticationError,
    BadMessageError,
    ConnectionClosedError,
    MessageTooLargeError,
    OutOfRangeError,
    TooManyTurnsError,
    VoxlaneError,
)
from voxlane.protocol import (
    AudioFrame,
    AudioHeader,
    ErrorMessage,
    Identifier,
    SampleFormatCode,
    TurnDone,
    TurnMetrics,
    VoiceId,
    dump_message,
)

if TYPE_CHECKING:
    import aiomqtt

__all__ = [
    "BrokerAddress",
    "CancelRequest",
    "MqttBridge",
    "MqttBridgeConfig",
    "SayRequest",
    "add_mqtt_arguments",
    "backoff_delay",
    "parse_broker_url",
    "parse_cancel",
    "parse_say",
    "run_mqtt",
]

log = logging.getLogger("voxlane.mqtt")

ONLINE = b"online"
OFFLINE = b"offline"

# ------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is, from ``mqtt://[user[:password]@]host[:port]`` (``mqtts://``: TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL. ``mqtt://`` (or ``tcp://``) defaults to port 1883, ``mqtts://``
    (or ``ssl://``) to 8883 with TLS; a bare ``host[:port]`` means ``mqtt://``.

    Raises :class:`ValueError` for another scheme or a URL without a host.
    """
    if "://" not in url:
        url = f"mqtt://{url}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("mqtt", "tcp"):
        tls, default_port = False, 1883
    elif scheme in ("mqtts", "ssl", "tls"):
        tls, default_port = True, 8883
    else:
        raise ValueError(f"a broker URL starts with mqtt:// or mqtts://, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"the broker URL {url!r} names no host")
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or default_port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _check_topic_level(name: str, what: str) -> None:
    if not name or any(c in name for c in "/+#\x00"):
        raise ValueError(f"{what} {name!r} must be one non-empty topic level without / + #")


def _check_qos(value: int, what: str) -> None:
    if value not in (0, 1, 2):
        raise ValueError(f"{what} must be 0, 1 or 2, not {value!r}")


@dataclass(frozen=True)
class MqttBridgeConfig:
    """Options of :class:`MqttBridge` (``voxlane mqtt`` sets them from flags).

    QoS defaults: commands (``say``/``cancel`` subscriptions), ``events`` and the status are
    QoS 1 (at least once: a lost ``turn.done`` or ``say`` would leave a device waiting). Audio
    is QoS 0: aiomqtt waits for the broker's PUBACK on every QoS 1 publish, which would cap
    audio at one chunk per broker round trip, and a chunk that arrives late is as useless as a
    lost one; the header's sequence number makes a gap visible. MQTT keeps the order of the
    messages one client publishes to one topic at one QoS, and one task publishes per device.
    """

    broker: str = "mqtt://127.0.0.1:1883"
    """``mqtt://[user[:password]@]host[:port]``, or ``mqtts://`` for TLS."""
    server: str | None = None
    """The voxlane server URL (default ``$VOXLANE_URL``, then ``ws://127.0.0.1:8765``)."""
    api_key: str | None = None
    """The voxlane API key (default ``$VOXLANE_API_KEY``)."""
    prefix: str = "voxlane"
    """Topic prefix; may have several levels (``home/voxlane``)."""
    devices: tuple[str, ...] = ()
    """Devices to serve; empty serves every device publishing to ``PREFIX/+/say``."""
    status_topic: str | None = None
    """Where the retained online/offline status goes (default ``PREFIX/status``)."""
    client_id: str | None = None
    """MQTT client id (default ``voxlane-mqtt-`` plus random hex)."""
    username: str | None = None
    """Broker username (overrides one in the URL)."""
    password: str | None = None
    ca_file: str | None = None
    """CA bundle to verify the broker's certificate (default: the system's)."""
    cert_file: str | None = None
    """Client certificate for mutual TLS (with ``key_file``)."""
    key_file: str | None = None
    tls_insecure: bool = False
    """Skip verifying the broker's certificate and host name (testing only)."""
    keepalive: int = 30
    """Seconds between MQTT pings; the broker sends the last will after 1.5 x this of silence."""
    command_qos: int = 1
    events_qos: int = 1
    audio_qos: int = 0
    session_options: Mapping[str, Any] = field(default_factory=dict)
    """Passed to :meth:`voxlane.Session.configure` for every device session
    (``voice``, ``sample_rate``, ``chunk_ms``, ``max_frames``, ...)."""
    idle_timeout_s: float = 60.0
    """A device session with no turn for this long is closed (reopened by the next say)."""
    max_text_chars: int = 2000
    """Longest text one say may carry."""
    max_queued: int = 4
    """Says waiting behind the current one per device; more are refused (``too_many_turns``)."""
    say_timeout_s: float = 30.0
    """How long a say waits for an unreachable voxlane server before it is given up."""
    reconnect_min_s: float = 0.5
    """First delay before reconnecting (broker or voxlane server); doubles up to the max."""
    reconnect_max_s: float = 30.0
    publish_timeout_s: float = 5.0
    """How long a QoS 1/2 publish waits for the broker's acknowledgement."""

    def __post_init__(self) -> None:
        parse_broker_url(self.broker)  # fail at construction, not at the first connect
        if not self.prefix or any(c in self.prefix for c in "+#") or "//" in self.prefix:
            raise ValueError(f"prefix {self.prefix!r} must be a topic without wildcards")
        for device in self.devices:
            _check_topic_level(device, "device")
        for name in ("command_qos", "events_qos", "audio_qos"):
            _check_qos(getattr(self, name), name)
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.max_text_chars < 1 or self.max_queued < 0 or self.idle_timeout_s <= 0:
            raise ValueError("max_text_chars >= 1, max_queued >= 0 and idle_timeout_s > 0")

    @property
    def prefix_path(self) -> str:
        """The prefix without a trailing slash."""
        return self.prefix.rstrip("/")

    @property
    def status(self) -> str:
        """The status topic in use."""
        return self.status_topic or f"{self.prefix_path}/status"

    def topic(self, device: str, kind: str) -> str:
        """``PREFIX/DEVICE/KIND``."""
        return f"{self.prefix_path}/{device}/{kind}"


def backoff_delay(
    attempt: int,
    initial: float,
    maximum: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with jitter: uniform in ``[d/2, d]``, ``d = min(max, initial·2^n)``.

    The jitter keeps a fleet of bridges (or one bridge's devices) from reconnecting in step
    after a shared outage; the lower half-bound keeps the exponential growth.
    """
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 32))
    return ceiling * (0.5 + 0.5 * rand())


# ---------------------------------------------------------------------------- payloads


class SayRequest(BaseModel):
    """One ``say``: what to speak, and how.

    A plain-text payload is ``SayRequest(text=payload)``. A JSON payload (first non-blank
    character ``{``) may also set ``voice`` (a built-in or cloned voice), ``turn_id`` (echoed
    in the events; a server default otherwise) and ``interrupt`` (cancel the current and
    queued turns of the device instead of queueing behind them). Unknown fields are errors.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    text: str = Field(min_length=1)
    voice: VoiceId | None = None
    turn_id: Identifier | None = None
    interrupt: bool = False


class CancelRequest(BaseModel):
    """One ``cancel``: ``turn_id`` None stops the current turn and drops the queued ones."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    turn_id: Identifier | None = None


# pydantic error types meaning "a value outside its bounds" rather than "the wrong shape".
_RANGE_ERRORS = frozenset(
    {"string_too_short", "string_too_long", "string_pattern_mismatch", "too_short", "too_long"}
)


def _decode(payload: bytes, kind: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadMessageError(
            f"{kind} payload is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def _validate_json(model: type[BaseModel], text: str, kind: str) -> Any:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise BadMessageError(f"{kind} payload is not valid JSON: {exc}") from None
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors()
        parts = []
        for err in errors[:3]:
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                parts.append(f"unknown field {loc!r}")
            else:
                parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        detail = "; ".join(parts)
        if all(e["type"] in _RANGE_ERRORS for e in errors):
            raise OutOfRangeError(f"{kind}: {detail}") from None
        raise BadMessageError(f"{kind}: {detail}") from None


def parse_say(payload: bytes, *, max_chars: int = 2000) -> SayRequest:
    """Parse a ``say`` payload (plain UTF-8 text or a JSON object).

    Raises :class:`BadMessageError` (bad UTF-8, bad JSON, unknown or mistyped fields, no
    text), :class:`OutOfRangeError` (a malformed voice or turn id) or
    :class:`MessageTooLargeError` (text over ``max_chars`` characters).
    """
    # A UTF-8 character is at most 4 bytes; JSON escapes of up to 12 bytes are allowed for.
    if len(payload) > 12 * max_chars + 1024:
        raise MessageTooLargeError(f"say payload of {len(payload)} bytes is too large")
    text = _decode(payload, "say")
    if text.lstrip().startswith("{"):
        request = _validate_json(SayRequest, text, "say")
    else:
        request = SayRequest(text=text) if text else None
    if request is None or not request.text.strip():
        raise BadMessageError("say has no text to speak")
    if len(request.text) > max_chars:
        raise MessageTooLargeError(
            f"say text of {len(request.text)} characters exceeds the limit of {max_chars}"
        )
    return request


def parse_cancel(payload: bytes) -> CancelRequest:
    """Parse a ``cancel`` payload: empty (everything), a turn id, or ``{"turn_id": ...}``."""
    text = _decode(payload, "cancel").strip()
    if text.startswith("{"):
        return _validate_json(CancelRequest, text, "cancel")
    try:
        return CancelRequest(turn_id=text or None)
    except ValidationError:
        raise OutOfRangeError(f"cancel: {text[:80]!r} is not a turn id") from None


def _error_event(error: BaseException, turn_id: str | None = None) -> bytes:
    code = error.code if isinstance(error, VoxlaneError) else "internal_error"
    return dump_message(ErrorMessage(code=code, message=str(error), turn_id=turn_id)).encode()


# ------------------------------------------------------------------------------ device


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    kind: Literal["audio", "event"]


class _Device:
    """The state of one device: its voxlane session, says waiting, and what to publish."""

    def __init__(self, bridge: MqttBridge, name: str) -> None:
        self.bridge = bridge
        self.name = name
        config = bridge.config
        self._events_topic = config.topic(name, "events")
        self._audio_topic = config.topic(name, "audio")
        self.session: voxlane.Session | None = None
        self.queue: deque[SayRequest] = deque()
        self.current: SayRequest | None = None
        self.turn: voxlane.Turn | None = None
        self.cancelled = asyncio.Event()  # the current say was cancelled
        self.closing = False
        self._worker_finished = False
        self._wakeup = asyncio.Event()
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_ready = asyncio.Event()
        self._helpers: set[asyncio.Task[Any]] = set()
        self.worker = asyncio.create_task(self._serve(), name=f"voxlane-mqtt-{name}")
        self.publisher = asyncio.create_task(self._publish(), name=f"voxlane-mqtt-pub-{name}")

    # ------------------------------------------------------------ commands (sync)

    def submit(self, say: SayRequest) -> None:
        if say.interrupt:
            self.cancel(None)
        if len(self.queue) >= self.bridge.config.max_queued and (
            self.current is not None or self.queue
        ):
            self.emit_error(
                TooManyTurnsError(
                    f"{len(self.queue)} says already wait for device {self.name!r}: wait for "
                    f'turn.done, or send the say with "interrupt": true'
                ),
                say.turn_id,
            )
            return
        self.queue.append(say)
        self._wakeup.set()

    def cancel(self, turn_id: str | None) -> None:
        """Drop matching queued says; cancel the current turn if it matches."""
        if turn_id is None:
            self.queue.clear()
        else:
            self.queue = deque(s for s in self.queue if s.turn_id != turn_id)
        current, turn = self.current, self.turn
        if current is None or self.cancelled.is_set():
            return
        if turn_id is not None and turn_id not in (current.turn_id, turn and turn.turn_id):
            return
        self.cancelled.set()
        # Audio already produced but not yet published is dropped: the device asked for silence.
        self._outbox = deque(o for o in self._outbox if o.kind != "audio")
        if turn is not None:
            self._spawn(turn.cancel())
        # Otherwise the worker is connecting or starting the turn: it checks `cancelled`.

    def close(self) -> None:
        """Stop serving: cancel everything; the tasks end once the outbox is published."""
        self.closing = True
        self.cancel(None)
        self._wakeup.set()

    # --------------------------------------------------------------- publishing

    def emit_event(self, message: BaseModel) -> None:
        self._put(self._events_topic, dump_message(message).encode(), "event")

    def emit_error(self, error: BaseException, turn_id: str | None = None) -> None:
        log.info("device %s: [%s] %s", self.name, getattr(error, "code", "error"), error)
        self._put(self._events_topic, _error_event(error, turn_id), "event")

    def _put(self, topic: str, payload: bytes, kind: Literal["audio", "event"]) -> None:
        config = self.bridge.config
        qos = config.audio_qos if kind == "audio" else config.events_qos
        self._outbox.append(_Outgoing(topic, payload, qos, kind))
        self._outbox_ready.set()

    def drop_outbox(self) -> None:
        self._outbox.clear()

    async def _publish(self) -> None:
        # The only task that publishes to this device's topics: order is the outbox's order.
        while True:
            while not self._outbox:
                if self._worker_finished:
                    return
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            item = self._outbox.popleft()
            await self.bridge._publish(item.topic, item.payload, item.qos)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except VoxlaneError as exc:
                log.info("device %s: %s", self.name, exc)
            except Exception:
                log.exception("device %s: helper task failed", self.name)

        task = asyncio.create_task(run())
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    # ------------------------------------------------------------------- worker

    async def _serve(self) -> None:
        try:
            while not self.closing:
                if not self.queue:
                    self._wakeup.clear()
                    idle = self.bridge.config.idle_timeout_s
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), idle)
                    except asyncio.TimeoutError:
                        await self._close_session()
                        if not self.queue:  # nothing arrived while closing: forget the device
                            self.closing = True
                            self.bridge._forget(self)
                    continue
                say = self.queue.popleft()
                self.current = say
                self.cancelled.clear()
                try:
                    await self._speak(say)
                except Exception as exc:  # a bug must not leave the device deaf
                    log.exception("device %s: serving a say failed", self.name)
                    self.emit_error(exc, say.turn_id)
                    with contextlib.suppress(Exception):
                        await self._close_session()
                finally:
                    self.current = None
                    self.turn = None
        finally:
            self.closing = True
            with contextlib.suppress(Exception):
                await self._close_session()
            for task in list(self._helpers):
                task.cancel()
            self._worker_finished = True
            self._outbox_ready.set()  # let the publisher finish

    async def _close_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def _open_session(self, say: SayRequest) -> voxlane.Session | None:
        """The device's session, connecting (with retries) if needed; None if given up."""
        if self.session is not None and not self.session.closed:
            return self.session
        await self._close_session()
        config = self.bridge.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.say_timeout_s
        attempt = 0
        while True:
            try:
                session = await voxlane.connect(config.server, api_key=config.api_key)
            except AuthenticationError as exc:
                self.emit_error(exc, say.turn_id)  # a refused key does not fix itself
                return None
            except ConnectionClosedError as exc:
                delay = backoff_delay(attempt, config.reconnect_min_s, config.reconnect_max_s)
                attempt += 1
                if loop.time() + delay > deadline:
                    why = f"{exc}; gave up on this say after {attempt} attempts"
                    self.emit_error(ConnectionClosedError(why), say.turn_id)
                    return None
                why = f"{exc}; retrying in {delay:.1f} s"
                self.emit_error(ConnectionClosedError(why), say.turn_id)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.cancelled.wait(), delay)
                if self.cancelled.is_set():
                    return None
                continue
            try:
                if config.session_options:
                    await session.configure(**config.session_options)
            except BaseException as exc:
                await session.close()
                if isinstance(exc, VoxlaneError):
                    self.emit_error(exc, say.turn_id)
                    return None
                raise
            self.session = session
            return session

    async def _speak(self, say: SayRequest) -> None:
        session = await self._open_session(say)
        if session is None or self.cancelled.is_set():
            return
        try:
            turn = await session.start_turn(
                say.text, end=True, voice=say.voice, turn_id=say.turn_id
            )
        except VoxlaneError as exc:
            self.emit_error(exc, say.turn_id)
            if session.closed:
                await self._close_session()
            return
        self.turn = turn
        started = turn.started
        assert started is not None  # start_turn returns once turn.started arrived
        self.emit_event(started)
        if self.cancelled.is_set():  # a cancel arrived while the turn was being started
            self._spawn(turn.cancel())
        sample_format = SampleFormatCode.of(started.sample_format)
        while True:
            try:
                event = await anext(turn)
            except StopAsyncIteration:
                break
            except VoxlaneError as exc:  # the iterator ends after a final error
                self.emit_error(exc, turn.turn_id)
                continue
            if self.cancelled.is_set():
                continue
            if isinstance(event, voxlane.AudioChunk):
                header = AudioHeader(
                    turn_number=started.turn_number,
                    sequence=event.sequence,
                    sample_offset=event.sample_offset,
                    sample_format=sample_format,
                )
                self._put(self._audio_topic, AudioFrame(header, event.pcm).pack(), "audio")
            else:
                self.emit_event(event)
        # Every turn.started gets one turn.done, even when the connection died mid-turn.
        self.emit_event(
            turn.done or TurnDone(turn_id=turn.turn_id, reason="error", metrics=TurnMetrics())
        )
        if session.closed:
            await self._close_session()


# ------------------------------------------------------------------------------ bridge


def _import_aiomqtt() -> ModuleType:
    try:
        import aiomqtt
    except ImportError as exc:
        raise ImportError(
            "the MQTT bridge needs aiomqtt: pip install 'voxlane[mqtt]' (aiomqtt>=2.5,<3)"
        ) from exc
    return aiomqtt


class MqttBridge:
    """Serves voxlane to MQTT devices: ``await bridge.run()`` until :meth:`stop`.

    Or ``async with MqttBridge(config) as bridge:`` to run it in the background for the
    block. :attr:`online` is set while the bridge is connected and subscribed.
    """

    def __init__(self, config: MqttBridgeConfig) -> None:
        self.config = config
        self.address = parse_broker_url(config.broker)
        self.client_id = config.client_id or f"voxlane-mqtt-{uuid.uuid4().hex[:12]}"
        self.online = asyncio.Event()
        """Set while connected to the broker and subscribed; cleared while reconnecting."""
        self.connections = 0
        """Successful broker connections so far (more than one: it reconnected)."""
        self._devices: dict[str, _Device] = {}
        self._client: aiomqtt.Client | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._mqtt: Any = None  # the aiomqtt module, imported by run()

    @property
    def subscriptions(self) -> list[str]:
        """The command topics the bridge subscribes to."""
        names = self.config.devices or ("+",)
        return [self.config.topic(d, kind) for d in names for kind in ("say", "cancel")]

    @property
    def devices(self) -> list[str]:
        """Devices with live state (a session, queued says, or a turn) right now."""
        return sorted(self._devices)

    def stop(self) -> None:
        """Ask :meth:`run` to finish: turns are cancelled and ``offline`` is published."""
        self._stopping.set()

    async def __aenter__(self) -> MqttBridge:
        self._task = asyncio.create_task(self.run(), name="voxlane-mqtt-bridge")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._task is not None:
            await self._task

    # ------------------------------------------------------------------ broker

    async def run(self) -> None:
        """Serve until :meth:`stop`: connect, serve, and reconnect with backoff when the
        broker goes away (refused credentials are retried too: they may be fixed meanwhile).
        """
        self._mqtt = aiomqtt = _import_aiomqtt()
        tls = self._tls_context()
        attempt = 0
        try:
            while not self._stopping.is_set():
                client = aiomqtt.Client(
                    self.address.host,
                    self.address.port,
                    username=self.config.username or self.address.username,
                    password=self.config.password or self.address.password,
                    identifier=self.client_id,
                    will=aiomqtt.Will(self.config.status, OFFLINE, qos=1, retain=True),
                    keepalive=self.config.keepalive,
                    tls_context=tls,
                    timeout=self.config.publish_timeout_s,
                )
                try:
                    async with client:
                        attempt = 0
                        await self._serve(client)
                except aiomqtt.MqttError as exc:
                    was_online = self.online.is_set()
                    self._lost_broker()
                    delay = backoff_delay(
                        attempt, self.config.reconnect_min_s, self.config.reconnect_max_s
                    )
                    attempt += 1
                    level = logging.WARNING if was_online or attempt == 1 else logging.INFO
                    log.log(level, "broker %s: %s; reconnecting in %.1f s", self._where, exc, delay)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            self._lost_broker()
            await self._close_devices()

    @property
    def _where(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    def _tls_context(self) -> ssl.SSLContext | None:
        config = self.config
        if not (self.address.tls or config.ca_file or config.cert_file):
            return None
        context = ssl.create_default_context(cafile=config.ca_file)
        if config.cert_file:
            context.load_cert_chain(config.cert_file, config.key_file)
        if config.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _serve(self, client: aiomqtt.Client) -> None:
        qos = self.config.command_qos
        granted = await client.subscribe([(topic, qos) for topic in self.subscriptions])
        # SUBACK code 0x80 (v3.1.1) or a v5 reason code >= 0x80: the broker (an ACL) said no.
        codes = [getattr(g, "value", g) for g in granted]  # paho ReasonCodes, or ints
        refused = [t for t, c in zip(self.subscriptions, codes, strict=False) if c >= 0x80]
        if refused:
            log.error("broker %s refused the subscriptions %s", self._where, refused)
        await client.publish(self.config.status, ONLINE, qos=1, retain=True)
        self._client = client
        self.connections += 1
        self.online.set()
        log.info("broker %s: online, serving %s", self._where, ", ".join(self.subscriptions[::2]))
        reader = asyncio.create_task(self._read(client))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises the MqttError of the lost connection
                raise self._mqtt.MqttError("the message stream ended")
            # A clean shutdown: let the devices publish their last events, then say offline
            # (a DISCONNECT discards the will, so offline must be published explicitly).
            await self._close_devices()
            await client.publish(self.config.status, OFFLINE, qos=1, retain=True)
            log.info("broker %s: offline", self._where)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(
                    client.publish(self.config.status, OFFLINE, qos=1, retain=True), 1.0
                )
            raise
        finally:
            self._client = None
            self.online.clear()
            for task in (reader, stopping):
                task.cancel()
            await asyncio.gather(reader, stopping, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                self._dispatch(message.topic.value, message.payload, message.retain)
            except Exception:  # one bad message must never stop the bridge
                log.exception("dispatching a message on %s failed", message.topic.value)

    def _dispatch(self, topic: str, payload: Any, retain: bool) -> None:
        prefix = self.config.prefix_path + "/"
        if not topic.startswith(prefix):
            return
        name, _, kind = topic[len(prefix) :].partition("/")
        if not name or kind not in ("say", "cancel"):
            return
        if self.config.devices and name not in self.config.devices:
            return
        if not isinstance(payload, (bytes, bytearray)):
            payload = b"" if payload is None else str(payload).encode()
        device = self._device(name)
        if retain:
            # A retained command would be replayed at every reconnect of the bridge.
            device.emit_error(BadMessageError(f"retained {kind} ignored: publish it unretained"))
            return
        try:
            if kind == "say":
                device.submit(parse_say(bytes(payload), max_chars=self.config.max_text_chars))
            else:
                device.cancel(parse_cancel(bytes(payload)).turn_id)
        except VoxlaneError as exc:
            device.emit_error(exc)

    def _device(self, name: str) -> _Device:
        device = self._devices.get(name)
        if device is None:
            device = self._devices[name] = _Device(self, name)
        return device

    def _forget(self, device: _Device) -> None:
        if self._devices.get(device.name) is device:
            del self._devices[device.name]

    async def _publish(self, topic: str, payload: bytes, qos: int) -> None:
        client = self._client
        if client is None:
            return  # no broker: nothing is buffered (turns were cancelled when it went away)
        try:
            await client.publish(topic, payload, qos=qos)
        except self._mqtt.MqttError as exc:
            log.debug("dropped a message to %s: %s", topic, exc)
        except Exception:
            log.exception("publishing to %s failed", topic)

    def _lost_broker(self) -> None:
        self._client = None
        self.online.clear()
        for device in self._devices.values():
            device.cancel(None)
            device.drop_outbox()

    async def _close_devices(self, timeout: float = 5.0) -> None:
        devices = list(self._devices.values())
        self._devices.clear()
        for device in devices:
            device.close()
        tasks = [t for d in devices for t in (d.worker, d.publisher)]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -------------------------------------------------------------------------------- CLI


def add_mqtt_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``voxlane mqtt``."""
    p.add_argument(
        "--broker",
        default=os.environ.get("VOXLANE_MQTT_BROKER", "mqtt://127.0.0.1:1883"),
        help="mqtt://[user[:password]@]host[:port] or mqtts:// (default $VOXLANE_MQTT_BROKER "
        "or mqtt://127.0.0.1:1883)",
    )
    p.add_argument("--server", help="voxlane server URL (default $VOXLANE_URL)")
    p.add_argument("--api-key", help="voxlane API key (default $VOXLANE_API_KEY)")
    p.add_argument("--prefix", default="voxlane", help="topic prefix (default voxlane)")
    p.add_argument(
        "--device",
        action="append",
        dest="devices",
        default=[],
        metavar="NAME",
        help="serve only this device (repeatable); default every device on PREFIX/+/say",
    )
    p.add_argument("--status-topic", help="retained online/offline topic (default PREFIX/status)")
    p.add_argument("--client-id", help="MQTT client id (default voxlane-mqtt-RANDOM)")
    p.add_argument("--username", help="broker username")
    p.add_argument("--password", help="broker password (default $VOXLANE_MQTT_PASSWORD)")
    p.add_argument("--ca-file", help="CA bundle for the broker's TLS certificate")
    p.add_argument("--cert-file", help="client certificate (mutual TLS)")
    p.add_argument("--key-file", help="client certificate key")
    p.add_argument("--tls-insecure", action="store_true", help="do not verify the broker (tests)")
    p.add_argument("--audio-qos", type=int, choices=[0, 1, 2], default=0)
    p.add_argument("--events-qos", type=int, choices=[0, 1, 2], default=1)
    p.add_argument("--voice", help="default voice of the device sessions")
    p.add_argument("--sample-rate", type=int, choices=[8000, 16000, 24000, 48000])
    p.add_argument("--chunk-ms", type=int, help="audio chunk length, 20-80 ms")
    p.add_argument("--max-frames", type=int, help="cap on audio frames per segment (85 ms)")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="close idle sessions (s)")
    p.add_argument("--max-text-chars", type=int, default=2000)
    p.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> MqttBridgeConfig:
    """The bridge configuration the ``voxlane mqtt`` flags describe."""
    from voxlane.cli import session_options

    options = session_options(args, ("voice", "sample_rate", "chunk_ms", "max_frames"))
    return MqttBridgeConfig(
        broker=args.broker,
        server=args.server,
        api_key=args.api_key,
        prefix=args.prefix,
        devices=tuple(args.devices),
        status_topic=args.status_topic,
        client_id=args.client_id,
        username=args.username,
        password=args.password or os.environ.get("VOXLANE_MQTT_PASSWORD"),
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        tls_insecure=args.tls_insecure,
        audio_qos=args.audio_qos,
        events_qos=args.events_qos,
        session_options=options,
        idle_timeout_s=args.idle_timeout,
        max_text_chars=args.max_text_chars,
    )


def run_mqtt(args: argparse.Namespace) -> int:
    """``voxlane mqtt``: run the bridge until SIGINT/SIGTERM (then publish offline)."""
    from voxlane.cli import configure_logging, run_until_signal

    configure_logging(args.log_level)
    config = config_from_args(args)
    _import_aiomqtt()  # a clear message before anything starts
    return run_until_signal(MqttBridge(config))
