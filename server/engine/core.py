"""The synchronous engine core: schedule -> execute -> update, one token per request per step.

A step decodes the tokens of every scheduled request past prefill in one batched forward
(:meth:`StepModel.decode_batch`); requests are scheduled by playback deadline (the one closest
to running dry first) and admitted against the measured step throughput (:class:`StepStats`).

Modelled on vLLM v1's ``EngineCore``: nothing here knows about asyncio. Commands enter through
a thread-safe inbox, aborts through their own queue (drained before every request's step, so a
cancel takes effect before that request's next token), and outputs leave through each
request's ``emit`` callback (the async front end hands it a ``call_soon_threadsafe``).
:class:`voxlane.server.engine.engine.SpeechEngine` runs :meth:`EngineCore.run` in a thread;
tests drive :meth:`EngineCore.step` directly.

A session's cache holds, in slot order::

    [voice prefix][segment 1: prompt, audio, EOS, EOA][segment 2 ...]...[current segment]

Every slot's token is mirrored in ``SessionState.tokens``, so the cache can be rebuilt or
checked against a fresh prefill at any time.
"""

from __future__ import annotations

import itertools
import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from voxlane.errors import ContextOverflowError, EngineError, OverloadedError, VoxlaneError
from voxlane.server.orpheus import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    END_OF_AI,
    END_OF_SPEECH,
    FRAME_SIZE,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    Frame,
    TextEncoder,
)

from .config import EngineConfig, SamplingParams
from .model import KVCache, StepModel
from .sampling import EOS_INDEX, FrameSampler
from .scripted import _float_linear
from .voices import Voice, VoicePrefix, VoicePrefixStore

__all__ = ["EngineCore", "FinishReason", "Finished", "Request", "SessionState", "StepStats"]

log = logging.getLogger(__name__)

FinishReason = Literal["eos", "max_frames", "text_cap", "cancelled", "error"]

#: Seconds of audio one frame plays (2,048 samples at 24 kHz = 85.3 ms).
FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE


@dataclass(frozen=True)
class Finished:
    """Last item a request emits (after its frames), unless it emits an exception."""

    reason: FinishReason
    frames: int


@dataclass(eq=False)
class SessionState:
    """A session's cache and context bookkeeping; owned by the engine thread."""

    id: int
    voice: Voice
    window_segments: int
    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)  # token of every valid cache slot
    prefix_len: int = 0
    segments: list[tuple[int, int]] = field(default_factory=list)  # kept finished [start, end)
    queue: deque[Request] = field(default_factory=deque)  # segments waiting, FIFO
    active: Request | None = None
    closed: bool = False
    streamed: bool = False  # a segment of it has started (admitted, for admission "wait")


@dataclass(eq=False)
class Request:
    """One segment: a text spoken in a session's voice, frame by frame."""

    id: int
    session: SessionState
    text: str
    params: SamplingParams
    emit: Callable[[Any], None]  # Frame | Finished | BaseException; must be thread-safe
    consumed: Callable[[], int] = lambda: 0  # frames the consumer has taken (any thread)
    # Seconds of audio the listener holds unplayed, from whoever plays it (None: unknown).
    playback: Callable[[], float | None] | None = None
    # Engine-thread state.
    prompt: list[int] = field(default_factory=list)
    start: int = -1  # first cache slot of this segment (-1: not started)
    hidden: Tensor | None = None  # [D] final-norm hidden state predicting the next token
    prefill_hidden: Tensor | None = None  # kept for tests: predicts the first audio token
    sampler: FrameSampler | None = None
    frame_limit: int = 0  # max_frames, or less by the text cap (EngineConfig.segment_frame_cap)
    codes: list[int] = field(default_factory=list)  # codes of the frame being built
    frames: int = 0
    steps: int = 0  # executed steps (prefill counts as one)
    done: bool = False
    added_at: float = 0.0  # engine clock when the engine took the request
    first_frame_at: float | None = None  # engine clock when its first frame was emitted

    def ahead(self, now: float) -> float:
        """Seconds of audio generated ahead of real time (negative: its listener is waiting).

        With a ``playback`` hint (the pipeline's buffered audio), that plus the frames
        generated but not taken yet. Without one, playback is assumed to start with the first
        frame and run at real time; before the first frame the listener has been waiting since
        the request arrived.
        """
        if self.playback is not None:
            held = self.playback()
            if held is not None:
                return held + (self.frames - self.consumed()) * FRAME_SECONDS
        if self.first_frame_at is None:
            return -(now - self.added_at)
        generated = (self.frames + len(self.codes) / FRAME_SIZE) * FRAME_SECONDS
        return generated - (now - self.first_frame_at)


