"""The asyncio client of protocol v1: ``voxlane.connect`` -> :class:`Session` -> :class:`Turn`.

::

    async with voxlane.connect("ws://127.0.0.1:8765", api_key="...") as session:
        async for event in session.speak("Hello there!"):
            if isinstance(event, voxlane.AudioChunk):
                play(event.samples)

Structure: one reader task per connection parses every server message with the sans-I/O
:class:`~voxlane.session_protocol.ClientSession` (typed messages, frame sequence checks) and
dispatches it: audio, marks and ``turn.*`` messages to the turn's queue, ``session.configured``
and ``voice.cloned`` to the call awaiting them, errors to the call or turn they name. All
sends go through one lock, so the two messages of a clone stay adjacent on the socket.

Outgoing messages are validated with the same models the server uses before they are sent,
so a value out of range raises :class:`~voxlane.errors.OutOfRangeError` locally and costs no
round trip (and none of the server's ``max_errors`` budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from voxlane.errors import (
    AudioFormatError,
    AuthenticationError,
    BadMessageError,
    ConnectionClosedError,
    DuplicateTurnError,
    ProtocolError,
    TurnClosedError,
    UnknownMessageError,
    VoxlaneError,
    error_class_for_code,
)
from voxlane.protocol import (
    AgentMessage,
    AgentTextDelta,
    CloseCode,
    ErrorMessage,
    Limits,
    SampleFormat,
    SessionConfig,
    SessionConfigured,
    SessionReady,
    TurnCancelled,
    TurnDone,
    TurnMark,
    TurnMetrics,
    TurnStarted,
    VoiceCloned,
    bytes_per_sample,
    parse_client_message,
)
from voxlane.session_protocol import ClientSession

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_URL",
    "AudioChunk",
    "Mark",
    "Session",
    "TextDelta",
    "Turn",
    "TurnEvent",
    "connect",
]

log = logging.getLogger("voxlane.client")

DEFAULT_URL = "ws://127.0.0.1:8765/v1/ws"
"""Used when neither ``url`` nor ``$VOXLANE_URL`` is given (``voxlane serve`` defaults)."""

Mark = TurnMark
"""A ``turn.mark`` event: segment ``text`` starts at output sample ``sample`` of the turn."""

_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """One audio frame of a turn, as received.

    ``pcm`` is the raw little-endian payload; :attr:`samples` is a zero-copy numpy view of
    it (``int16`` for ``pcm_s16le``, ``float32`` for ``pcm_f32le``). ``sample_offset`` is the
    index of the first sample within the turn (the clock marks and cancel acks refer to);
    ``received_at`` is :func:`time.perf_counter` when the frame arrived.
    """

    turn_id: str
    sequence: int
    sample_offset: int
    sample_rate: int
    sample_format: SampleFormat
    pcm: bytes
    received_at: float = 0.0

    @property
    def num_samples(self) -> int:
        """Samples in this chunk."""
        return len(self.pcm) // bytes_per_sample(self.sample_format)

    @property
    def duration_s(self) -> float:
        """Seconds of audio in this chunk."""
        return self.num_samples / self.sample_rate

    @property
    def start_s(self) -> float:
        """Position of the first sample within the turn, in seconds."""
        return self.sample_offset / self.sample_rate

    @property
    def samples(self) -> np.ndarray:
        """Read-only numpy view of ``pcm`` (no copy): int16 or float32, little-endian."""
        import numpy as np

        dtype = "<i2" if self.sample_format == "pcm_s16le" else "<f4"
        return np.frombuffer(self.pcm, dtype=dtype)

    def to_float32(self) -> np.ndarray:
        """The samples as float32 in [-1, 1] (a copy for int16 audio)."""
        import numpy as np

        samples = self.samples
        if samples.dtype.kind == "f":
            return samples.astype(np.float32, copy=False)
        return samples.astype(np.float32) / 32768.0


TextDelta = AgentTextDelta
"""An ``agent.text_delta`` event of an agent turn (:meth:`Session.respond`): LLM text."""

TurnEvent = AudioChunk | TurnMark | AgentTextDelta
"""What iterating a :class:`Turn` yields (text deltas only in agent turns)."""


@dataclass
class _Failure:
    error: BaseException
    final: bool  # the turn is over: the iterator ends after raising


class Turn:
    """One utterance: text goes in (:meth:`send`, :meth:`feed`), audio comes out.

    Iterate it (``async for event in turn``) for :class:`AudioChunk` and :data:`Mark` events
    in order; iteration ends after the server's ``turn.done``, and raises the mapped
    :class:`~voxlane.errors.VoxlaneError` if the server reports an error for the turn. Use it as
    an async context manager to cancel it if the block is left before it is done.

    Create turns with :meth:`Session.start_turn` (waits for the server's acknowledgement)
    or :meth:`Session.speak` (text and end sent in the background).
    """

    def __init__(self, session: Session, turn_id: str, voice: str | None) -> None:
        self._session = session
        self.turn_id = turn_id
        """The turn id (chosen by the client)."""
        self.requested_voice = voice
        self.started: TurnStarted | None = None
        """The server's ``turn.started`` (turn number, voice, rate, format) once received."""
        self.done: TurnDone | None = None
        """The server's ``turn.done`` once received."""
        self.cancelled_at_sample: int | None = None
        """``turn.cancelled.sample``: samples the server sent before the cancel took effect."""
        self.start_sent_at: float | None = None
        self.first_text_at: float | None = None
        """:func:`time.perf_counter` when the first non-empty text of the turn was sent."""
        self.first_audio_at: float | None = None
        """:func:`time.perf_counter` when the first audio chunk arrived."""
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._started_future: asyncio.Future[TurnStarted] = (
            asyncio.get_running_loop().create_future()
        )
        self._started_future.add_done_callback(_consume_exception)
        self._cancel_ack = asyncio.Event()
        self._finished = asyncio.Event()
        self._ended = False  # turn.end sent
        self._start_sent = False
        self._cancel_requested = False
        self._iter_done = False
        self._feeder: asyncio.Task[None] | None = None
        self.agent = False
        """True for an agent turn (:meth:`Session.respond`): its text comes from the LLM."""
        self.text = ""
        """Agent turns: the LLM text received so far (``agent.text_delta``)."""
        self.message: AgentMessage | None = None
        """Agent turns: the assistant message the server kept in the dialogue history (what
        was heard of the answer), from ``agent.message``; updated by a later
        :meth:`report_playback` that cuts it further."""

    # ------------------------------------------------------------------------- state

    @property
    def is_done(self) -> bool:
        """True once the turn is over (done, failed to start, or the connection closed)."""
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        """True if :meth:`cancel` was called (or the server reported the turn cancelled)."""
        return self._cancel_requested or (self.done is not None and self.done.reason == "cancelled")

    @property
    def metrics(self) -> TurnMetrics | None:
        """The server's measurements from ``turn.done`` (``None`` until then)."""
        return self.done.metrics if self.done is not None else None

    @property
    def time_to_first_audio_s(self) -> float | None:
        """Client-side latency: first text sent to first audio chunk received."""
        if self.first_audio_at is None or self.first_text_at is None:
            return None
        return self.first_audio_at - self.first_text_at

    # ---------------------------------------------------------------------- text in

    async def send(self, text: str) -> None:
        """Append text (an LLM delta, say). Deltas may split words anywhere."""
        self._check_open()
        if not text:
            return
        for piece in self._session._split_text(text):
            await self._session._send(
                {"type": "turn.append", "turn_id": self.turn_id, "text": piece}
            )
            self._text_sent()

    async def flush(self) -> None:
        """Speak the buffered text now instead of waiting for a sentence end."""
        self._check_open()
        await self._session._send({"type": "turn.flush", "turn_id": self.turn_id})

    async def end(self) -> None:
        """No more text: the server speaks the rest, then the turn is done."""
        self._check_open()
        self._ended = True
        await self._session._send({"type": "turn.end", "turn_id": self.turn_id})

    async def feed(self, text: str | AsyncIterable[str], *, end: bool = True) -> None:
        """Send a string, or every delta of an async iterator, then (by default) end the turn.

        ``None`` and empty deltas are skipped, so an OpenAI-style stream of
        ``chunk.choices[0].delta.content`` can be passed after a ``(d or "" for ...)``.
        """
        if isinstance(text, str):
            await self.send(text)
        else:
            async for delta in text:
                if delta:
                    await self.send(delta)
        if end:
            await self.end()

    def _check_open(self) -> None:
        if self._cancel_requested:
            raise TurnClosedError(f"turn {self.turn_id!r} was cancelled")
        if self._ended:
            raise TurnClosedError(f"turn {self.turn_id!r} was ended: it takes no more text")
        if self.is_done:
            raise TurnClosedError(f"turn {self.turn_id!r} is done")

    def _text_sent(self) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()

    # --------------------------------------------------------------------- audio out

    def __aiter__(self) -> Turn:
        return self

    async def __anext__(self) -> TurnEvent:
        while True:
            if self._iter_done:
                raise StopAsyncIteration
            item = await self._events.get()
            if isinstance(item, (AudioChunk, TurnMark, AgentTextDelta)):
                if self._cancel_requested:
                    continue  # cancel() promises no audio after it is called
                return item
            if isinstance(item, _Failure):
                if item.final:
                    self._iter_done = True
                raise item.error
            # None: turn.done (or the turn failed to start) -- the end of the stream.
            self._iter_done = True
            raise StopAsyncIteration

    async def audio(self) -> AsyncIterator[AudioChunk]:
        """Iterate only the audio chunks of the turn."""
        async for event in self:
            if isinstance(event, AudioChunk):
                yield event

    async def collect(self) -> np.ndarray:
        """Wait for the whole turn and return its audio as one array (int16 or float32)."""
        import numpy as np

        parts = [chunk.samples async for chunk in self.audio()]
        if parts:
            return np.concatenate(parts)
        fmt = self.started.sample_format if self.started else "pcm_s16le"
        return np.zeros(0, "<i2" if fmt == "pcm_s16le" else "<f4")

    async def wait_started(self) -> TurnStarted:
        """Wait for ``turn.started``; raises the server's error if the turn was refused."""
        return await asyncio.shield(self._started_future)

    async def wait(self) -> TurnDone | None:
        """Wait until the turn is over without consuming its events; returns ``turn.done``.

        Raises :class:`ConnectionClosedError` if the connection closed first.
        """
        await self._finished.wait()
        if self.done is None and self._session._closed_error is not None:
            raise self._session._closed_error
        return self.done

    # ------------------------------------------------------------------------ cancel

    async def cancel(self) -> None:
        """Stop the turn now (barge-in) and wait for the server's ``turn.cancelled``.

        From the moment this is called the iterator yields no more audio or marks, even
        frames already received; it ends at ``turn.done``. Cancelling a turn that is
        already done is a no-op. Text feeding started by :meth:`Session.speak` stops.
        """
        if self._feeder is not None and self._feeder is not asyncio.current_task():
            self._feeder.cancel()
            with contextlib.suppress(BaseException):
                await self._feeder
        if self.is_done:
            return
        first = not self._cancel_requested
        self._cancel_requested = True
        if self.start_sent_at is None:
            self._finish(None)  # the server never heard of this turn: nothing to stop
            return
        if first:
            try:
                await self._session._send({"type": "turn.cancel", "turn_id": self.turn_id})
            except ConnectionClosedError:
                return
        await self._cancel_ack.wait()

    async def report_playback(self, sample: int) -> None:
        """Tell the server how much of this turn was heard (``sample`` samples played).

        For agent turns: the answer kept in the dialogue history is cut to what was heard.
        Call it when playback stops early (barge-in), before the next :meth:`Session.respond`
        -- also after the turn is done, since generation usually runs ahead of playback.
        """
        await self._session.report_playback(self.turn_id, sample)

    async def aclose(self) -> None:
        """Cancel the turn unless it is already done."""
        if not self.is_done:
            await self.cancel()

    async def __aenter__(self) -> Turn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "done" if self.is_done else ("cancelling" if self._cancel_requested else "open")
        return f"<Turn {self.turn_id!r} {state}>"

    # ----------------------------------------------------- called by the reader task

    def _on_started(self, message: TurnStarted) -> None:
        self.started = message
        if not self._started_future.done():
            self._started_future.set_result(message)

    def _on_event(self, event: TurnEvent) -> None:
        if isinstance(event, AudioChunk) and self.first_audio_at is None:
            self.first_audio_at = event.received_at
        if isinstance(event, AgentTextDelta) and not self._cancel_requested:
            self.text += event.text
        if not self._cancel_requested:
            self._events.put_nowait(event)

    def _on_cancelled(self, message: TurnCancelled) -> None:
        self.cancelled_at_sample = message.sample
        self._cancel_ack.set()

    def _on_done(self, message: TurnDone) -> None:
        self.done = message
        self._finish(None)

    def _on_error(self, error: BaseException) -> None:
        # The turn goes on (or turn.done follows): the iterator raises, then may continue.
        self._events.put_nowait(_Failure(error, False))

    def _finish(self, error: BaseException | None) -> None:
        if self._finished.is_set():
            return
        if error is not None:
            if not self._started_future.done():
                self._started_future.set_exception(error)
            self._events.put_nowait(_Failure(error, True))
        else:
            self._events.put_nowait(None)
        self._cancel_ack.set()
        self._finished.set()
        self._session._turns.pop(self.turn_id, None)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    # A refused turn's exception also reaches its iterator: nobody has to await the future.
    if not future.cancelled():
        future.exception()


@dataclass
class _Clone:
    """What is needed to clone a voice again on a new connection (see Session.reconnect)."""

    fields: dict[str, Any]
    audio: bytes


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    kind: Literal["configure", "clone"]
    request_id: str | None = None
    clone: _Clone | None = field(default=None, repr=False)


class Session:
    """One connection to a voxlane server. Create it with :func:`connect`.

    Attributes read from the server: :attr:`ready` (``session.ready``), :attr:`config` (the
    current configuration), :attr:`limits`, :attr:`voices` (built-in plus cloned here).
    """

    def __init__(self, url: str, headers: dict[str, str], ws_options: dict[str, Any]) -> None:
        self.url = url
        self._headers = headers
        self._ws_options = ws_options
        self._ws: Any = None
        self._proto = ClientSession()
        self.ready: SessionReady | None = None
        self.config: SessionConfig = SessionConfig()
        self.limits: Limits = Limits()
        self.voices: list[str] = []
        self._turns: dict[str, Turn] = {}
        self._pending: deque[_Pending] = deque()
        self._clones: dict[str, _Clone] = {}  # voice id -> how it was made
        self._send_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._closed_error: ConnectionClosedError | None = None
        self._fatal: VoxlaneError | None = None
        self._turn_numbers = itertools.count(1)
        self._request_numbers = itertools.count(1)
        self._last_agent_turn: Turn | None = None

    # ------------------------------------------------------------------ connection

    @property
    def session_id(self) -> str:
        """The server's id of this session (changes on :meth:`reconnect`)."""
        return self.ready.session_id if self.ready else ""

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by either side)."""
        return self._closed_error is not None

    async def _open(self, open_timeout: float) -> None:
        import websockets
        from websockets.exceptions import InvalidStatus, WebSocketException

        try:
            ws = await websockets.connect(
                self.url,
                additional_headers=self._headers,
                open_timeout=open_timeout,
                compression=None,  # PCM does not compress; deflate would only cost CPU
                **self._ws_options,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
            if status == 401:
                raise AuthenticationError(
                    f"{self.url}: the server refused the API key ({body or 'HTTP 401'})"
                ) from None
            raise ConnectionClosedError(
                f"{self.url}: the server refused the connection: HTTP {status} {body}".rstrip()
            ) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ConnectionClosedError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            first = await asyncio.wait_for(ws.recv(), open_timeout)
            if not isinstance(first, str):
                raise BadMessageError("the server's first message is binary, not session.ready")
            message = self._proto.receive_text(first)
            if isinstance(message, ErrorMessage):
                raise _error_from(message)
            if not isinstance(message, SessionReady):
                raise BadMessageError(f"expected session.ready first, got {message.type}")
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, VoxlaneError):
                raise
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectionClosedError(
                    f"{self.url}: no session.ready within {open_timeout} s"
                ) from None
            closed = _closed_error_from(ws)
            if closed is not None:
                raise closed from None
            raise
        self._ws = ws
        self._closed_error = None
        self._fatal = None
        self.ready = message
        self.config = message.config
        self.limits = message.limits
        self.voices = list(message.voices)
        self._reader = asyncio.create_task(self._read(ws), name="voxlane-reader")

    async def close(self) -> None:
        """Close the connection (code 1000). Open turns end with :class:`ConnectionClosedError`."""
        self._on_closed(
            ConnectionClosedError("the session was closed by the client", close_code=1000)
        )
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def reconnect(self, *, open_timeout: float = 10.0) -> None:
        """Open a new connection to the same server and restore what the client can.

        Restored: voices cloned through this object (cloned again under the same voice id,
        in order, which a server that caches voice prefixes makes cheap) and the last
        configuration. Lost: every turn that was open, queued or in flight (they end with
        :class:`ConnectionClosedError`), and the server's session id. The server forgets
        everything about a session when its connection drops; this is the client replaying it.
        """
        clones = list(self._clones.items())
        config = self.config
        self._on_closed(ConnectionClosedError("the session is reconnecting"))
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            if self._reader is not None:
                with contextlib.suppress(BaseException):
                    await self._reader
        self._proto = ClientSession()
        await self._open(open_timeout)
        self._clones = {}
        for voice_id, clone in clones:
            await self._clone(clone.fields | {"name": voice_id}, clone.audio)
        update = config.model_dump()
        sampling = update.pop("sampling")
        await self.configure(**update, **sampling)

    async def _read(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        closed: ConnectionClosedError | None = None
        try:
            async for message in ws:
                now = time.perf_counter()
                try:
                    if isinstance(message, str):
                        try:
                            self._dispatch(self._proto.receive_text(message))
                        except UnknownMessageError:
                            continue  # newer servers may add message types within v1
                    else:
                        self._on_audio(self._proto.receive_bytes(message), now)
                except ProtocolError as exc:
                    # The server broke the protocol (a frame out of sequence, bad JSON): the
                    # stream can no longer be trusted.
                    log.error("closing: the server broke protocol v1: %s", exc)
                    closed = ConnectionClosedError(f"the server broke protocol v1: {exc}")
                    closed.__cause__ = exc
                    await ws.close(CloseCode.POLICY_VIOLATION, "protocol error")
                    break
        except ConnectionClosed:
            pass
        except Exception as exc:  # the reader must always reach _on_closed
            log.exception("voxlane reader failed")
            closed = ConnectionClosedError(f"the connection failed: {exc}")
        if closed is None:
            closed = _closed_error_from(ws) or ConnectionClosedError("the connection closed")
        if self._ws is ws:
            self._on_closed(closed)

    def _on_closed(self, error: ConnectionClosedError) -> None:
        if self._closed_error is not None:
            return
        if self._fatal is not None and error.__cause__ is None:
            error.__cause__ = self._fatal
        self._closed_error = error
        # A fatal server error is more telling than "connection closed": deliver it first.
        failure = self._fatal or error
        for turn in list(self._turns.values()):
            if turn._feeder is not None:
                turn._feeder.cancel()  # it may be waiting on the caller's text iterator
            turn._finish(failure)
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_exception(failure)

    # ------------------------------------------------------------------ dispatching

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, AgentMessage):
            turn = self._turns.get(message.turn_id) or self._last_agent_turn
            if turn is not None and turn.turn_id == message.turn_id:
                turn.message = message
        elif isinstance(message, (TurnStarted, TurnMark, AgentTextDelta, TurnCancelled, TurnDone)):
            turn = self._turns.get(message.turn_id)
            if turn is None:
                return  # a turn this client already closed (after a connection error, say)
            if isinstance(message, TurnStarted):
                turn._on_started(message)
            elif isinstance(message, (TurnMark, AgentTextDelta)):
                turn._on_event(message)
            elif isinstance(message, TurnCancelled):
                turn._on_cancelled(message)
            else:
                turn._on_done(message)
        elif isinstance(message, SessionConfigured):
            self.config = message.config
            self._resolve("configure", None, message.config)
        elif isinstance(message, VoiceCloned):
            if message.voice_id not in self.voices:
                self.voices.append(message.voice_id)
            pending = self._take("clone", message.request_id)
            if pending is not None:
                if pending.clone is not None:
                    self._clones[message.voice_id] = pending.clone
                pending.future.set_result(message)
        elif isinstance(message, ErrorMessage):
            self._on_error_message(message)

    def _on_error_message(self, message: ErrorMessage) -> None:
        error = _error_from(message)
        if message.fatal:
            self._fatal = error  # the close that follows delivers it everywhere
            return
        if message.turn_id is not None:
            turn = self._turns.get(message.turn_id)
            if turn is not None:
                if turn.started is None:
                    # Refused: the server never opened the turn (a cancel that overtook an
                    # unsent start ends it quietly).
                    turn._finish(None if turn._cancel_requested else error)
                elif turn._cancel_requested and message.code in ("unknown_turn", "turn_closed"):
                    pass  # a cancel racing the turn's end: harmless by design
                else:
                    turn._on_error(error)
                return
        if message.request_id is not None and self._take_and_fail(
            "clone", message.request_id, error
        ):
            return
        # Errors naming nothing answer a session.configure (the only request without an id),
        # or, from servers that lose the request id, a clone.
        if self._take_and_fail("configure", None, error) or self._take_and_fail(
            "clone", None, error
        ):
            return
        log.warning("server error not tied to a request: [%s] %s", message.code, message.message)

    def _on_audio(self, chunk: Any, received_at: float) -> None:
        turn = self._turns.get(chunk.turn_id)
        if turn is None:
            return
        started = turn.started
        turn._on_event(
            AudioChunk(
                turn_id=chunk.turn_id,
                sequence=chunk.sequence,
                sample_offset=chunk.sample_offset,
                sample_rate=started.sample_rate if started else self.config.sample_rate,
                sample_format=chunk.sample_format,
                pcm=chunk.pcm,
                received_at=received_at,
            )
        )

    def _take(self, kind: str, request_id: str | None) -> _Pending | None:
        for pending in self._pending:
            if pending.kind == kind and (request_id is None or pending.request_id == request_id):
                self._pending.remove(pending)
                return pending
        return None

    def _resolve(self, kind: str, request_id: str | None, value: Any) -> None:
        pending = self._take(kind, request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_result(value)

    def _take_and_fail(self, kind: str, request_id: str | None, error: VoxlaneError) -> bool:
        pending = self._take(kind, request_id)
        if pending is None:
            return False
        if not pending.future.done():
            pending.future.set_exception(error)
        return True

    # ----------------------------------------------------------------------- sending

    def _check_connected(self) -> None:
        if self._closed_error is not None:
            error = ConnectionClosedError(
                f"the connection is closed: {self._closed_error}",
                close_code=self._closed_error.close_code,
                reason=self._closed_error.reason,
            )
            raise error from self._closed_error.__cause__

    async def _send(self, fields: dict[str, Any], binary: bytes | None = None) -> None:
        # Validate with the server's own models: the same typed errors, before any I/O. The
        # JSON itself is sent, not the model re-dumped: a re-dump would spell every unset
        # field as null, and ``"seed": null`` means "random seeds again".
        data = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
        parse_client_message(data)
        if len(data.encode()) > self.limits.max_message_bytes:
            from voxlane.errors import MessageTooLargeError

            raise MessageTooLargeError(
                f"{fields['type']} of {len(data.encode())} bytes exceeds the server's limit of "
                f"{self.limits.max_message_bytes}"
            )
        self._check_connected()
        from websockets.exceptions import ConnectionClosed

        async with self._send_lock:
            try:
                await self._ws.send(data)
                if binary is not None:
                    await self._ws.send(binary)
            except ConnectionClosed:
                self._check_connected()  # the reader has (or will have) the close reason
                raise _closed_error_from(self._ws) or ConnectionClosedError(
                    "the connection closed"
                ) from None

    def _split_text(self, text: str) -> list[str]:
        # JSON may escape a character to 6 bytes; keep every append under the message limit.
        size = max(1, (self.limits.max_message_bytes - 512) // 6)
        return [text[i : i + size] for i in range(0, len(text), size)]

    async def _request(
        self, pending: _Pending, fields: dict[str, Any], binary: bytes | None
    ) -> Any:
        # Register before sending: the answer may arrive before send() returns.
        self._pending.append(pending)
        try:
            await self._send(fields, binary)
        except BaseException:
            with contextlib.suppress(ValueError):
                self._pending.remove(pending)
            raise
        return await pending.future

    # -------------------------------------------------------------------- public API

    async def configure(
        self,
        *,
        voice: str | None = None,
        chunk_ms: int | None = None,
        sample_rate: int | None = None,
        sample_format: SampleFormat | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        max_frames: int | None = None,
        seed: int | None = _UNSET,
        context_window: int | None = None,
    ) -> SessionConfig:
        """Change the session configuration; arguments left out keep their value.

        ``seed=None`` returns to random seeds (leave it out to keep the current seed). Turns
        already started keep the configuration they started with. Returns the whole new
        configuration (also in :attr:`config`). Raises :class:`OutOfRangeError` for values
        outside the protocol's bounds and :class:`UnknownVoiceError` for an unknown voice.
        """
        fields: dict[str, Any] = {"type": "session.configure"}
        for key, value in (
            ("voice", voice),
            ("chunk_ms", chunk_ms),
            ("sample_rate", sample_rate),
            ("sample_format", sample_format),
            ("context_window", context_window),
        ):
            if value is not None:
                fields[key] = value
        sampling = {
            key: value
            for key, value in (
                ("temperature", temperature),
                ("top_p", top_p),
                ("repetition_penalty", repetition_penalty),
                ("max_frames", max_frames),
            )
            if value is not None
        }
        if seed is not _UNSET:
            sampling["seed"] = seed
        if sampling:
            fields["sampling"] = sampling
        future = asyncio.get_running_loop().create_future()
        return await self._request(_Pending(future, "configure"), fields, None)

    async def clone_voice(
        self,
        audio: str | os.PathLike[str] | bytes | np.ndarray,
        transcript: str,
        *,
        name: str | None = None,
        sample_rate: int | None = None,
    ) -> VoiceCloned:
        """Clone a voice from a short reference recording and the words spoken in it.

        ``audio`` is a path (a WAV file is sent as is; other formats are decoded with
        soundfile, from the ``audio`` extra), the bytes of a WAV file, or a mono numpy array
        (float in [-1, 1] or int16; 2-D arrays are ``(samples, channels)`` and are mixed
        down) with its ``sample_rate``. Returns ``voice.cloned``: pass its ``voice_id`` as
        ``voice`` to :meth:`configure`, :meth:`speak` or :meth:`start_turn`. Raises
        :class:`AudioFormatError` if the server cannot use the audio.
        """
        fields: dict[str, Any] = {"transcript": transcript}
        if name is not None:
            fields["name"] = name
        if isinstance(audio, (str, os.PathLike)):
            path = Path(audio)
            # File reads and decoding run in a thread: they must not stall the event loop
            # (and with it the audio of other turns).
            if path.suffix.lower() == ".wav":
                payload, fields["audio_format"] = await asyncio.to_thread(path.read_bytes), "wav"
            else:
                from voxlane.audio import read_audio

                samples, rate = await asyncio.to_thread(read_audio, path)
                payload, fields["audio_format"] = _pcm16(samples), "pcm_s16le"
                fields["sample_rate"] = rate
        elif isinstance(audio, (bytes, bytearray, memoryview)):
            payload, fields["audio_format"] = bytes(audio), "wav"
        else:
            if sample_rate is None:
                raise AudioFormatError("clone_voice from an array needs its sample_rate")
            payload, fields["audio_format"] = _pcm16(audio), "pcm_s16le"
            fields["sample_rate"] = int(sample_rate)
        if not payload:
            raise AudioFormatError("the reference audio is empty")
        return await self._clone(fields, payload)

    async def _clone(self, fields: dict[str, Any], payload: bytes) -> VoiceCloned:
        request_id = f"clone-{next(self._request_numbers)}"
        message = {
            "type": "voice.clone",
            "request_id": request_id,
            **fields,
            "audio_bytes": len(payload),
        }
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(future, "clone", request_id, _Clone(fields, payload))
        return await self._request(pending, message, payload)

    def _new_turn(self, turn_id: str | None, voice: str | None) -> Turn:
        self._check_connected()
        if turn_id is None:
            turn_id = next(f"t{n}" for n in self._turn_numbers if f"t{n}" not in self._turns)
        elif turn_id in self._turns:
            raise DuplicateTurnError(f"turn id {turn_id!r} is open on this session")
        turn = Turn(self, turn_id, voice)
        self._turns[turn_id] = turn
        return turn

    async def _send_start(self, turn: Turn, text: str, end: bool) -> None:
        fields: dict[str, Any] = {"type": "turn.start", "turn_id": turn.turn_id}
        if turn.requested_voice is not None:
            fields["voice"] = turn.requested_voice
        pieces = self._split_text(text) if text else [""]
        fields["text"] = pieces[0]
        fields["end"] = end and len(pieces) == 1
        turn.start_sent_at = time.perf_counter()
        try:
            await self._send(fields)
        except BaseException:
            self._turns.pop(turn.turn_id, None)
            raise
        turn._start_sent = True
        turn._ended = fields["end"]
        if text:
            turn._text_sent()
        for piece in pieces[1:]:
            await turn.send(piece)
        if end and not turn._ended:
            await turn.end()

    async def start_turn(
        self,
        text: str = "",
        *,
        end: bool = False,
        voice: str | None = None,
        turn_id: str | None = None,
    ) -> Turn:
        """Open a turn and wait for the server to accept it.

        ``text`` is its first text; ``end=True`` sends no more (one-shot synthesis in one
        message). ``voice`` overrides the session voice for this turn. Then call
        :meth:`Turn.send` / :meth:`Turn.feed` / :meth:`Turn.end` and iterate the turn.
        Raises :class:`UnknownVoiceError`, :class:`TooManyTurnsError`,
        :class:`DuplicateTurnError` if the server refuses it.
        """
        turn = self._new_turn(turn_id, voice)
        await self._send_start(turn, text, end)
        await turn.wait_started()
        return turn

    def speak(
        self,
        text: str | AsyncIterable[str],
        *,
        voice: str | None = None,
        turn_id: str | None = None,
    ) -> Turn:
        """Speak a string, or an async iterator of text deltas (an LLM stream), in a new turn.

        Returns the :class:`Turn` at once: iterate it for audio. Starting the turn and
        sending the text run in a background task, so text is forwarded as it arrives; a
        failure there (a refused turn, an exception from ``text``) is raised by the turn's
        iterator, and an exception from ``text`` also cancels the turn.
        """
        turn = self._new_turn(turn_id, voice)
        turn._feeder = asyncio.create_task(
            self._feed(turn, text), name=f"voxlane-feed-{turn.turn_id}"
        )
        return turn

    async def respond(
        self, text: str, *, voice: str | None = None, turn_id: str | None = None
    ) -> Turn:
        """Agent mode: add the user message ``text`` to the dialogue and speak the answer.

        The server asks its LLM (``voxlane serve --llm-url ...``) and speaks the answer as a
        new turn. Iterate the returned :class:`Turn` for :data:`TextDelta` events (the
        answer's text), marks and audio; :attr:`Turn.message` then holds what the server
        kept in the history. Barge-in: every agent turn still open is interrupted (the
        server cancels it; its iterator yields nothing more from now on). Report how much
        of it was played first (:meth:`Turn.report_playback`) so the history keeps only what
        was heard. Raises :class:`UnknownMessageError` from the turn's iterator if the
        server has no agent mode.
        """
        for open_turn in self._turns.values():
            if open_turn.agent and not open_turn.is_done:
                open_turn._cancel_requested = True
        turn = self._new_turn(turn_id, voice)
        turn.agent = True
        fields: dict[str, Any] = {"type": "agent.respond", "turn_id": turn.turn_id, "text": text}
        if voice is not None:
            fields["voice"] = voice
        turn.start_sent_at = time.perf_counter()
        try:
            await self._send(fields)
        except BaseException:
            self._turns.pop(turn.turn_id, None)
            raise
        turn._start_sent = True
        turn._ended = True  # the client sends no text into an agent turn
        turn._text_sent()
        self._last_agent_turn = turn
        return turn

    async def report_playback(self, turn_id: str, sample: int) -> None:
        """Tell the server that ``sample`` samples of turn ``turn_id`` were played.

        See :meth:`Turn.report_playback`.
        """
        await self._send({"type": "turn.playback", "turn_id": turn_id, "sample": int(sample)})

    async def _feed(self, turn: Turn, text: str | AsyncIterable[str]) -> None:
        try:
            if isinstance(text, str):
                await self._send_start(turn, text, end=True)
            else:
                await self._send_start(turn, "", end=False)
                await turn.feed(text, end=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # includes the caller's text iterator failing (an LLM error)
            if not turn._start_sent or isinstance(exc, ConnectionClosedError):
                turn._finish(exc)  # nothing more can reach the server for this turn
            elif not turn.is_done:
                turn._on_error(exc)
                await _quietly(turn.cancel())

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<voxlane.Session {self.session_id!r} {self.url} {state}>"


async def _quietly(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(VoxlaneError):
        await awaitable


def _error_from(message: ErrorMessage) -> VoxlaneError:
    cls = error_class_for_code(message.code)
    error = cls(message.message)
    if error.code != message.code:  # an unknown code keeps its name
        error.code = message.code
    return error


def _closed_error_from(ws: Any) -> ConnectionClosedError | None:
    code = getattr(ws, "close_code", None)
    if code is None:
        return None
    reason = getattr(ws, "close_reason", "") or ""
    text = f"the server closed the connection (code {code}{': ' + reason if reason else ''})"
    if code == CloseCode.UNAUTHORIZED:
        return AuthenticationError(text, close_code=code, reason=reason)
    return ConnectionClosedError(text, close_code=code, reason=reason)


def _pcm16(audio: Any) -> bytes:
    import numpy as np

    samples = np.asarray(audio)
    if samples.dtype.kind in "iu" and samples.dtype != np.int16:
        raise AudioFormatError(f"integer reference audio must be int16, not {samples.dtype}")
    if samples.ndim == 2:  # (samples, channels): mix down
        scale = 32768.0 if samples.dtype == np.int16 else 1.0
        samples = samples.astype(np.float32).mean(axis=1) / scale
    if samples.ndim != 1:
        raise AudioFormatError(
            f"reference audio must be 1-D or (samples, channels), not shape {samples.shape}"
        )
    if samples.dtype.kind == "f":
        samples = np.round(np.clip(samples, -1.0, 1.0) * 32767.0)
    return samples.astype("<i2").tobytes()


def _with_default_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"a voxlane URL starts with ws:// or wss://, not {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1/ws")
    return urlunsplit(parts)


class _Connect:
    """The value of :func:`connect`: await it, or use it with ``async with``."""

    def __init__(self, url: str, api_key: str | None, open_timeout: float, options: dict[str, Any]):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session_args = (_with_default_path(url), headers, options)
        self._open_timeout = open_timeout
        self._session: Session | None = None

    async def _connect(self) -> Session:
        session = Session(*self._session_args)
        await session._open(self._open_timeout)
        return session

    def __await__(self) -> Generator[Any, None, Session]:
        return self._connect().__await__()

    async def __aenter__(self) -> Session:
        self._session = await self._connect()
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()


def connect(
    url: str | None = None,
    *,
    api_key: str | None = None,
    open_timeout: float = 10.0,
    **websocket_options: Any,
) -> _Connect:
    """Connect to a voxlane server: ``async with voxlane.connect(url) as session:``.

    ``url`` defaults to ``$VOXLANE_URL``, then :data:`DEFAULT_URL`; a URL without a path
    gets ``/v1/ws``. ``api_key`` defaults to ``$VOXLANE_API_KEY`` and is sent as
    ``Authorization: Bearer``. ``session = await voxlane.connect(...)`` works too (then call
    :meth:`Session.close`). Extra keyword arguments go to ``websockets.connect``.

    Raises :class:`AuthenticationError` for a refused key and :class:`ConnectionClosedError`
    if the server cannot be reached or refuses the connection.
    """
    url = url or os.environ.get("VOXLANE_URL") or DEFAULT_URL
    if api_key is None:
        api_key = os.environ.get("VOXLANE_API_KEY")
    return _Connect(url, api_key, open_timeout, websocket_options)
