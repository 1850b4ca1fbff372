"""voxlane as a LiveKit Agents TTS: ``AgentSession(tts=voxlane.clients.livekit_agents.TTS(...))``.

::

    from livekit.agents import AgentSession
    from voxlane.clients.livekit_agents import TTS

    session = AgentSession(stt=..., llm=..., tts=TTS(url="ws://127.0.0.1:8765", voice="tara"))

:class:`TTS` streams: the agent pushes LLM text into a :class:`SynthesizeStream`, which feeds
it into a voxlane turn as it arrives (:meth:`voxlane.Session.speak` with an async iterator)
and pushes the turn's PCM through the ``AudioEmitter`` while it is generated. Each flush of
the input is one segment (one voxlane turn). voxlane's ``turn.mark`` events (a sentence
starts at output sample N) become timed transcripts (``TimedString`` with ``start_time``), so
``use_tts_aligned_transcript=True`` syncs the agent's transcript to sentence starts. When
the agent interrupts (``SynthesizeStream.aclose()`` cancels ``_run``), the voxlane turn is
cancelled, so the server stops generating at once.

Connections: each stream borrows a voxlane session from a small pool owned by the
:class:`TTS` (opened on demand, returned when the stream ends, closed by :meth:`TTS.aclose`),
so consecutive utterances do not pay a WebSocket handshake and concurrent streams never
queue behind each other on one session. Errors map to the Agents' ``APIError`` family:
connection failures are retryable ``APIConnectionError``, refusals (unknown voice, bad key)
are not.

Needs ``livekit-agents`` (the ``livekit`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APIStatusError,
    APITimeoutError,
    tts,
    utils,
)
from livekit.agents.types import TimedString

import voxlane
from voxlane.errors import (
    AuthenticationError,
    ConnectionClosedError,
    ModelNotFoundError,
    OutOfRangeError,
    UnknownVoiceError,
    VoxlaneError,
)

__all__ = ["TTS", "SynthesizeStream"]

log = logging.getLogger("voxlane.livekit_agents")

NUM_CHANNELS = 1


@dataclass
class _Options:
    url: str | None
    api_key: str | None
    voice: str | None
    sample_rate: int
    session_options: dict[str, Any] = field(default_factory=dict)


class TTS(tts.TTS):
    """voxlane text-to-speech for LiveKit Agents (streaming, sentence-aligned transcripts).

    ``url``/``api_key`` default to ``$VOXLANE_URL``/``$VOXLANE_API_KEY``. ``voice`` is a
    built-in or cloned voice of the server; ``sample_rate`` one of 8000, 16000, 24000 (the
    model's own rate) or 48000. Other ``voxlane.Session.configure`` options (``chunk_ms``,
    ``temperature``, ``max_frames``, ``seed``...) go in ``session_options``. ``max_idle``
    sessions are kept open between utterances.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        voice: str | None = None,
        sample_rate: int = 24000,
        session_options: dict[str, Any] | None = None,
        max_idle: int = 2,
    ) -> None:
        if sample_rate not in (8000, 16000, 24000, 48000):
            raise ValueError(f"sample_rate must be 8000, 16000, 24000 or 48000, not {sample_rate}")
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=sample_rate,
            num_channels=NUM_CHANNELS,
        )
        self._opts = _Options(url, api_key, voice, sample_rate, dict(session_options or {}))
        self._idle: list[voxlane.Session] = []
        self._max_idle = max_idle
        self._streams: set[SynthesizeStream] = set()
        self._prewarm: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def model(self) -> str:
        return "orpheus"

    @property
    def provider(self) -> str:
        return "voxlane"

    def update_options(self, *, voice: str | None = None) -> None:
        """Use ``voice`` for the utterances that start from now on."""
        if voice is not None:
            self._opts = replace(self._opts, voice=voice)

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        """One-shot synthesis (a single-segment stream underneath)."""
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> SynthesizeStream:
        stream = SynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def prewarm(self) -> None:
        """Open one voxlane session in the background, ready for the first utterance."""
        if self._prewarm is None and not self._idle:

            async def warm() -> None:
                with contextlib.suppress(Exception):
                    self._release(await self._connect(DEFAULT_API_CONNECT_OPTIONS.timeout))

            self._prewarm = asyncio.create_task(warm(), name="voxlane-tts-prewarm")

    async def aclose(self) -> None:
        """Close open streams and the pooled voxlane sessions."""
        for stream in list(self._streams):
            await stream.aclose()
        if self._prewarm is not None:
            with contextlib.suppress(BaseException):
                await self._prewarm
        idle, self._idle = self._idle, []
        for session in idle:
            await session.close()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # ------------------------------------------------------------------- sessions

    async def _connect(self, timeout: float) -> voxlane.Session:
        opts = self._opts
        session = await voxlane.connect(opts.url, api_key=opts.api_key, open_timeout=timeout)
        try:
            await session.configure(
                sample_rate=opts.sample_rate, sample_format="pcm_s16le", **opts.session_options
            )
        except BaseException:
            await session.close()
            raise
        return session

    async def _acquire(self, timeout: float) -> voxlane.Session:
        while self._idle:
            session = self._idle.pop()
            if not session.closed:
                return session
        return await self._connect(timeout)

    def _release(self, session: voxlane.Session) -> None:
        if session.closed:
            return
        if len(self._idle) < self._max_idle:
            self._idle.append(session)
        else:
            task = asyncio.create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


