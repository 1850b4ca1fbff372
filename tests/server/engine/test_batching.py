"""Many streams at once: batched decode, deadline scheduling, measured capacity."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from voxlane.server.engine import SamplingParams, Voice
from voxlane.server.engine.core import FRAME_SECONDS, Request, StepStats

TEXTS = ["the first stream", "a second, longer stream of words", "third"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def spy_batches(core, monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = core.model.decode_batch

    def spy(caches, tokens):
        sizes.append(len(caches))
        return real(caches, tokens)

    monkeypatch.setattr(core.model, "decode_batch", spy)
    return sizes


def test_decode_batch_equals_each_sequence_alone(kit, tiny_model) -> None:
    core = kit.make_core(tiny_model)
    model = core.model
    caches = [model.new_cache(256) for _ in range(3)]
    for i, cache in enumerate(caches):  # different lengths: 5, 16, 27
        model.forward(cache, torch.arange(100, 105 + 11 * i).unsqueeze(0))
    tokens = torch.tensor([7, 8, 9])
    alone = []
    for b, cache in enumerate(caches):
        copy = type(cache)(cache.k.clone(), cache.v.clone(), cache.length)
        alone.append(model.forward(copy, tokens[b : b + 1].view(1, 1))[0, -1])
        assert copy.length == cache.length + 1
    batched = model.decode_batch(caches, tokens)
    assert [c.length for c in caches] == [6, 17, 28]
    for b in range(3):
        assert (batched[b] - alone[b]).abs().max().item() <= 1e-5


def _frames_alone_and_batched(kit, model, texts, monkeypatch=None):
    """Each text's 8 seeded frames on a core of its own, then all texts batched on one core
    (with the batch sizes seen, where ``monkeypatch`` is given): ``(alone, runs, core, sizes)``."""
    voice = Voice.builtin("tara")
    alone = []
    for i, text in enumerate(texts):
        core = kit.make_core(model)
        req, sink = kit.submit(core, core.new_session(voice), text, max_frames=8, seed=i)
        kit.run_until_done(core, req)
        alone.append(sink.frames)
    core = kit.make_core(model)
    sizes = spy_batches(core, monkeypatch) if monkeypatch is not None else []
    runs = [
        kit.submit(core, core.new_session(voice), text, max_frames=8, seed=i)
        for i, text in enumerate(texts)
    ]
    kit.run_until_done(core, *(r for r, _ in runs))
    return alone, runs, core, sizes


def test_frames_are_the_same_alone_or_batched(kit, tiny_model, monkeypatch) -> None:
    alone, runs, _, sizes = _frames_alone_and_batched(kit, tiny_model, TEXTS, monkeypatch)
    assert max(sizes) == 3  # the three streams really shared forwards
    assert [sink.frames for _, sink in runs] == alone
    assert all(len(f) == 8 for f in alone)


def test_cancel_inside_a_batch_stops_only_that_request(kit, tiny_model, monkeypatch) -> None:
    voice = Voice.builtin("tara")
    core = kit.make_core(tiny_model)
    reference = []
    for i, text in enumerate(TEXTS):
        c = kit.make_core(tiny_model)
        req, sink = kit.submit(c, c.new_session(voice), text, max_frames=6, seed=i)
        kit.run_until_done(c, req)
        reference.append(sink.frames)
    sizes = spy_batches(core, monkeypatch)
    runs = [
        kit.submit(core, core.new_session(voice), text, max_frames=6, seed=i)
        for i, text in enumerate(TEXTS)
    ]
    for _ in range(10):
        core.step()
    assert sizes[-1] == 3
    victim, victim_sink = runs[1]
    steps = [r.steps for r, _ in runs]
    core.abort(victim.id)
    core.step()
    assert victim.steps == steps[1]  # not one more token
    assert victim_sink.finished.reason == "cancelled"
    assert victim.session.cache.length == len(victim.session.tokens) == 0  # rolled back
    assert [runs[0][0].steps, runs[2][0].steps] == [steps[0] + 1, steps[2] + 1]
    assert sizes[-1] == 2
    kit.run_until_done(core, runs[0][0], runs[2][0])
    assert runs[0][1].frames == reference[0] and runs[2][1].frames == reference[2]


def test_a_failure_inside_a_batch_stays_with_its_request(kit, tiny_model, monkeypatch) -> None:
    core = kit.make_core(tiny_model)
    a = core.new_session(Voice.builtin("tara"))
    b = core.new_session(Voice.builtin("leo"))
    good, good_sink = kit.submit(core, a, "fine", max_frames=6, seed=1)
    bad, bad_sink = kit.submit(core, b, "doomed", max_frames=6, seed=1)
    for _ in range(4):
        core.step()
    real_forward, real_batch = core.model.forward, core.model.decode_batch

    def broken_forward(cache, tokens):
        if cache is b.cache:
            raise RuntimeError("boom")
        return real_forward(cache, tokens)

    def broken_batch(caches, tokens):
        if any(c is b.cache for c in caches):
            raise RuntimeError("boom")
        return real_batch(caches, tokens)

    monkeypatch.setattr(core.model, "forward", broken_forward)
    monkeypatch.setattr(core.model, "decode_batch", broken_batch)
    core.step()
    assert bad.done and "boom" in str(bad_sink.error)
    assert not good.done
    kit.run_until_done(core, good)
    assert good_sink.finished.reason == "max_frames" and len(good_sink.frames) == 6
    assert b.cache.length == len(b.tokens) == 0


def test_under_overload_the_stream_most_behind_goes_first(kit, tiny_model) -> None:
    # One request per step and a clock that runs faster than the engine: every stream falls
    # behind, and deadline order shares the steps out evenly (session order would starve).
    clock = FakeClock()
    core = kit.make_core(tiny_model, max_batch=1)
    core.clock = clock
    runs = [
        kit.submit(core, core.new_session(Voice.builtin("tara")), t, max_frames=100, seed=i)
        for i, t in enumerate(TEXTS)
    ]
    for _ in range(300):
        core.step()
        clock.now += 0.05
    frames = [len(sink.frames) for _, sink in runs]
    lag = [req.ahead(clock.now) for req, _ in runs]
    assert min(frames) >= 3 and all(x < 0 for x in lag)  # everyone is behind real time...
    assert max(lag) - min(lag) <= 2 * FRAME_SECONDS / 7  # ...by the same amount, within a step


def test_a_stream_far_ahead_yields_to_one_behind(kit, tiny_model) -> None:
    clock = FakeClock()
    core = kit.make_core(tiny_model, yield_ahead_s=1.0, max_frames_ahead=None)
    core.clock = clock
    ahead, ahead_sink = kit.submit(
        core, core.new_session(Voice.builtin("tara")), "ahead", max_frames=60, seed=1
    )
    while len(ahead_sink.frames) < 14:  # 14 frames = 1.2 s of audio in no time
        core.step()
    assert ahead.ahead(clock.now) > 1.0
    _, behind_sink = kit.submit(
        core, core.new_session(Voice.builtin("leo")), "behind", max_frames=60, seed=2
    )
    steps = ahead.steps
    for _ in range(7 * 3):
        core.step()
    assert ahead.steps == steps  # sat out while the newcomer was behind it
    assert len(behind_sink.frames) == 2
    clock.now += 1.0  # the far-ahead stream's listener caught up: both step again
    core.step()
    assert ahead.steps == steps + 1


def test_step_stats_capacity_from_measured_batches() -> None:
    stats = StepStats(alpha=1.0)
    assert stats.capacity(1.0) is None
    budget = FRAME_SECONDS / 7  # 12.2 ms per token to stay real time
    stats.record(1, budget * 0.3)
    assert stats.capacity(1.0) == 3  # one point: no batching gain assumed
    stats.record(4, budget * 0.6)  # slope 0.1 budget per extra stream
    assert stats.step_seconds(2) == pytest.approx(budget * 0.4)
    assert stats.capacity(1.0) == 8
    assert stats.capacity(0.5) == 3


def test_a_slow_small_batch_sample_does_not_cap_capacity() -> None:
    # Calibration measured B = 1 during a pause of the host: slower than B = 2 and over the
    # budget. Fewer tokens never cost more, so B = 1 counts as fast as B = 2.
    stats = StepStats(alpha=1.0)
    budget = FRAME_SECONDS / 7
    stats.record(1, budget * 1.01)
    stats.record(2, budget * 0.47)
    stats.record(4, budget * 0.6)
    assert stats.step_seconds(1) == pytest.approx(budget * 0.47)
    assert stats.step_seconds(3) == pytest.approx(budget * 0.535)
    # Beyond 4: the least-squares slope of (1, .47), (2, .47), (4, .6), 0.0464 per stream.
    assert stats.capacity(1.0) == 12


def test_a_fast_large_batch_sample_does_not_unbound_capacity() -> None:
    # B = 8 measured faster than B = 4: the slope of those two alone would be zero and every
    # count would fit. The fit over all sizes keeps a slope.
    stats = StepStats(alpha=1.0)
    budget = FRAME_SECONDS / 7
    for batch, share in ((1, 0.3), (2, 0.4), (4, 0.7), (8, 0.65)):
        stats.record(batch, budget * share)
    assert stats.step_seconds(4) == pytest.approx(budget * 0.65)
    capacity = stats.capacity(1.0)
    assert capacity is not None and 8 <= capacity < 20


async def test_admission_refuses_beyond_measured_capacity(kit, tiny_lm) -> None:
    from voxlane.errors import OverloadedError
    from voxlane.server.engine import EngineConfig, SpeechEngine

    engine = SpeechEngine(tiny_lm, EngineConfig(max_context=256, admission="refuse"))
    engine.start()
    try:
        voice = engine.builtin_voice("tara")
        session = engine.open_session(voice)  # calibrated (or not yet): this one fits
        async for _ in session.generate("hello", SamplingParams(max_frames=2, seed=1)):
            pass
        assert engine.capacity() is not None  # calibrated at start
        # Pretend the measured step is slower than real time allows beyond one stream.
        budget = FRAME_SECONDS / 7 * engine.config.realtime_headroom
        engine._core.stats = StepStats(alpha=1.0)
        engine._core.stats.record(1, budget * 0.9)
        engine._core.stats.record(2, budget * 1.5)
        assert engine.capacity() == 1 and engine.active_sessions == 1
        with pytest.raises(OverloadedError) as info:
            engine.open_session(voice)
        assert info.value.code == "overloaded"
        session.close()  # a stream finished: there is room again
        engine._core.stats.record(1, 10.0)  # even with no room at all, one stream is admitted
        assert engine.capacity() == 0
        other = engine.open_session(voice)
        frames = [f async for f in other.generate("again", SamplingParams(max_frames=2, seed=2))]
        assert len(frames) == 2
        other.close()
    finally:
        await engine.aclose()


async def test_admission_off_admits_everything(kit, tiny_lm) -> None:
    from voxlane.server.engine import EngineConfig, SpeechEngine

    engine = SpeechEngine(tiny_lm, EngineConfig(max_context=256))
    engine.start()
    try:
        engine._core.stats.record(1, 10.0)  # hopelessly slow: still admitted
        sessions = [engine.open_session(engine.builtin_voice("tara")) for _ in range(3)]
        assert engine.active_sessions == 3
        for s in sessions:
            s.close()
        assert engine.active_sessions == 0
    finally:
        await engine.aclose()


def test_admission_wait_holds_new_sessions_until_a_stream_finishes(kit, tiny_model) -> None:
    core = kit.make_core(tiny_model, admission="wait", realtime_headroom=1.0)
    budget = FRAME_SECONDS / 7
    core.stats = StepStats(alpha=1.0)
    core.stats.record(1, budget * 0.5)
    core.stats.record(2, budget * 2.0)  # capacity: one stream
    first, first_sink = kit.submit(
        core, core.new_session(Voice.builtin("tara")), "first", max_frames=4, seed=1
    )
    core.step()
    second, second_sink = kit.submit(
        core, core.new_session(Voice.builtin("leo")), "second", max_frames=4, seed=2
    )
    while not first.done:
        core.step()
        assert second.steps == 0  # held, not stepping beside the admitted stream
    assert len(first_sink.frames) == 4
    assert core.has_work()  # the held session is admitted now that the first one finished
    kit.run_until_done(core, second)
    assert len(second_sink.frames) == 4


def _stream(kit, core, name: str, *, consumed=None, max_frames: int = 40, seed: int = 1):
    """A segment of a new session; ``consumed`` is its consumer's progress (default: none)."""
    sink = kit.Sink()
    req = Request(
        id=core.next_id(),
        session=core.new_session(Voice.builtin(name)),
        text=name,
        params=SamplingParams(max_frames=max_frames, seed=seed),
        emit=sink,
    )
    if consumed is not None:
        req.consumed = consumed
    core.add_request(req)
    return req, sink


