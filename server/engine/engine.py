"""The async front end of the speech LM engine.

Usage::

    engine = SpeechEngine(lm, EngineConfig())         # lm: voxlane.server.lm.SpeechLM
    engine.start()
    voice = engine.builtin_voice("tara")              # or: await engine.clone_voice(text, frames)
    session = engine.open_session(voice, window_segments=4)
    async for frame in session.generate("Hello there.", SamplingParams(seed=1)):
        ...                                           # frame: 7 SNAC codes
    session.close()
    await engine.aclose()

The model runs in one engine thread (:class:`~voxlane.server.engine.core.EngineCore`); nothing
here blocks the event loop. Frames reach each stream through its own ``asyncio.Queue`` via
``loop.call_soon_threadsafe``. Cancelling the consuming task, calling :meth:`FrameStream.cancel`
or closing the stream aborts the segment before its next step and rolls it back from the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from voxlane.errors import EngineError, OverloadedError
from voxlane.server.orpheus import Frame, TextEncoder

from .config import EngineConfig, SamplingParams
from .core import EngineCore, Finished, FinishReason, Request, SessionState
from .model import StepModel
from .sampling import segment_seed
from .voices import Voice

__all__ = ["FrameStream", "Session", "SpeechEngine", "SpeechLMLike"]


class SpeechLMLike(Protocol):
    """What the engine needs from :class:`voxlane.server.lm.SpeechLM`."""

    model: torch.nn.Module

    def encode(self, text: str) -> list[int]: ...


class _Progress:
    """Frames a stream's consumer has taken, shared with the engine thread for flow control
    (not the stream itself, so a dropped stream can still be collected and abort)."""

    def __init__(self) -> None:
        self.taken = 0
        self.generated: Callable[[], int] = lambda: 0

    def read(self) -> int:
        return self.taken


class FrameStream:
    """Async iterator over the frames of one segment.

    Ends normally on END_OF_SPEECH, ``max_frames`` or the text cap
    (``EngineConfig.segment_frame_cap``; see :attr:`finish_reason`); raises
    :class:`~voxlane.errors.EngineError` if the engine failed on this segment.
    """

    def __init__(self, engine: SpeechEngine, request_id: int, seed: int | None = None) -> None:
        self._engine = engine
        self.request_id = request_id
        #: This segment's seed (from ``SamplingParams.seed`` and the segment's index in its
        #: session), None when unseeded: SNAC's noise is seeded with it too (the pipeline).
        self.seed = seed
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False
        #: ``"eos" | "max_frames" | "text_cap" | "cancelled" | "error"`` once it ended.
        self.finish_reason: FinishReason | None = None
        self.frames = 0
        self._progress = _Progress()

    def _put(self, item: Any) -> None:  # event-loop thread
        self._queue.put_nowait(item)

    def __aiter__(self) -> FrameStream:
        return self

    async def __anext__(self) -> Frame:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, Finished):
            self._done = True
            self.finish_reason = item.reason
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            self.finish_reason = "error"
            raise item
        self.frames += 1
        limit = self._engine.config.max_frames_ahead
        self._progress.taken = self.frames
        if limit is not None and self._progress.generated() - self.frames == limit - 1:
            self._engine._core.wake()  # the request may have been paused waiting for us
        return item

    def cancel(self) -> None:
        """Stop generating; the stream ends (``finish_reason == "cancelled"``) at once."""
        if not self._done:
            self._done = True
            self.finish_reason = "cancelled"
            self._engine._core.abort(self.request_id)

    async def aclose(self) -> None:
        """Closing the iterator early cancels the segment."""
        self.cancel()

    async def __aenter__(self) -> FrameStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        if not self._done:  # dropped unfinished: free the engine's work (abort is thread-safe)
            self._engine._core.abort(self.request_id)


class Session:
    """A conversation in one voice: segments share one KV cache, oldest segments evicted."""

    def __init__(self, engine: SpeechEngine, state: SessionState) -> None:
        self._engine = engine
        self._state = state
        self.voice = state.voice
        self.closed = False
        self._segments = 0  # generate() calls: the index of the next segment

    @property
    def id(self) -> int:
        return self._state.id

    def generate(
        self,
        text: str,
        params: SamplingParams | None = None,
        *,
        playback: Callable[[], float | None] | None = None,
    ) -> FrameStream:
        """Speak ``text`` after this session's earlier segments (queued behind them).

        With ``params.seed``, segment ``i`` of the session samples with
        ``segment_seed(seed, i)``: the same texts in the same order give the same frames.

        ``playback`` (optional, called from the engine thread): seconds of audio the listener
        holds unplayed, or None when unknown; the engine schedules by it (most behind first).

        Must be called from a running event loop. Returns at once; iterate the stream.
        """
        if self.closed:
            raise EngineError("the session is closed")
        engine = self._engine
        engine._check_running()
        loop = asyncio.get_running_loop()
        params = params or SamplingParams()
        seed = None
        if params.seed is not None:  # reproducible, and each segment with draws of its own
            seed = segment_seed(params.seed, self._segments)
            params = dataclasses.replace(params, seed=seed)
        self._segments += 1
        stream = FrameStream(engine, engine._core.next_id(), seed)

        def emit(item: object) -> None:  # engine thread
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(stream._put, item)

        req = Request(
            id=stream.request_id,
            session=self._state,
            text=text,
            params=params,
            emit=emit,
            consumed=stream._progress.read,
            playback=playback,
        )
        stream._progress.generated = lambda: req.frames
        engine._core.submit(lambda core: core.add_request(req))
        return stream

    def close(self) -> None:
        """Cancel pending segments and free the session's cache."""
        if not self.closed:
            self.closed = True
            self._engine._open_sessions -= 1
            sid = self._state.id
            self._engine._core.submit(lambda core: core.close_session(sid))

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class SpeechEngine:
    """Frame-constrained, KV-cache-reusing generation of Orpheus SNAC frames."""

    def __init__(self, lm: SpeechLMLike, config: EngineConfig | None = None) -> None:
        self.lm = lm
        self.config = config or EngineConfig()
        self.encode: TextEncoder = lm.encode
        self._core = EngineCore(
            StepModel(lm.model, quantize=self.config.quantize), self.encode, self.config
        )
        self._thread: threading.Thread | None = None
        self._open_sessions = 0  # sessions opened and not closed (event-loop side)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        config: EngineConfig | None = None,
    ) -> SpeechEngine:
        """Load a speech LM (HF id or local dir) and wrap it; call :meth:`start` next."""
        from voxlane.server.lm import load_speech_lm

        return cls(load_speech_lm(name_or_path, dtype=dtype, device=device), config)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            if self.config.admission != "off":
                # Measure the batched step before the first turn asks for admission.
                self._core.submit(lambda core: core.calibrate())
            self._thread = threading.Thread(
                target=self._core.run, name="voxlane-engine", daemon=True
            )
            self._thread.start()

    # -- capacity -----------------------------------------------------------------------
    @property
    def active_sessions(self) -> int:
        """Sessions opened and not closed yet (each may be speaking)."""
        return self._open_sessions

    def capacity(self) -> int | None:
        """Most streams the measured batched step keeps real time (with
        ``config.realtime_headroom``); None until a step was measured."""
        return self._core.stats.capacity(self.config.realtime_headroom)

    def check_admission(self) -> None:
        """Raise :class:`~voxlane.errors.OverloadedError` if one more stream would exceed the
        measured capacity (only with ``config.admission == "refuse"``). A stream is always
        admitted when none is open: refusing it would help no one. Sessions paused because
        their consumer stopped taking frames do not count."""
        if self.config.admission != "refuse":
            return
        cap = self.capacity()
        # A session whose client stopped reading is paused and costs nothing: not a stream.
        streams = self._open_sessions - self._core.stalled_sessions
        if cap is not None and streams >= max(cap, 1):
            raise OverloadedError(
                f"the speech engine keeps {cap} streams real time and {streams}"
                " are active: try again when one finishes"
            )

    async def aclose(self) -> None:
        """Stop the engine thread after its current step; pending streams are cancelled."""
        thread = self._thread
        if thread is None:
            return
        self._core.stop()  # the core closes every session and job on its way out
        await asyncio.to_thread(thread.join)
        self._thread = None

    def _check_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise EngineError("the engine is not running: call engine.start() first")

    # -- voices and sessions ------------------------------------------------------------
    def builtin_voice(self, name: str) -> Voice:
        """A finetuned speaker of the checkpoint (``"tara"``, ``"leo"``, ...)."""
        if not name or ":" in name:
            raise EngineError(f"invalid voice name {name!r}")
        return Voice.builtin(name)

    async def clone_voice(
        self, transcript: str, reference_frames: Sequence[Sequence[int]]
    ) -> Voice:
        """A zero-shot voice; its prefix is prefilled now (once per distinct reference)."""
        self._check_running()
        voice = Voice.clone(self.encode, transcript, reference_frames)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def report(exc: BaseException | None) -> None:  # engine thread
            if exc is not None and not isinstance(exc, EngineError):
                exc = EngineError(f"prefilling the voice prefix failed: {exc!r}")
            loop.call_soon_threadsafe(settle, exc)

        self._core.submit(lambda core: core.prefill_voice(voice, report))
        await done
        return voice

    def open_session(self, voice: Voice, *, window_segments: int | None = None) -> Session:
        """A new session; ``window_segments`` (K) defaults to ``config.window_segments``.

        With ``config.admission == "refuse"``, raises :class:`~voxlane.errors.OverloadedError`
        when the engine cannot keep one more stream real time (:meth:`check_admission`).
        """
        self._check_running()
        self.check_admission()
        # Built here so the handle exists at once; the engine thread registers it, allocating
        # its cache and copying the voice prefix in before the first turn arrives.
        state = self._core.make_session(voice, window_segments)
        self._core.submit(lambda core: core.register_session(state))
        self._open_sessions += 1
        return Session(self, state)