class StepStats:
    """Measured decode-step time per batch size (EWMA), and the capacity it implies.

    Only steps that decoded and prefilled nothing else are recorded, so a sample is the cost
    of ``B`` tokens in one batched forward (plus their heads and sampling). The engine records
    its thread's CPU time, not wall time: a step that waited for the GIL (event loop, codec
    thread) or for a core (the codec process, other programs) did not cost more, and under
    load wall times made the capacity collapse and stay collapsed. Missing batch sizes are
    interpolated linearly between measured ones and extrapolated from the last two.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.seconds: dict[int, float] = {}  # batch size -> EWMA of step seconds
        self.lock = threading.Lock()  # written by the engine thread, read by the event loop

    def record(self, batch: int, seconds: float) -> None:
        with self.lock:
            old = self.seconds.get(batch)
            self.seconds[batch] = seconds if old is None else old + self.alpha * (seconds - old)

    def step_seconds(self, batch: int) -> float | None:
        """Estimated seconds of one step of ``batch`` tokens (None before any measurement).

        A smaller batch never counts as slower than a larger one measured: a step of fewer
        tokens does no more work, so such a sample is noise (a pause of the host). Between
        measured sizes the estimate is linear; beyond the largest it follows the least-squares
        slope of all of them, so one noisy size cannot flatten it.
        """
        with self.lock:
            points = sorted(self.seconds.items())
        if not points:
            return None
        for i in range(len(points) - 2, -1, -1):  # the envelope, from the largest size down
            points[i] = (points[i][0], min(points[i][1], points[i + 1][1]))
        for b, t in points:
            if b == batch:
                return t
        if len(points) == 1:
            b, t = points[0]
            return t * batch / b  # no slope known: assume no batching gain (pessimistic)
        lower = [p for p in points if p[0] < batch]
        upper = [p for p in points if p[0] > batch]
        if upper:
            (b0, t0), (b1, t1) = (lower[-1], upper[0]) if lower else (upper[0], upper[1])
            slope = (t1 - t0) / (b1 - b0)
        else:
            b0, t0 = points[-1]
            mean_b = sum(b for b, _ in points) / len(points)
            mean_t = sum(t for _, t in points) / len(points)
            slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / sum(
                (b - mean_b) ** 2 for b, _ in points
            )
        return max(1e-9, t0 + max(0.0, slope) * (batch - b0))

    def capacity(self, headroom: float, limit: int = 256) -> int | None:
        """Most streams whose batched step keeps each of them real time, with ``headroom``
        (fraction of the real-time budget the engine may use). None before any measurement."""
        budget = FRAME_SECONDS / FRAME_SIZE * headroom  # seconds per step to stay real time
        if self.step_seconds(1) is None:
            return None
        n = 0
        while n < limit:
            t = self.step_seconds(n + 1)
            if t is None or t > budget:
                break
            n += 1
        return n


def _noop(core: EngineCore) -> None:
    """A command that does nothing: it only wakes a loop blocked on its inbox."""


class EngineCore:
    """Owns the model, the voice store and every session; single-threaded by design."""

    def __init__(
        self,
        model: StepModel,
        encode: TextEncoder,
        config: EngineConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.encode = encode
        self.config = config
        self.clock = clock
        self.stats = StepStats()
        self.voices = VoicePrefixStore(config.voice_cache_bytes)
        self.sessions: dict[int, SessionState] = {}
        self.requests: dict[int, Request] = {}  # every unfinished request, active or queued
        self._inbox: queue.SimpleQueue[Callable[[EngineCore], None] | None] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self._stopping = False
        self.stalled_sessions = 0  # sessions whose client stopped reading (last schedule)
        self._jobs: list[tuple[Iterator[None], Callable[[BaseException | None], None]]] = []
        # Legal-row heads: the 4,096 rows of position p (a view of lm_head.weight; int8 copies
        # of them when the model is quantized).
        bounds = [
            (AUDIO_TOKEN_BASE + p * CODEBOOK_SIZE, AUDIO_TOKEN_BASE + (p + 1) * CODEBOOK_SIZE)
            for p in range(FRAME_SIZE)
        ]
        self._rows = [model.head_slice(start, stop) for start, stop in bounds]
        self._eos_row = model.head_rows(END_OF_SPEECH, END_OF_SPEECH + 1)  # [1, D]
        self._scripted_heads = self._script_heads(bounds)
        self._native_heads = self._native_heads_struct()

    def _script_heads(self, bounds: list[tuple[int, int]]) -> tuple[Any, ...] | None:
        """:meth:`_heads` as one TorchScript call (``scripted.py``) where the model's decode step
        is scripted too: same products, one GIL release instead of one per torch call."""
        if getattr(self.model, "_scripted", None) is None:
            return None
        from . import scripted
        from .model import Int8Linear

        fn = scripted.heads_fn()
        if fn is None:
            return None
        weights = [
            r if isinstance(r, Int8Linear) else self.model.head_rows(start, stop)
            for r, (start, stop) in zip(self._rows, bounds, strict=True)
        ]
        if any(isinstance(w, Int8Linear) and w.kernel != "fbgemm" for w in weights):
            return None
        floats, packed, rowsums, _, _ = scripted.weight_args(weights)
        reduce_range = isinstance(weights[0], Int8Linear) and weights[0].reduce_range
        return fn, floats, packed, rowsums, reduce_range

    def _native_heads_struct(self) -> Any:
        """The heads for the native step (``native.py``) where the model runs it, else None."""
        from .model import Int8Linear

        step = getattr(self.model, "_native", None)
        if step is None or not all(
            isinstance(r, Int8Linear) and r.kernel == "native" for r in self._rows
        ):
            return None
        self._eos_f32 = self._eos_row.detach().float().contiguous()
        return step.heads_struct(self._rows)  # type: ignore[arg-type]

    # -- thread-safe entry points -------------------------------------------------------
    def next_id(self) -> int:
        with self._ids_lock:
            return next(self._ids)

    def submit(self, command: Callable[[EngineCore], None]) -> None:
        """Run ``command(core)`` in the engine thread before the next step."""
        self._inbox.put(command)

    def abort(self, request_id: int) -> None:
        """Stop a request before its next step (no-op if it already finished)."""
        self._aborts.put(request_id)

    def stop(self) -> None:
        """Make :meth:`run` return after the current step."""
        self._inbox.put(None)

    # -- engine-thread API (commands call these) ----------------------------------------
    def make_session(self, voice: Voice, window_segments: int | None = None) -> SessionState:
        """A session state (thread-safe; not served until :meth:`register_session`)."""
        k = self.config.window_segments if window_segments is None else window_segments
        if k < 0:
            raise EngineError(f"window_segments {k} is negative")
        return SessionState(id=self.next_id(), voice=voice, window_segments=k)

    def register_session(self, state: SessionState) -> None:
        """Serve ``state``; its cache is allocated (and the voice prefix copied in) now, so the
        first turn does not pay for it."""
        self.sessions[state.id] = state
        self._prepare(state)

    def _prepare(self, state: SessionState) -> None:
        if state.cache is not None:
            return
        prefix = self.voice_prefix(state.voice)
        # Room for the prefix and a segment or two now; the cache grows (doubling) up to
        # max_context only if the session's context does.
        held = len(prefix.tokens) if prefix is not None else 0
        state.cache = self.model.new_cache(
            self.config.max_context, allocate=held + self.config.initial_cache_slots
        )
        if prefix is not None:
            state.cache.load(prefix.k, prefix.v)
            state.tokens = list(prefix.tokens)
            state.prefix_len = len(prefix.tokens)

    def new_session(self, voice: Voice, window_segments: int | None = None) -> SessionState:
        """Make and register a session (engine thread, or tests driving the core)."""
        state = self.make_session(voice, window_segments)
        self.register_session(state)
        return state

    def close_session(self, session_id: int) -> None:
        """Cancel the session's requests and free its cache."""
        state = self.sessions.pop(session_id, None)
        if state is None:
            return
        state.closed = True
        for req in [state.active, *state.queue]:
            if req is not None:
                self._finish(req, "cancelled", rollback=False)
        state.queue.clear()
        state.active = None
        state.cache = None  # the only reference: memory is released here
        state.tokens = []
        state.segments = []

    def add_request(self, req: Request) -> None:
        """Queue a segment behind the session's earlier ones."""
        if req.session.closed:
            req.emit(EngineError("the session is closed"))
            return
        self.requests[req.id] = req
        req.added_at = self.clock()
        req.session.queue.append(req)

    @torch.inference_mode()
    def voice_prefix(self, voice: Voice) -> VoicePrefix | None:
        """The prefilled prefix of ``voice`` (prefilling it now on a miss); None without one."""
        if not voice.prefix_tokens:
            return None
        entry = self.voices.get(voice.key)
        if entry is None:
            job = self._voice_job(voice)
            while True:
                try:
                    next(job)
                except StopIteration as stop:
                    return stop.value
        return entry

    def prefill_voice(self, voice: Voice, done: Callable[[BaseException | None], None]) -> None:
        """Prefill ``voice``'s prefix in chunks between steps, then call ``done(error or None)``
        (engine thread). A prefix already stored costs nothing."""
        if not voice.prefix_tokens or voice.key in self.voices:
            done(None)
            return
        self._jobs.append((self._voice_job(voice), done))

    def _voice_job(self, voice: Voice) -> Generator[None, None, VoicePrefix]:
        tokens = voice.prefix_tokens
        n = len(tokens)
        if n > self.config.max_context:
            raise ContextOverflowError(
                f"a voice prefix of {n} tokens exceeds max_context {self.config.max_context}"
            )
        cache = self.model.new_cache(n)  # exactly sized: the store keeps it as is
        chunk = self.config.prefill_chunk
        for i in range(0, n, chunk):
            if i:
                yield  # let other requests step between chunks
            self.model.forward(cache, self._tensor(tokens[i : i + chunk]))
        entry = VoicePrefix(tokens=tokens, k=cache.k, v=cache.v)
        self.voices.put(voice.key, entry)
        return entry

    @torch.inference_mode()
    def calibrate(
        self, batches: tuple[int, ...] = (1, 2, 4, 8), steps: int = 4, context: int = 256
    ) -> None:
        """Measure batched decode steps (forward, legal-row heads, sampling) on scratch caches
        of ``context`` tokens, so admission has a capacity before the first stream runs.
        Live steps keep refining the numbers (:class:`StepStats`)."""
        rows = self._rows[0]
        for b in batches:
            caches = [self.model.new_cache(context + steps + 1) for _ in range(b)]
            for cache in caches:
                cache.k.zero_()
                cache.v.zero_()
                cache.length = context
            samplers = [FrameSampler(SamplingParams(seed=i), self.model.device) for i in range(b)]
            tokens = torch.full((b,), AUDIO_TOKEN_BASE, dtype=torch.long, device=self.model.device)
            samples = []
            for i in range(steps + 1):
                started = time.thread_time()  # as live steps: CPU time of this thread
                hidden = self.model.decode_batch(caches, tokens)
                logits = rows(hidden)
                for row, sampler in zip(logits, samplers, strict=True):
                    sampler.sample(row, 0)
                if i:  # the first step of a size pays one-off allocation costs
                    samples.append(time.thread_time() - started)
            self.stats.record(b, statistics.median(samples))  # one stalled step is not the rate

    # -- the loop -----------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._jobs) or bool(self._schedule())

    def _paused(self, req: Request) -> bool:
        """True while ``req``'s consumer has not taken ``max_frames_ahead`` of its frames, or
        while its listener holds more than ``pace_ahead_s`` of audio (:meth:`_pace_excess`).

        The consumer wakes the loop (:meth:`wake`) when it takes a frame from a paused request,
        so a paused engine blocks on its inbox instead of spinning; a paced request is looked
        at again when its listener should be down to the mark (:meth:`run`).
        """
        if self._stalled(req):
            return True
        excess = self._pace_excess(req)
        return excess is not None and excess > 0

    def _stalled(self, req: Request) -> bool:
        """True while ``req``'s consumer holds ``max_frames_ahead`` frames it has not taken
        (its client stopped reading): the request costs no compute, so admission does not count
        it as a stream."""
        limit = self.config.max_frames_ahead
        return limit is not None and req.frames - req.consumed() >= limit

    def _pace_excess(self, req: Request) -> float | None:
        """Seconds of audio ``req``'s listener holds beyond ``pace_ahead_s`` (None: no pacing
        for it: off, no playback hint, or no frame yet)."""
        pace = self.config.pace_ahead_s
        if pace is None or req.playback is None or req.frames == 0:
            return None
        held = req.playback()
        if held is None:
            return None
        return held + (req.frames - req.consumed()) * FRAME_SECONDS - pace

    def _idle_timeout(self) -> float | None:
        """How long an idle loop may block on its inbox: until the first paced request is due
        again (between 2 and 50 ms: a listener may stall) or a held segment's admission wait
        runs out, or forever (None)."""
        excess = [
            e
            for state in self.sessions.values()
            if state.active is not None and (e := self._pace_excess(state.active)) is not None
        ]
        paced = min(0.05, max(0.002, min(excess))) if excess else None
        held = self._admission_timeout()
        if held is None or (paced is not None and paced <= held):
            return paced
        return held + 0.001  # just past the deadline: the held segment is refused then

    def wake(self) -> None:
        """Make an idle loop look at its requests again (thread-safe)."""
        self._inbox.put(_noop)

    @torch.inference_mode()
    def run(self) -> None:
        """Serve until :meth:`stop`; blocks on the inbox while idle."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        while not self._stopping:
            if not self.has_work():
                try:
                    command = self._inbox.get(timeout=self._idle_timeout())
                except queue.Empty:  # a paced request is due: look again
                    command = _noop
                self._execute(command)
            try:
                self.step()
            except Exception as exc:  # a bug outside any one request: fail them all, go on
                log.exception("engine step failed")
                for req in list(self.requests.values()):
                    self._fail(req, exc)
        self._shutdown()

    def _shutdown(self) -> None:
        """Nothing may wait forever on a stopped engine: end every stream and job."""
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command is not None:
                self._execute(command)
        for session_id in list(self.sessions):
            self.close_session(session_id)
        jobs, self._jobs = self._jobs, []
        for _, done in jobs:
            done(EngineError("the engine stopped"))

    @torch.inference_mode()
    def step(self) -> None:
        """Drain commands and aborts, then one step of every scheduled request: prefill chunks
        one request at a time, then one batched decode forward for all the others."""
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._execute(command)
        self._drain_aborts()
        for job in list(self._jobs):
            gen, done = job
            try:
                next(gen)
            except StopIteration:
                self._jobs.remove(job)
                done(None)
            except Exception as exc:
                self._jobs.remove(job)
                done(exc)
        batch = self._schedule()
        started = time.thread_time()  # CPU time: waiting for the GIL or a core is not cost
        ready: list[Request] = []
        other_work = bool(self._jobs)
        for req in batch:
            self._drain_aborts()
            if req.done:
                continue
            if req.hidden is not None:
                ready.append(req)
                continue
            other_work = True
            try:
                self._execute_step(req)  # starting or prefilling: its own forward
            except Exception as exc:  # this request only; the engine keeps serving
                self._fail(req, exc)
        # An abort drained while a later request prefilled may have finished a request that
        # was already ready (its hidden state is gone): only live requests reach the heads.
        ready = [req for req in ready if not req.done]
        logits = self._heads_isolated(ready)
        decode: list[tuple[Request, int]] = []
        for req in ready:
            self._drain_aborts()
            if req.done or req.id not in logits:
                continue
            try:
                token = self._sample_step(req, logits[req.id])
            except Exception as exc:
                self._fail(req, exc)
                continue
            if token is not None:
                decode.append((req, token))
        if decode:
            self._decode(decode)
            if not other_work:
                self.stats.record(len(decode), time.thread_time() - started)

    def _heads_isolated(self, reqs: list[Request]) -> dict[int, Tensor]:
        """:meth:`_heads` of ``reqs``; if the batched call fails, each request alone, so a
        failure fails only the request that causes it (the others' logits are returned)."""
        try:
            return self._heads(reqs)
        except Exception:
            log.debug("batched heads failed; retrying their requests one by one", exc_info=True)
        out: dict[int, Tensor] = {}
        for req in reqs:
            try:
                out.update(self._heads([req]))
            except Exception as exc:
                self._fail(req, exc)
        return out

    def _heads(self, reqs: list[Request]) -> dict[int, Tensor]:
        """Legal-row logits of each request at its own frame position: one matmul per
        position for all the requests there (``[n, D] @ [D, 4096]``), plus the EOS row where
        EOS is legal."""
        if self._native_heads is not None and reqs:
            logits = self.model._native.heads(  # type: ignore[union-attr]
                self._native_heads,
                [req.hidden for req in reqs],  # type: ignore[misc]
                [len(req.codes) for req in reqs],
                [not req.codes and req.frames > 0 for req in reqs],  # EOS: frame boundaries
                self._eos_f32,
            )
            return {req.id: row for req, row in zip(reqs, logits, strict=True)}
        if self._scripted_heads is not None and reqs:
            fn, floats, packed, rowsums, reduce_range = self._scripted_heads
            logits = fn(
                [req.hidden for req in reqs],
                [len(req.codes) for req in reqs],
                [req.frames > 0 for req in reqs],
                floats,
                packed,
                rowsums,
                self._eos_row,
                reduce_range,
            )
            return {req.id: row for req, row in zip(reqs, logits, strict=True)}
        groups: dict[int, list[Request]] = {}
        for req in reqs:
            groups.setdefault(len(req.codes), []).append(req)
        out: dict[int, Tensor] = {}
        for position, group in groups.items():
            hidden = torch.stack([req.hidden for req in group])  # type: ignore[misc]
            logits = self._rows[position](hidden)  # [n, 4096]
            eos = _float_linear(hidden, self._eos_row) if position == 0 else None  # [n, 1]
            for i, req in enumerate(group):
                if eos is not None and req.frames > 0:
                    out[req.id] = torch.cat((logits[i], eos[i]))  # [4097]
                else:
                    out[req.id] = logits[i]
        return out

    def _decode(self, batch: list[tuple[Request, int]]) -> None:
        """Append each request's sampled token in one batched forward (one request included).

        If the batched forward fails, each request is retried alone so that a failure stays
        with the request that caused it (nothing was committed: cache lengths move only at
        the end of a forward).
        """
        self._drain_aborts()  # a cancel that arrived while sampling: no forward for it
        batch = [(req, token) for req, token in batch if not req.done]
        if not batch:
            return
        # One request too: decode_batch is the (scripted) fast path.
        states = [req.session for req, _ in batch]
        try:
            for state in states:
                assert state.cache is not None and state.cache.length == len(state.tokens)
            hidden = self.model.decode_batch(
                [state.cache for state in states],  # type: ignore[misc]
                torch.tensor([t for _, t in batch], dtype=torch.long, device=self.model.device),
            )
        except Exception:
            log.debug("batched decode failed; retrying its requests one by one", exc_info=True)
        else:
            for b, (req, token) in enumerate(batch):
                req.session.tokens.append(token)
                req.hidden = hidden[b]
            return
        for req, token in batch:
            try:
                req.hidden = self._append(req.session, [token])
            except Exception as exc:
                self._fail(req, exc)

    def _execute(self, command: Callable[[EngineCore], None] | None) -> None:
        if command is None:
            self._stopping = True
            return
        try:
            command(self)
        except Exception:  # commands report their own errors; never kill the loop
            log.exception("engine command failed")

    def _schedule(self) -> list[Request]:
        """The requests of this step, the one closest to running dry first.

        Streams more than ``yield_ahead_s`` of audio ahead of real time sit this step out while
        another stream is behind that mark (its listener is waiting or about to); at most
        ``max_batch`` requests step, so under overload the streams most behind go first and
        every stream gets its turn as it falls behind (fair by deadline).
        """
        ready: list[Request] = []
        now = self.clock()
        ahead: dict[int, float] = {}
        stalled = 0
        for state in list(self.sessions.values()):
            if state.active is None and state.queue:
                state.active = state.queue.popleft()
            req = state.active
            if req is None:
                continue
            try:  # the flow-control hints are the caller's callbacks: a raise is this request's
                if self._stalled(req):
                    stalled += 1
                    continue
                excess = self._pace_excess(req)  # _paused, less the stall just checked
                if excess is not None and excess > 0:
                    continue
                ahead[req.id] = req.ahead(now)
            except Exception as exc:
                self._fail(req, exc)
                continue
            ready.append(req)
        self.stalled_sessions = stalled  # read by the event loop (admission "refuse")
        ready = self._admit(ready)
        if len(ready) < 2:
            return ready
        ready.sort(key=lambda r: ahead[r.id])  # stable: ties keep session order
        limit = self.config.yield_ahead_s
        if limit is not None and ahead[ready[0].id] < limit:
            ready = [r for r in ready if ahead[r.id] <= limit]
        if self.config.max_batch is not None:
            ready = ready[: self.config.max_batch]
        return ready

    def _admit(self, ready: list[Request]) -> list[Request]:
        """Admission ``"wait"``: hold the first segment of new sessions (oldest first admitted)
        while the measured capacity is taken by sessions already streaming. One stream is
        always admitted when nothing streams, so the engine cannot stall. A session whose
        client stopped reading (:meth:`_stalled`) is not streaming: it costs nothing. A
        segment held ``admission_wait_s`` fails with :class:`~voxlane.errors.OverloadedError`
        (a bounded queue: the caller learns why instead of waiting forever)."""
        if self.config.admission != "wait":
            return ready
        new = [r for r in ready if not r.session.streamed]
        if not new:
            return ready
        cap = self.stats.capacity(self.config.realtime_headroom)
        if cap is None:
            return ready
        busy = sum(
            1
            for s in self.sessions.values()
            if s.streamed
            and (s.active is not None or s.queue)
            and not (s.active is not None and self._stalled(s.active))
        )
        room = max(cap, 0 if busy else 1) - busy
        new.sort(key=lambda r: r.added_at)
        held = new[max(0, room) :]
        wait = self.config.admission_wait_s
        now = self.clock()
        for req in held:
            if wait is not None and now - req.added_at >= wait:
                self._finish(
                    req,
                    "error",
                    rollback=False,
                    error=OverloadedError(
                        f"no room for another stream after waiting {wait:g} s: the speech"
                        f" engine keeps {cap} streams real time and {busy} are streaming;"
                        " try again later"
                    ),
                )
        held_ids = {r.id for r in held}
        return [r for r in ready if r.id not in held_ids]

    def _admission_timeout(self) -> float | None:
        """Seconds until the oldest held segment's admission wait runs out (None: no such
        segment, or no bound), so an idle loop wakes to refuse it."""
        wait = self.config.admission_wait_s
        if self.config.admission != "wait" or wait is None:
            return None
        held = [
            s.active.added_at
            for s in self.sessions.values()
            if s.active is not None and not s.streamed
        ]
        if not held:
            return None
        return max(0.0, min(held) + wait - self.clock())

    def _drain_aborts(self) -> None:
        while True:
            try:
                rid = self._aborts.get_nowait()
            except queue.Empty:
                return
            req = self.requests.get(rid)
            if req is not None and not req.done:
                self._finish(req, "cancelled", rollback=True)

    # -- execute + update ---------------------------------------------------------------
    def _execute_step(self, req: Request) -> None:
        """One step of ``req`` alone: a prefill chunk, or a token and its forward."""
        if req.start < 0 or req.hidden is None:
            req.steps += 1
            if req.start < 0:
                self._start_segment(req)
            else:  # prompt (and re-prefilled window) still being prefilled
                self._prefill_chunk(req)
            return
        token = self._sample_step(req, self._heads([req])[req.id])
        if token is not None:
            req.hidden = self._append(req.session, [token])

    def _sample_step(self, req: Request, logits: Tensor) -> int | None:
        """Sample ``req``'s next token from its legal-row ``logits`` (emitting a frame it
        completes); the token to append, or None if the segment closed."""
        req.steps += 1
        state = req.session
        position = len(req.codes)
        hidden = req.hidden
        assert hidden is not None and state.cache is not None and req.sampler is not None
        if position == 0 and req.frames >= req.frame_limit:
            capped = req.frame_limit < req.params.max_frames
            self._close_segment(req, "text_cap" if capped else "max_frames")
            return None
        index = req.sampler.sample(logits, position)
        if index == EOS_INDEX:
            self._close_segment(req, "eos")
            return None
        req.codes.append(index)
        token = AUDIO_TOKEN_BASE + position * CODEBOOK_SIZE + index
        if len(req.codes) == FRAME_SIZE:
            frame: Frame = tuple(req.codes)  # type: ignore[assignment]
            req.codes = []
            req.frames += 1
            req.sampler.push_frame(frame)
            if req.first_frame_at is None:
                req.first_frame_at = self.clock()
            req.emit(frame)  # before the forward: the frame is final once sampled
        req.hidden = None  # consumed; the forward of ``token`` sets the next one
        return token

    def _start_segment(self, req: Request) -> None:
        state = req.session
        self._prepare(state)
        req.prompt = state.voice.prompt(self.encode, req.text)
        cap = self.config.segment_frame_cap(req.text)
        req.frame_limit = req.params.max_frames if cap is None else min(cap, req.params.max_frames)
        needed = len(req.prompt) + FRAME_SIZE * req.frame_limit + 2
        capacity = state.cache.capacity
        if state.prefix_len + needed > capacity:
            raise ContextOverflowError(
                f"a segment of {len(req.prompt)} prompt tokens and up to {req.frame_limit}"
                f" frames ({needed} tokens) does not fit max_context {capacity}"
                f" after a voice prefix of {state.prefix_len}: lower max_frames or raise"
                " max_context"
            )
        held = len(state.segments)
        # Slack amortizes re-prefilling the kept segments; with K = 0 nothing is kept, so
        # evicting costs nothing and every segment stands alone.
        slack = self.config.window_slack if state.window_segments else 0
        drop = 0
        if held > state.window_segments + slack:
            drop = held - state.window_segments  # evict a batch: re-prefill only now and then
        while len(state.tokens) - self._span(state, drop) + needed > capacity:
            drop += 1
        if drop:
            self._evict(state, drop)
        req.start = len(state.tokens)
        state.streamed = True
        state.tokens.extend(req.prompt)
        req.sampler = FrameSampler(req.params, self.model.device)
        self._prefill_chunk(req)

    def _prefill_chunk(self, req: Request) -> None:
        """Prefill up to ``prefill_chunk`` of the session's not-yet-cached tokens (vLLM-style
        chunked prefill: a long prompt or re-prefilled window never stalls other sessions, and
        a cancel lands between chunks)."""
        state = req.session
        cache = state.cache
        assert cache is not None
        n = min(self.config.prefill_chunk, len(state.tokens) - cache.length)
        hidden = self.model.forward(
            cache, self._tensor(state.tokens[cache.length : cache.length + n])
        )
        if cache.length == len(state.tokens):
            req.hidden = hidden[0, -1]  # [D]: predicts the first audio token
            req.prefill_hidden = req.hidden

    def _span(self, state: SessionState, drop: int) -> int:
        """Slots freed by evicting the ``drop`` oldest segments."""
        if drop == 0:
            return 0
        return state.segments[drop - 1][1] - state.prefix_len

    def _evict(self, state: SessionState, drop: int) -> None:
        """Drop the ``drop`` oldest segments from the context (the prefix always stays).

        ``reprefill``: cut the cache back to the prefix; what stays becomes not-yet-cached
        tokens that the next prefill chunks recompute, exactly. ``reindex``: shift the cache
        left and rotate the kept keys (no forward; approximate, see the architecture doc).
        """
        cache = state.cache
        assert cache is not None
        start, stop = state.prefix_len, state.segments[drop - 1][1]
        delta = stop - start
        if self.config.eviction == "reindex" and cache.length >= stop:
            self.model.evict(cache, start, stop)
        else:
            cache.truncate(min(cache.length, start))
        del state.tokens[start:stop]
        state.segments = [(a - delta, b - delta) for a, b in state.segments[drop:]]

    def _append(self, state: SessionState, tokens: list[int]) -> Tensor:
        """Forward ``tokens`` at the end of a fully cached context; hidden of the last one."""
        assert state.cache is not None and state.cache.length == len(state.tokens)
        hidden = self.model.forward(state.cache, self._tensor(tokens))  # [1, T, D]
        state.tokens.extend(tokens)
        return hidden[0, -1]

    def _close_segment(self, req: Request, reason: FinishReason) -> None:
        """Finish the turn in the context (EOS, EOA) so the next segment sees it complete."""
        state = req.session
        self._append(state, [END_OF_SPEECH, END_OF_AI])
        state.segments.append((req.start, len(state.tokens)))
        self._finish(req, reason, rollback=False)

    def _fail(self, req: Request, exc: Exception) -> None:
        if req.done:
            return
        if not isinstance(exc, VoxlaneError):
            log.exception("request %d failed", req.id)
            wrapped = EngineError(f"speech LM failed on this request: {exc!r}")
            wrapped.__cause__ = exc
            exc = wrapped
        self._finish(req, "error", rollback=True, error=exc)

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        *,
        rollback: bool,
        error: BaseException | None = None,
    ) -> None:
        req.done = True
        req.hidden = None
        self.requests.pop(req.id, None)
        state = req.session
        if state.active is req:
            state.active = None
        elif req in state.queue:
            state.queue.remove(req)
        if rollback and req.start >= 0 and state.cache is not None:
            # A cancelled or failed segment leaves no trace: the next one starts where it did.
            state.cache.truncate(min(state.cache.length, req.start))
            del state.tokens[req.start :]
        req.emit(error if error is not None else Finished(reason, req.frames))

    def _tensor(self, tokens: list[int] | tuple[int, ...]) -> Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.model.device)