def test_admission_does_not_count_a_stream_whose_client_stopped_reading(
    kit, tiny_model, monkeypatch
) -> None:
    # Capacity one stream. The first one's consumer takes nothing, so it pauses at
    # max_frames_ahead: it costs no compute and must not keep the next session waiting.
    core = kit.make_core(tiny_model, admission="wait", max_frames_ahead=2)
    monkeypatch.setattr(core.stats, "capacity", lambda headroom, limit=256: 1)
    stuck, _ = _stream(kit, core, "tara")
    while stuck.frames < 2:
        core.step()
    other, other_sink = _stream(kit, core, "leo", consumed=lambda: 10_000, max_frames=4)
    kit.run_until_done(core, other)
    assert len(other_sink.frames) == 4 and other_sink.finished.reason == "max_frames"
    assert not stuck.done and stuck.frames == 2  # still paused, not cancelled


def test_admission_wait_is_bounded_and_says_why(kit, tiny_model, monkeypatch) -> None:
    from voxlane.errors import OverloadedError

    clock = FakeClock()
    core = kit.make_core(tiny_model, admission="wait", admission_wait_s=5.0, max_frames_ahead=None)
    core.clock = clock
    monkeypatch.setattr(core.stats, "capacity", lambda headroom, limit=256: 1)
    first, _ = _stream(kit, core, "tara", max_frames=100)
    core.step()
    second, second_sink = _stream(kit, core, "leo", max_frames=4, seed=2)
    for _ in range(3):
        core.step()
    assert second.steps == 0 and not second.done  # queued behind the streaming session
    assert core._idle_timeout() == pytest.approx(5.0 + 0.001)  # an idle loop wakes for it
    clock.now += 4.9
    core.step()
    assert not second.done
    clock.now += 0.2  # waited longer than admission_wait_s: refused, with the reason
    core.step()
    assert second.done and second.steps == 0 and second_sink.frames == []
    error = second_sink.error
    assert isinstance(error, OverloadedError) and error.code == "overloaded"
    assert "5 s" in str(error) and "1 streams real time" in str(error)
    assert not first.done and core.requests == {first.id: first}  # the stream goes on
    assert not core.sessions[second.session.id].queue and second.session.active is None


