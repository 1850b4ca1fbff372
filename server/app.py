"""The voxlane WebSocket server (protocol v1, see docs/protocol.md).

Layers, outermost first:

* :class:`VoxlaneServer` owns the listening socket (``websockets`` asyncio API), the HTTP
  endpoints (``/healthz``, ``/metrics``), authentication on the handshake, the session limit
  and graceful shutdown.
* :class:`_Connection` is one WebSocket: it feeds received messages to the sans-I/O
  :class:`~voxlane.session_protocol.ServerSession`, runs the commands it returns, and is the
  only writer of the socket (the session's outbound queue is sent strictly in order, which is
  what guarantees no audio of a cancelled turn follows its ``turn.cancelled``).
* :class:`~voxlane.server.pipeline.TurnPipeline` speaks one turn, and
  :class:`SpeechService` holds what all sessions share: the engine (its own thread), the SNAC
  codec and the codec thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import http
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np

from voxlane.errors import (
    AudioFormatError,
    EngineError,
    OutOfRangeError,
    ShuttingDownError,
    VoxlaneError,
)
from voxlane.protocol import (
    BUILTIN_VOICES,
    CloseCode,
    Limits,
    SessionConfig,
)
from voxlane.server.agent import AgentResponse, LLMClient, LLMConfig
from voxlane.server.metrics import ServerMetrics
from voxlane.server.pipeline import AudioChunk, SegmentMark, TurnPipeline
from voxlane.server.text.cleaner import clean_text
from voxlane.server.text.segmenter import Segmenter
from voxlane.session_protocol import (
    AppendText,
    CancelTurn,
    CloneVoice,
    CloseConnection,
    Command,
    ConfigureSession,
    EndTurn,
    FlushTurn,
    ServerSession,
    StartAgentResponse,
    StartTurn,
)

__all__ = ["DecoderSettings", "ServerConfig", "SpeechService", "VoxlaneServer"]

log = logging.getLogger("voxlane.server")


@dataclass(frozen=True)
class DecoderSettings:
    """Streaming SNAC decoder settings.

    ``mode="exact"`` (default): :class:`voxlane.server.snac_stream.ExactStreamingDecoder`,
    layer-by-layer incremental decoding equal to a full decode, batched across the turns of the
    service (first audio after 3 frames); ``frames_per_call`` caps one stream's decode call.
    ``mode="window"``: :class:`voxlane.server.codec.StreamingDecoder` with ``left`` and
    ``lookahead`` context frames per call (lookahead 0 gives first audio after 1 frame, at
    ~30 dB of a full decode; see ``codec.LOW_LATENCY_STREAMING``), one stream per call.
    """

    mode: Literal["exact", "window"] = "exact"
    left: int = 2
    lookahead: int = 2
    frames_per_call: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "window"):
            raise OutOfRangeError(f"decoder mode {self.mode!r} is not 'exact' or 'window'")


@dataclass
class ServerConfig:
    """Options of :class:`VoxlaneServer` (``voxlane serve`` sets them from flags)."""

    host: str = "127.0.0.1"
    port: int = 8765
    api_keys: tuple[str, ...] = ()
    """Accepted API keys. Empty *and* ``auth=False`` is the only way to serve without auth."""
    auth: bool = True
    max_sessions: int = 64
    """Open WebSocket sessions; beyond it the handshake is refused with HTTP 503. A session
    costs little until it speaks; turns beyond what the speech LM keeps real time are queued
    by admission (``EngineConfig.admission``), not refused here."""
    limits: Limits = field(default_factory=Limits)
    default_config: SessionConfig = field(default_factory=SessionConfig)
    send_timeout_s: float = 20.0
    """A client that stops reading for this long is closed (``CloseCode.SLOW_CONSUMER``, 4008)."""
    close_timeout_s: float = 10.0
    """How long such a client gets to read up to its 4008 close frame (queued behind the audio
    it did not read) before the TCP connection is cut; a close frame that never got through
    is logged and counted (``voxlane_close_undelivered_total``)."""
    drain_timeout_s: float = 10.0
    """Graceful shutdown (:meth:`VoxlaneServer.close`): how long active turns may go on
    finishing while new sessions and turns are refused; what still speaks then ends with
    ``turn.done`` (reason ``error``, code ``shutting_down``) before the 1001 close."""
    send_buffer_bytes: int | None = None
    """Kernel send buffer (``SO_SNDBUF``) of each connection; None keeps the OS default (up to
    megabytes on loopback). A small one bounds the audio in flight, so a client that stops
    reading is noticed sooner."""
    decoder: DecoderSettings = field(default_factory=DecoderSettings)
    llm: LLMConfig | None = None
    """Upstream LLM of agent mode (``agent.respond``); None turns agent mode off."""

    def __post_init__(self) -> None:
        if self.auth and not self.api_keys:
            raise ValueError(
                "auth is on but no API key is configured: pass --api-key KEY (or set "
                "$VOXLANE_API_KEYS; ServerConfig(api_keys=...)), or disable auth explicitly "
                "(--no-auth; ServerConfig(auth=False))"
            )


CLOSE_SLOW_CONSUMER = CloseCode.SLOW_CONSUMER  # kept for importers of the old name


class SpeechService:
    """What every session shares: the speech LM engine, the SNAC codec and the codec thread.

    Build it with :meth:`load` (real or demo checkpoints) or from parts in tests.
    """

    def __init__(
        self,
        engine: Any,
        codec: Any,
        *,
        decode_workers: int = 1,
        codec_threads: int | None = None,
        codec_precision: str = "float32",
        snac_program: Any = None,
    ) -> None:
        """``codec_threads``: torch intra-op threads of the codec thread (None: torch's
        default). On a small CPU box shared with the engine thread, 1 avoids OpenMP workers of
        the two threads spinning against each other. ``codec_precision``: the
        :class:`~voxlane.server.snac_stream.SnacProgram` ``precision`` of exact decoding.
        ``snac_program``: the exact decoder's program if already built (:meth:`load` passes a
        :class:`~voxlane.server.snac_worker.SnacWorkerProgram`); None builds a
        :class:`~voxlane.server.snac_stream.SnacProgram` in this process on first use."""
        self.engine = engine
        self.codec = codec
        self.codec_precision = codec_precision
        # One codec thread: decodes of all streams queue here instead of fighting for cores.
        self.codec_executor = ThreadPoolExecutor(
            decode_workers,
            thread_name_prefix="voxlane-codec",
            initializer=_set_torch_threads if codec_threads else None,
            initargs=(codec_threads,) if codec_threads else (),
        )
        self._snac_program: Any = snac_program
        self._decode_batcher: Any = None

    @classmethod
    def load(
        cls,
        model: str,
        codec: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        engine_config: Any = None,
        codec_threads: int | None = None,
        codec_worker: Literal["process", "thread"] = "process",
        codec_precision: Literal["float32", "bfloat16"] = "float32",
    ) -> SpeechService:
        """Load the speech LM and SNAC from hub ids or local directories and start the engine.

        ``engine_config.num_threads`` and ``codec_threads`` set the torch threads of the
        engine thread and of the codec (thread or process). On CPU, unset they default to one
        thread for the codec and the other cores for the engine: both sides spinning OpenMP
        threads on the same cores cost far more than they give (measured on 2 cores: the
        demo turn ran at 1.7x real time with torch's defaults). ``codec_worker="process"``
        (default): exact streaming decoding runs in a child process
        (:class:`~voxlane.server.snac_worker.SnacWorkerProgram`, started here, while the LM
        loads), so its many short torch calls never contend for this process's GIL with the
        engine and the event loop; ``"thread"`` runs it on the codec thread of this process.
        ``codec_precision``: ``"bfloat16"`` runs the exact decoder's GEMMs in bfloat16 (faster
        on CPUs with AMX and on GPUs; ~40 dB from the float32 decode)."""
        from voxlane.server.codec import load_snac
        from voxlane.server.engine import EngineConfig
        from voxlane.server.engine.engine import SpeechEngine
        from voxlane.server.lm import load_speech_lm

        if codec_worker not in ("process", "thread"):
            raise OutOfRangeError(f"codec_worker {codec_worker!r} is not 'process' or 'thread'")
        import torch

        if torch.device(device).type == "cpu":
            if codec_threads is None:
                codec_threads = 1
            engine_config = engine_config or EngineConfig()
            if engine_config.num_threads is None:
                cores = max(1, (os.cpu_count() or 2) - codec_threads)
                engine_config = dataclasses.replace(engine_config, num_threads=cores)
        snac = load_snac(codec, device=device)
        program: Any = None
        with ThreadPoolExecutor(1, thread_name_prefix="voxlane-load") as pool:
            worker = None
            if codec_worker == "process":  # the child starts while the LM loads
                worker = pool.submit(_start_worker, codec, snac, codec_threads, codec_precision)
            try:
                lm = load_speech_lm(model, dtype=dtype, device=device)
                engine = SpeechEngine(lm, engine_config)
            except BaseException:
                if worker is not None and worker.exception() is None and worker.result():
                    worker.result().close()
                raise
            if worker is not None:
                program = worker.result()
        engine.start()
        service = cls(
            engine,
            snac,
            codec_threads=codec_threads,
            codec_precision=codec_precision,
            snac_program=program,
        )
        service.snac_program  # built now, at startup, not by the first turn  # noqa: B018
        return service

    @property
    def snac_program(self) -> Any:
        """The codec as a :class:`~voxlane.server.snac_stream.SnacProgram` (built once; None
        for a SNAC variant it cannot stream, which then decodes with the window decoder)."""
        if self._snac_program is None:
            from voxlane.errors import ModelFormatError
            from voxlane.server.snac_stream import SnacProgram

            try:
                self._snac_program = SnacProgram(self.codec, precision=self.codec_precision)
            except ModelFormatError as exc:
                log.warning("exact streaming decode unavailable, using the window decoder: %s", exc)
                self._snac_program = False
        return self._snac_program or None

    @property
    def decode_batcher(self) -> Any:
        """The :class:`~voxlane.server.snac_stream.DecodeBatcher` of the codec thread: exact
        decoders of all turns decode in shared batches (None without a :attr:`snac_program`)."""
        if self._decode_batcher is None and self.snac_program is not None:
            from voxlane.server.snac_stream import DecodeBatcher

            self._decode_batcher = DecodeBatcher(self.snac_program, self.codec_executor)
        return self._decode_batcher

    def new_decoder(self, settings: DecoderSettings) -> Any:
        """A fresh streaming decoder for one segment."""
        from voxlane.server.codec import StreamingDecoder

        if settings.mode == "exact" and self.snac_program is not None:
            from voxlane.server.snac_stream import ExactStreamingDecoder

            return ExactStreamingDecoder(
                self.snac_program, frames_per_call=settings.frames_per_call
            )
        return StreamingDecoder(
            self.codec,
            left=settings.left,
            lookahead=settings.lookahead,
            frames_per_call=settings.frames_per_call,
        )

    async def clone(self, command: CloneVoice, max_seconds: float) -> tuple[str, Any, float]:
        """Encode reference audio (codec thread) and prefill its voice prefix (engine thread).

        Returns ``(voice_id, voice, duration_s)``. Voices belong to the session that cloned
        them; the engine caches prefixes by content, so the same reference cloned again (after
        a reconnect, say) reuses the prefilled prefix instead of computing it again.
        """
        # The transcript is text of the prompt like a turn's: markup and emoji are not words
        # of the recording.
        transcript = clean_text(command.transcript)
        if not transcript:
            raise OutOfRangeError("voice.clone: the transcript holds no speakable text")
        loop = asyncio.get_running_loop()
        frames, duration = await loop.run_in_executor(
            self.codec_executor, self._encode_reference, command, max_seconds
        )
        if not frames:
            raise AudioFormatError("reference audio is too short to hold one frame (85 ms)")
        voice = await self.engine.clone_voice(transcript, frames)
        digest = hashlib.sha256(repr((transcript, frames)).encode()).hexdigest()[:12]
        return command.name or f"clone-{digest}", voice, duration

    def _encode_reference(self, command: CloneVoice, max_seconds: float) -> tuple[list, float]:
        from voxlane.server.codec import read_reference
        from voxlane.server.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME

        samples, rate = read_reference(
            command.audio, command.audio_format, command.sample_rate, max_seconds=max_seconds
        )
        frames = self.codec.encode_array(samples, rate, max_seconds=max_seconds)
        return frames, len(frames) * SAMPLES_PER_FRAME / SAMPLE_RATE

    async def aclose(self) -> None:
        """Stop the engine thread, the codec thread and the codec process (if any)."""
        await self.engine.aclose()
        # Waiting for a decode in progress must not block the event loop.
        await asyncio.to_thread(self.codec_executor.shutdown, wait=True, cancel_futures=True)
        close = getattr(self._snac_program, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


def _start_worker(source: str, codec: Any, threads: int | None, precision: str) -> Any:
    """The codec process for :meth:`SpeechService.load`, or False for a SNAC that cannot be
    decoded exactly (the service then uses the window decoder, with a warning)."""
    from voxlane.errors import ModelFormatError
    from voxlane.server.snac_worker import SnacWorkerProgram

    try:
        return SnacWorkerProgram(source, codec, threads=threads, precision=precision)
    except ModelFormatError as exc:
        log.warning("exact streaming decode unavailable, using the window decoder: %s", exc)
        return False


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _to_wire(pcm: np.ndarray, sample_format: str) -> bytes:
    if sample_format == "pcm_f32le":
        return np.ascontiguousarray(pcm, dtype="<f4").tobytes()
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class _ActiveTurn:
    def __init__(self, turn_id: str, pipeline: TurnPipeline, engine_session: Any) -> None:
        self.turn_id = turn_id
        self.pipeline = pipeline
        self.engine_session = engine_session
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.stop_error: VoxlaneError | None = None  # why the server stopped it (drain timeout)
        self.agent: AgentResponse | None = None  # agent mode: the LLM stream feeding this turn


class _Connection:
    """One WebSocket session: reader, the single writer, and the active turn."""

    def __init__(self, server: VoxlaneServer, ws: Any) -> None:
        self.server = server
        self.service = server.service
        self.ws = ws
        cfg = server.config
        self.session = ServerSession(
            limits=cfg.limits,
            config=cfg.default_config,
            voices=BUILTIN_VOICES,
            server="voxlane",
            agent=cfg.llm.agent_options() if cfg.llm is not None else None,
        )
        self.voices: dict[str, Any] = {}  # this session's cloned voices: id -> engine voice
        self.turn: _ActiveTurn | None = None
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dead = False  # the socket is closed or being dropped: nothing more is sent

    # -- writer ---------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Send everything the session queued, in order; drop clients that stop reading.

        ``ws.send`` waits while the socket's write buffer is full, so a client that stops
        reading stalls this coroutine, hence its turn's pipeline, hence its generation. After
        ``send_timeout_s`` of that the connection is dropped with close code 4008.
        """
        from websockets.exceptions import ConnectionClosed

        async with self._write_lock:
            items = self.session.data_to_send()
            for item in items:
                if self.dead:
                    return
                try:
                    await asyncio.wait_for(self.ws.send(item), self.server.config.send_timeout_s)
                except ConnectionClosed:
                    self.dead = True
                except (TimeoutError, asyncio.TimeoutError):  # distinct types on 3.10
                    log.warning("dropping a session whose client stopped reading")
                    self.server.metrics.errors.labels("slow_consumer").inc()
                    self.dead = True
                    self._spawn(self._drop(CLOSE_SLOW_CONSUMER, "client stopped reading"))

    async def _drop(self, code: int, reason: str) -> None:
        """Close with ``code`` a client that stopped reading.

        The close frame queues behind the audio the client has not read, so it gets through
        only if the client reads again: it gets ``close_timeout_s`` to do so. Then the TCP
        connection is cut, and a close code that never reached the client is logged and
        counted (the client sees 1006)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), self.server.config.close_timeout_s)
        if self.ws.protocol.close_rcvd is None:  # the client never answered: it never read it
            log.warning("close code %d did not reach a client that stopped reading", code)
            self.server.metrics.close_undelivered.labels(str(int(code))).inc()
        self.ws.transport.abort()

    # -- reader ---------------------------------------------------------------------------------

    async def serve(self) -> None:
        from websockets.exceptions import ConnectionClosed

        await self.flush()  # session.ready
        try:
            async for message in self.ws:
                if isinstance(message, str):
                    commands = self.session.receive_text(message)
                else:
                    commands = self.session.receive_bytes(message)
                for command in commands:
                    await self.run(command)
                await self.flush()
                if self.session.closed:
                    break
        except ConnectionClosed:
            pass  # the client went away (or closed with an error code): not a server crash
        finally:
            for command in self.session.connection_lost():
                await self.run(command)
            await self._drain_tasks()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain_tasks(self) -> None:
        if self.turn is not None and self.turn.task is not None:
            await self._cancel_turn()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- commands -------------------------------------------------------------------------------

    async def run(self, command: Command) -> None:
        """Carry out one command of the session core."""
        if isinstance(command, CancelTurn):
            if self.turn is not None and self.turn.turn_id == command.turn_id:
                await self._cancel_turn()
        elif isinstance(command, CloseConnection):
            await self.flush()
            self.dead = True
            await self.ws.close(command.code, command.reason)
        else:
            self._run_now(command)

    def _run_now(self, command: Command) -> None:
        """Carry out a command that needs no waiting (everything but cancel and close)."""
        if isinstance(command, StartTurn):
            self._start_turn(command)
        elif isinstance(command, AppendText):
            if self.turn is not None and self.turn.turn_id == command.turn_id:
                self.turn.pipeline.push_text(command.text)
        elif isinstance(command, FlushTurn):
            if self.turn is not None and self.turn.turn_id == command.turn_id:
                self.turn.pipeline.flush_text()
        elif isinstance(command, EndTurn):
            if self.turn is not None and self.turn.turn_id == command.turn_id:
                self.turn.pipeline.end_text()
        elif isinstance(command, CloneVoice):
            self._spawn(self._clone(command))
        elif isinstance(command, StartAgentResponse):
            self._start_agent(command)
        elif isinstance(command, ConfigureSession):
            pass  # the session core keeps the configuration; turns snapshot it at start

    async def _clone(self, command: CloneVoice) -> None:
        try:
            voice_id, voice, duration = await self.service.clone(
                command, self.server.config.limits.max_clone_seconds
            )
        except VoxlaneError as exc:
            self.server.metrics.errors.labels(exc.code).inc()
            self.session.clone_failed(command, exc)
        except Exception as exc:
            log.exception("voice clone failed")
            error = EngineError(f"voice clone failed: {exc}")
            self.server.metrics.errors.labels(error.code).inc()
            # The request id lets the client fail the clone it is waiting for (without it an
            # error naming nothing is taken as the answer to a pending session.configure).
            self.session.clone_failed(command, error)
        else:
            self.voices[voice_id] = voice
            self.session.voice_cloned(command.request_id, voice_id, duration, name=command.name)
        await self.flush()

    def _start_turn(self, command: StartTurn) -> None:
        from voxlane.server.engine.config import SamplingParams as EngineSampling

        config = command.config
        if self.server.draining:
            self._fail_start(
                command.turn_id,
                ShuttingDownError("the server is shutting down: no new turns; reconnect later"),
            )
            return
        try:
            voice = self.voices.get(config.voice) or self.service.engine.builtin_voice(config.voice)
            # One engine session per turn: ``context_window`` keeps earlier segments *of the
            # same turn* as context (protocol v1), so a turn never hears the previous one.
            engine_session = self.service.engine.open_session(
                voice, window_segments=config.context_window
            )
        except VoxlaneError as exc:
            self._fail_start(command.turn_id, exc)
            return
        s = config.sampling
        params = EngineSampling(
            temperature=s.temperature,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            max_frames=s.max_frames,
            seed=s.seed,
        )
        settings = self.server.config.decoder
        pipeline = TurnPipeline(
            speak=lambda text: engine_session.generate(
                text, params, playback=pipeline.playback_ahead_s
            ),
            new_decoder=lambda: self.service.new_decoder(settings),
            decode_executor=self.service.codec_executor,
            decode_batcher=self.service.decode_batcher if settings.mode == "exact" else None,
            segmenter=Segmenter(),
            chunk_ms=config.chunk_ms,
            sample_rate=config.sample_rate,
        )
        turn = _ActiveTurn(command.turn_id, pipeline, engine_session)
        self.turn = turn
        turn.task = self._spawn(self._pump(turn, config.sample_format))

    def _start_agent(self, command: StartAgentResponse) -> None:
        """Agent mode: the active turn's text comes from the LLM (see server/agent.py)."""
        turn, llm = self.turn, self.server.llm
        if turn is None or turn.turn_id != command.turn_id or llm is None:
            return  # the turn could not start (already reported)
        turn.agent = AgentResponse(
            llm,
            self.session,
            turn.pipeline,
            command,
            flush=self.flush,
            max_chars=self.server.config.limits.max_turn_chars,
        )
        turn.agent.task = self._spawn(turn.agent.run())

    def _fail_start(self, turn_id: str, error: VoxlaneError) -> None:
        """A turn that could not start is done at once (``error`` + ``turn.done``)."""
        log.warning("turn %s could not start: %s", turn_id, error)
        self.server.metrics.errors.labels(error.code).inc()
        self.server.metrics.turns.labels("error").inc()
        for command in self.session.turn_done(turn_id, error=error):
            self._run_now(command)
        self._spawn(self.flush())

    async def _pump(self, turn: _ActiveTurn, sample_format: str) -> None:
        """Send a turn's marks and audio, then report it done."""
        error: VoxlaneError | None = None
        try:
            async for item in turn.pipeline.events():
                if isinstance(item, AudioChunk):
                    self.session.send_audio(turn.turn_id, _to_wire(item.pcm, sample_format))
                elif isinstance(item, SegmentMark):
                    self.session.send_mark(
                        turn.turn_id,
                        start=item.text_start,
                        end=item.text_end,
                        text=item.text,
                        sample=item.sample_offset,
                    )
                await self.flush()
        except asyncio.CancelledError:
            if not turn.cancelled:
                raise
        except VoxlaneError as exc:
            error = exc
        except Exception as exc:
            log.exception("turn %s failed", turn.turn_id)
            error = EngineError(f"turn failed: {exc}")
        if turn.cancelled and turn.stop_error is not None:
            error = turn.stop_error  # stopped by the server (drain), not by the client
        self._finish_turn(turn, error)
        await self.flush()

    def _finish_turn(self, turn: _ActiveTurn, error: VoxlaneError | None) -> None:
        if self.turn is not turn:
            return
        self.turn = None
        if turn.agent is not None:
            if error is None:
                error = turn.agent.error  # the LLM failed: what it sent was still spoken
            elif turn.agent.task is not None and not turn.agent.task.done():
                # The turn failed while the LLM still streams: close the upstream request now
                # rather than at its next delta (a slow LLM could hold it for timeout_s).
                turn.agent.task.cancel()
        turn.engine_session.close()  # frees its cache; its stream already ended or was aborted
        self.server._turn_ended.set()  # a drain waits for this
        m = turn.pipeline.metrics
        self.server.metrics.observe_turn(m, error)
        if self.session.closed:
            with contextlib.suppress(VoxlaneError):
                self.session.turn_done(turn.turn_id)
            return
        commands = self.session.turn_done(
            turn.turn_id,
            time_to_first_audio_s=m.ttfa_s,
            generation_s=m.generation_s,
            underruns=m.underruns,
            error=error,
        )
        # The next queued turn starts now, before the reader handles another message: run in
        # spawned tasks, its StartTurn could come after a turn.append the session core already
        # routed to it, and that text would be lost.
        for command in commands:
            self._run_now(command)

    async def stop_turn(self, error: VoxlaneError) -> None:
        """End the active turn early on the server's behalf: ``error`` and ``turn.done``
        (reason ``error``) are sent, and the session's queued turns start (and are refused if
        the server is draining)."""
        if self.turn is not None:
            self.turn.stop_error = error
            await self._cancel_turn()
            await self.flush()

    @property
    def speaking(self) -> bool:
        """True while a turn is active or queued."""
        return self.turn is not None or bool(self.session.open_turns)

    async def _cancel_turn(self) -> None:
        turn = self.turn
        if turn is None:
            return
        turn.cancelled = True
        if turn.agent is not None:
            await turn.agent.cancel()  # closes the upstream HTTP request
        await turn.pipeline.cancel()
        if turn.task is not None and turn.task is not asyncio.current_task():
            await asyncio.gather(turn.task, return_exceptions=True)