def _api_error(exc: VoxlaneError) -> APIError:
    """The Agents error for a voxlane error: retryable unless retrying cannot help."""
    if isinstance(exc, AuthenticationError):
        return APIStatusError(str(exc), status_code=401, retryable=False)
    if isinstance(exc, ConnectionClosedError):
        return APIConnectionError(f"voxlane: {exc}")
    refused = (UnknownVoiceError, OutOfRangeError, ModelNotFoundError)
    return APIError(f"voxlane [{exc.code}]: {exc}", retryable=not isinstance(exc, refused))


class SynthesizeStream(tts.SynthesizeStream):
    """Text in (``push_text``/``flush``/``end_input``), ``SynthesizedAudio`` out.

    Each segment (the text up to a flush) is one voxlane turn; :attr:`turns` lists them
    (the last one is the turn speaking now).
    """

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._voxlane_tts = tts
        self.turns: list[voxlane.Turn] = []
        """The voxlane turns of this stream, in order."""

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            self._voxlane_tts._streams.discard(self)

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        owner = self._voxlane_tts
        rate = owner.sample_rate
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=rate,
            num_channels=NUM_CHANNELS,
            mime_type="audio/pcm",
            frame_size_ms=40,
            stream=True,
        )
        inputs = self._input_ch  # read now: a retry replaces it with a fresh channel
        session: voxlane.Session | None = None
        turn: voxlane.Turn | None = None
        offset_s = 0.0  # where this segment starts in the stream's audio
        try:
            try:
                session = await owner._acquire(self._conn_options.timeout)
            except TimeoutError as exc:
                raise APITimeoutError(f"voxlane: {exc}") from exc
            while True:
                first = await _next_text(inputs)
                if first is None:
                    break
                turn = session.speak(_segment(first, inputs), voice=owner._opts.voice)
                self.turns.append(turn)
                output_emitter.start_segment(segment_id=turn.turn_id)
                self._mark_started()
                samples = 0
                async for event in turn:
                    if isinstance(event, voxlane.AudioChunk):
                        output_emitter.push(event.pcm)
                        samples += event.num_samples
                    elif isinstance(event, voxlane.Mark):
                        text = event.text if event.segment == 0 else " " + event.text
                        start = offset_s + event.sample / rate
                        output_emitter.push_timed_transcript(TimedString(text, start_time=start))
                output_emitter.end_segment()
                offset_s += samples / rate
                turn = None
        except VoxlaneError as exc:
            raise _api_error(exc) from exc
        finally:
            if turn is not None and not turn.is_done and session is not None:
                # Interrupted by the agent (or failed): stop the server generating now.
                with contextlib.suppress(VoxlaneError, asyncio.CancelledError):
                    await asyncio.shield(turn.cancel())
            if session is not None:
                owner._release(session)


async def _next_text(inputs: Any) -> str | None:
    """The first non-empty text of the next segment; None when the input has ended."""
    async for item in inputs:
        if isinstance(item, str) and item:
            return item
    return None


async def _segment(first: str, inputs: Any) -> AsyncIterator[str]:
    """The text of one segment: ``first``, then what is pushed until the next flush."""
    yield first
    async for item in inputs:
        if not isinstance(item, str):  # the flush sentinel: the segment is complete
            return
        yield item