def test_step_times_are_cpu_time_of_the_engine_thread(kit, tiny_model, monkeypatch) -> None:
    # A step that had to wait (for the GIL, for a core) did not cost more: under load, wall
    # times made the capacity collapse. A sleep inside the forward stands for such a wait.
    core = kit.make_core(tiny_model, max_frames_ahead=None)
    real = core.model.decode_batch

    def waits(caches, tokens):
        time.sleep(0.3)
        return real(caches, tokens)

    monkeypatch.setattr(core.model, "decode_batch", waits)
    _stream(kit, core, "tara", max_frames=2)
    while 1 not in core.stats.seconds:
        core.step()
    assert core.stats.seconds[1] < 0.3


def test_the_playback_hint_decides_who_is_ahead(kit, tiny_model) -> None:
    # A listener holding 5 s of audio (the pipeline says so) yields to one holding none,
    # even though the engine's own clock sees both at the same point.
    clock = FakeClock()
    core = kit.make_core(tiny_model, yield_ahead_s=1.0, max_frames_ahead=None)
    core.clock = clock
    held = {"full": 5.0, "dry": 0.0}
    runs = {}
    for name, seed in (("full", 1), ("dry", 2)):
        sink = kit.Sink()
        req = Request(
            id=core.next_id(),
            session=core.new_session(Voice.builtin("tara")),
            text=name,
            params=SamplingParams(max_frames=40, seed=seed),
            emit=sink,
            consumed=lambda sink=sink: len(sink.frames),  # the consumer takes every frame
            playback=lambda name=name: held[name],
        )
        core.add_request(req)
        runs[name] = req
    for _ in range(30):
        core.step()
    assert runs["full"].steps == 0 and runs["dry"].steps == 30
    held["full"] = 0.5  # its listener played most of it: it steps again
    core.step()
    assert runs["full"].steps == 1