class VoxlaneServer:
    """Serve protocol v1 over WebSocket on ``config.host:config.port``.

    ``async with VoxlaneServer(service, config) as server:`` binds (``server.port`` is the
    real port when 0 was asked for) and closes gracefully on exit.
    """

    def __init__(self, service: SpeechService, config: ServerConfig | None = None) -> None:
        self.service = service
        self.config = config or ServerConfig()
        self.metrics = ServerMetrics()
        self.llm = LLMClient(self.config.llm) if self.config.llm is not None else None
        self._connections: set[_Connection] = set()
        self._server: Any = None
        self._shutting_down = False
        self._turn_ended = asyncio.Event()
        self.port: int | None = None

    async def start(self) -> None:
        """Bind and start accepting connections."""
        from websockets.asyncio.server import serve

        limits = self.config.limits
        max_size = max(limits.max_message_bytes, limits.max_clone_bytes) + 1024
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=max_size,
            compression=None,  # audio does not compress; deflate costs CPU on the hot path
            server_header="voxlane",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("voxlane listening on ws://%s:%s", self.config.host, self.port)

    async def __aenter__(self) -> VoxlaneServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Run until cancelled."""
        if self._server is None:
            await self.start()
        await self._server.serve_forever()

    @property
    def draining(self) -> bool:
        """True once :meth:`close` began: ``/healthz`` and new handshakes answer 503, new turns
        are refused with ``shutting_down``."""
        return self._shutting_down

    async def close(self, *, close_service: bool = False) -> None:
        """Drain, then end every session with 1001 (going away) and wait for them.

        The drain: ``/healthz`` and new handshakes answer 503 (the listener stays open, so a
        load balancer sees the instance leave rather than a refused connection), new turns are
        refused with ``shutting_down``, and active turns may finish for up to
        ``config.drain_timeout_s``. A turn still speaking then ends with ``turn.done`` (reason
        ``error``, code ``shutting_down``)."""
        self._shutting_down = True
        await self._drain(self.config.drain_timeout_s)
        stop = ShuttingDownError(
            f"the server shut down before the turn finished (drain timeout"
            f" {self.config.drain_timeout_s:g} s)"
        )
        if self._server is not None:
            self._server.close(close_connections=False)

        async def going_away(conn: _Connection) -> None:
            await conn.stop_turn(stop)
            for command in conn.session.close(CloseCode.GOING_AWAY, "server shutting down"):
                await conn.run(command)

        async def bounded(conn: _Connection) -> None:
            # A client that stopped reading would hold its writer for send_timeout_s and its
            # close handshake after that: it gets close_timeout_s, then it is cut. Cutting
            # (not cancelling) ends the blocked sends, so the session then ends as usual.
            task = asyncio.ensure_future(going_away(conn))
            done, _ = await asyncio.wait({task}, timeout=self.config.close_timeout_s)
            if not done:
                log.warning("close code 1001 did not reach a client that stopped reading")
                self.metrics.close_undelivered.labels(str(int(CloseCode.GOING_AWAY))).inc()
                conn.ws.transport.abort()
            await task

        # Concurrently: one client slow to answer the close handshake must not delay the rest.
        await asyncio.gather(*(bounded(c) for c in list(self._connections)), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self.llm is not None:
            await self.llm.aclose()
        if close_service:
            await self.service.aclose()

    async def _drain(self, timeout: float) -> None:
        """Wait until no session has an active or queued turn, or ``timeout`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(c.speaking for c in self._connections):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._turn_ended.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # distinct on 3.10
                await asyncio.wait_for(self._turn_ended.wait(), remaining)

    # -- HTTP side ----------------------------------------------------------------------------

    def _authorized(self, request: Any) -> bool:
        if not self.config.auth:
            return True
        supplied: list[str] = []
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            supplied.append(header[7:].strip())
        if api_key := request.headers.get("X-API-Key"):
            supplied.append(api_key.strip())
        supplied += parse_qs(urlsplit(request.path).query).get("token", [])
        return any(
            hmac.compare_digest(s.encode(), k.encode())
            for s in supplied
            for k in self.config.api_keys
        )

    def _process_request(self, connection: Any, request: Any) -> Any:
        path = urlsplit(request.path).path
        if path == "/healthz":
            if self._shutting_down:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/metrics":
            response = connection.respond(http.HTTPStatus.OK, self.metrics.render())
            response.headers["Content-Type"] = self.metrics.content_type
            return response
        if not self._authorized(request):
            self.metrics.errors.labels("unauthorized").inc()
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if self._shutting_down:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        if len(self._connections) >= self.config.max_sessions:
            self.metrics.errors.labels("too_many_sessions").inc()
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "too many sessions, retry later\n"
            )
        return None

    async def _handle(self, ws: Any) -> None:
        if self.config.send_buffer_bytes is not None:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        conn = _Connection(self, ws)
        self._connections.add(conn)
        self.metrics.sessions.inc()
        started = time.monotonic()
        try:
            await conn.serve()
        except Exception:
            log.exception("session crashed")
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._connections.discard(conn)
            self.metrics.sessions.dec()
            self.metrics.session_seconds.observe(time.monotonic() - started)