def test_a_paced_stream_waits_for_its_listener_even_alone(kit, tiny_model) -> None:
    # pace_ahead_s: a stream whose listener holds more than the mark waits although nobody
    # else is behind, and steps again once the listener has played it down. A stream with no
    # playback hint is not paced.
    core = kit.make_core(tiny_model, pace_ahead_s=1.0, max_frames_ahead=None, yield_ahead_s=None)
    held = {"value": 0.0}
    sink = kit.Sink()
    req = Request(
        id=core.next_id(),
        session=core.new_session(Voice.builtin("tara")),
        text="paced",
        params=SamplingParams(max_frames=40, seed=1),
        emit=sink,
        consumed=lambda: len(sink.frames),
        playback=lambda: held["value"],
    )
    core.add_request(req)
    free, _ = kit.submit(
        core, core.new_session(Voice.builtin("leo")), "free", max_frames=40, seed=2
    )
    while len(sink.frames) < 2:
        core.step()
    assert core._idle_timeout() is not None  # paced: an idle loop looks again soon
    held["value"] = 1.5  # the listener holds more than the mark
    steps, free_steps = req.steps, free.steps
    for _ in range(10):
        core.step()
    assert req.steps == steps and core._paused(req)
    assert free.steps == free_steps + 10  # the stream without a hint is not paced
    held["value"] = 0.9  # played down below the mark: it steps again
    core.step()
    assert req.steps == steps + 1 and not core._paused(req)


async def test_an_engine_whose_streams_are_all_paced_does_not_stall(kit, tiny_lm) -> None:
    # Nothing wakes the loop while every stream is paced: it must look again by itself.
    from voxlane.server.engine import EngineConfig, SpeechEngine

    engine = SpeechEngine(tiny_lm, EngineConfig(max_context=512, pace_ahead_s=0.05))
    engine.start()
    try:
        session = engine.open_session(engine.builtin_voice("tara"))
        # The listener holds what the frames would play since the first one, minus real time:
        # the engine runs at most 50 ms ahead of it.
        frames: list[float] = []

        def held() -> float:
            if not frames:
                return 0.0
            return len(frames) * FRAME_SECONDS - (time.monotonic() - frames[0])

        params = SamplingParams(max_frames=6, seed=1)
        stream = session.generate("hello there", params, playback=held)

        async def consume() -> None:
            async for _ in stream:
                frames.append(time.monotonic())

        await asyncio.wait_for(consume(), 60)  # a stalled loop fails here instead of hanging
        assert len(frames) == 6 and stream.finish_reason == "max_frames"
        # Paced: six frames cannot have come faster than five frame durations, less the 50 ms
        # of allowed lead (a bound the pacing guarantees, not a speed).
        assert frames[-1] - frames[0] >= 5 * FRAME_SECONDS - 0.05 - 1e-3
    finally:
        await engine.aclose()


def test_an_abort_drained_during_another_prefill_fails_nobody(kit, tiny_model) -> None:
    # Issue 22 item 1: stream A is ready to decode (its hidden state computed); while B's
    # prompt prefills, A's cancel arrives and is drained before C's turn in the same step. A's
    # hidden state is gone then: the batched heads must not see it, and B and C (other
    # sessions) must not fail with it.
    clock = FakeClock()
    core = kit.make_core(tiny_model)
    core.clock = clock
    a, a_sink = kit.submit(core, core.new_session(Voice.builtin("tara")), "a", max_frames=50)
    while not a_sink.frames:
        core.step()
    clock.now += 100.0  # A's listener is far behind: A steps first (deadline order)
    sessions = [core.new_session(Voice.builtin(v)) for v in ("leo", "zoe")]
    b, b_sink = kit.submit(core, sessions[0], "b", max_frames=3, seed=1)
    c, c_sink = kit.submit(core, sessions[1], "c", max_frames=3, seed=2)
    real_forward = core.model.forward

    def forward(cache, tokens):
        if cache is sessions[0].cache and not a.done:
            core.abort(a.id)  # as the event loop would, while the engine thread prefills B
        return real_forward(cache, tokens)

    core.model.forward = forward
    core.step()
    assert a_sink.finished.reason == "cancelled"
    kit.run_until_done(core, b, c)
    assert b_sink.finished.reason == c_sink.finished.reason == "max_frames"
    assert len(b_sink.frames) == len(c_sink.frames) == 3


def test_a_raising_playback_hint_fails_only_its_request(kit, tiny_model) -> None:
    core = kit.make_core(tiny_model)

    def broken() -> float:
        raise RuntimeError("listener gone")

    bad = Request(
        id=core.next_id(),
        session=core.new_session(Voice.builtin("tara")),
        text="bad",
        params=SamplingParams(max_frames=3, seed=1),
        emit=(bad_sink := kit.Sink()),
        playback=broken,
    )
    core.add_request(bad)
    good, good_sink = kit.submit(core, core.new_session(Voice.builtin("leo")), "ok", max_frames=3)
    kit.run_until_done(core, bad, good)
    assert "listener gone" in str(bad_sink.error)
    assert good_sink.finished.reason == "max_frames" and len(good_sink.frames) == 3


def test_a_heads_failure_stays_with_its_request(kit, tiny_model, monkeypatch) -> None:
    core = kit.make_core(tiny_model)
    good, good_sink = kit.submit(core, core.new_session(Voice.builtin("tara")), "ok", max_frames=4)
    bad, bad_sink = kit.submit(core, core.new_session(Voice.builtin("leo")), "no", max_frames=4)
    real = core._heads

    def heads(reqs):
        if bad in reqs:
            raise RuntimeError("bad hidden state")
        return real(reqs)

    monkeypatch.setattr(core, "_heads", heads)
    kit.run_until_done(core, good, bad)
    assert "bad hidden state" in str(bad_sink.error)
    assert good_sink.finished.reason == "max_frames" and len(good_sink.frames) == 4


def test_float32_rows_and_frames_do_not_depend_on_the_batch(kit, tiny_model) -> None:
    # Issue 22 item 2: MKL rounds a float32 product by its row count (one row: its
    # matrix-vector kernel), so a stream's hidden states alone and batched differed in the
    # last bit, and a sampled token flipped now and then: these three streams parted at frame
    # 2. Small products now run in zero-padded blocks of a fixed row count.
    texts = ["the first stream here", "a second, longer stream of words", "third one"]
    alone, runs, core, _ = _frames_alone_and_batched(kit, tiny_model, texts)
    assert [sink.frames for _, sink in runs] == alone
    # The rows themselves: a decode step and the heads, one request or three.
    model = core.model
    caches = [model.new_cache(64) for _ in range(3)]
    for cache, n in zip(caches, (5, 17, 30), strict=True):
        model.forward(cache, torch.arange(100, 100 + n).unsqueeze(0))
    copies = [type(c)(c.k.clone(), c.v.clone(), c.length) for c in caches]
    tokens = torch.tensor([7, 800, 90_000])
    batched = model.decode_batch(caches, tokens)
    for b, copy in enumerate(copies):
        assert torch.equal(model.decode_batch([copy], tokens[b : b + 1])[0], batched[b])
        assert torch.equal(core._rows[0](batched[b : b + 1])[0], core._rows[0](batched)[b])
