"""SpeechEngine end to end: the engine thread, async streams, cancel and errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from voxlane.errors import ContextOverflowError, EngineError
from voxlane.server.engine import EngineConfig, SamplingParams, SpeechEngine
from voxlane.server.orpheus import CODEBOOK_SIZE

REFERENCE = [tuple((i * 11 + p) % 4096 for p in range(7)) for i in range(20)]


@pytest.fixture
async def engine(tiny_lm):
    eng = SpeechEngine(tiny_lm, EngineConfig(max_context=1024, window_segments=2, num_threads=1))
    eng.start()
    yield eng
    await eng.aclose()


async def test_streams_whole_frames_and_reproduces_with_a_seed(engine) -> None:
    voice = await engine.clone_voice("a reference", REFERENCE)
    outs = []
    for _ in range(2):
        session = engine.open_session(voice)
        stream = session.generate("Hello there.", SamplingParams(max_frames=4, seed=9))
        outs.append([f async for f in stream])
        assert stream.finish_reason == "max_frames"
        session.close()
    assert outs[0] == outs[1] and len(outs[0]) == 4
    assert all(len(f) == 7 and all(0 <= c < CODEBOOK_SIZE for c in f) for f in outs[0])


async def test_segments_of_a_session_run_in_order(engine) -> None:
    session = engine.open_session(engine.builtin_voice("tara"))
    a = session.generate("first", SamplingParams(max_frames=3, seed=1))
    b = session.generate("second", SamplingParams(max_frames=3, seed=1))
    frames_b = [f async for f in b]  # b waits for a, which is consumed after: still fine
    frames_a = [f async for f in a]
    assert len(frames_a) == len(frames_b) == 3
    assert frames_a != frames_b  # b saw a in its context
    session.close()


async def test_cancelling_the_consumer_aborts_and_the_session_continues(engine) -> None:
    session = engine.open_session(engine.builtin_voice("tara"))
    stream = session.generate("long", SamplingParams(max_frames=130, seed=1))
    got = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            got.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.finish_reason == "cancelled"
    after = session.generate("after", SamplingParams(max_frames=2, seed=1))
    assert len([f async for f in after]) == 2  # served promptly: the long one was aborted
    session.close()


async def test_closing_the_stream_early_cancels(engine) -> None:
    session = engine.open_session(engine.builtin_voice("tara"))
    async with session.generate("x", SamplingParams(max_frames=100, seed=1)) as stream:
        async for _ in stream:
            break
    assert stream.finish_reason == "cancelled"
    ok = session.generate("y", SamplingParams(max_frames=1, seed=1))
    assert len([f async for f in ok]) == 1
    del stream, ok
    gc.collect()
    session.close()


async def test_errors_reach_their_request_only(engine) -> None:
    session = engine.open_session(engine.builtin_voice("tara"))
    # 300 characters may take 77 s (the text cap): 900 frames do not fit 1,024 slots.
    too_long = session.generate("word " * 60, SamplingParams(max_frames=10_000))
    with pytest.raises(ContextOverflowError):
        [f async for f in too_long]
    assert too_long.finish_reason == "error"
    fine = session.generate("fine", SamplingParams(max_frames=2))
    assert len([f async for f in fine]) == 2
    session.close()
    with pytest.raises(EngineError):
        session.generate("closed")


async def test_not_started_engine_is_a_clear_error(tiny_lm) -> None:
    eng = SpeechEngine(tiny_lm)
    with pytest.raises(EngineError, match="start"):
        eng.open_session(eng.builtin_voice("tara"))


async def test_aclose_ends_streams_in_flight(tiny_lm) -> None:
    eng = SpeechEngine(tiny_lm, EngineConfig(max_context=1024, num_threads=1))
    eng.start()
    session = eng.open_session(eng.builtin_voice("tara"))
    stream = session.generate("long", SamplingParams(max_frames=140, seed=1))
    first = await anext(stream)
    await eng.aclose()
    rest = [f async for f in stream]
    assert len(first) == 7 and len(rest) < 139
    assert stream.finish_reason == "cancelled"


async def test_a_consumer_that_stops_reading_pauses_only_its_own_request(tiny_lm) -> None:
    eng = SpeechEngine(tiny_lm, EngineConfig(max_context=1024, num_threads=1, max_frames_ahead=3))
    eng.start()
    try:
        voice = eng.builtin_voice("tara")
        slow = eng.open_session(voice).generate(
            "slow reader", SamplingParams(max_frames=12, seed=1)
        )
        fast = eng.open_session(voice).generate(
            "fast reader", SamplingParams(max_frames=12, seed=2)
        )
        frames_fast = [f async for f in fast]  # finishes although nobody reads `slow`
        assert len(frames_fast) == 12 and fast.finish_reason == "max_frames"
        # `slow` generated exactly as far ahead as allowed, then waited.
        assert eng._core.requests[slow.request_id].frames == 3
        frames_slow = [f async for f in slow]  # reading resumes it to the end
        assert len(frames_slow) == 12 and slow.finish_reason == "max_frames"
    finally:
        await eng.aclose()


async def test_a_storm_of_cancelled_turns_fails_nothing(tiny_lm, caplog) -> None:
    # Issue 22 item 1: turns started and cancelled shortly after start across five sessions
    # (the server's pattern: one engine session per turn), admission off. Cancels land at
    # every point of a step (queued, prefilling, ready, sampling); none may fail a request.
    eng = SpeechEngine(tiny_lm, EngineConfig(max_context=1024, num_threads=1, admission="off"))
    eng.start()
    voice = eng.builtin_voice("tara")
    reasons: list[str | None] = []

    async def client(c: int) -> None:
        for i in range(40):
            session = eng.open_session(voice)
            stream = session.generate(f"turn {i} of client {c}", SamplingParams(max_frames=100))
            for _ in range((i + c) % 3):  # cancel before the first frame, after one, after two
                with contextlib.suppress(StopAsyncIteration):
                    await anext(stream)
            await asyncio.sleep(0.001 * ((i * 7 + c) % 4))
            stream.cancel()
            reasons.append(stream.finish_reason)
            session.close()

    try:
        await asyncio.gather(*(client(c) for c in range(5)))
        check = eng.open_session(voice)  # a turn after the storm is still served
        last = check.generate("still fine", SamplingParams(max_frames=2, seed=1))
        assert len([f async for f in last]) == 2
        check.close()
    finally:
        await eng.aclose()
    assert len(reasons) == 200 and set(reasons) <= {"cancelled", "eos", "max_frames"}
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_each_segment_of_a_seeded_session_has_a_seed_of_its_own(engine) -> None:
    # The same seed for every segment replayed the same random draws in each; segment i now
    # samples with segment_seed(seed, i), the same in every run (and its SNAC noise with it).
    from voxlane.server.engine.sampling import segment_seed

    voice = engine.builtin_voice("tara")
    runs = []
    for _ in range(2):
        session = engine.open_session(voice, window_segments=0)  # segments stand alone
        streams = [session.generate("same", SamplingParams(max_frames=3, seed=4)) for _ in "ab"]
        runs.append([[f async for f in streams[0]], [f async for f in streams[1]]])
        assert [s.seed for s in streams] == [segment_seed(4, 0), segment_seed(4, 1)]
        session.close()
    assert runs[0] == runs[1]  # reproducible
    assert runs[0][0] != runs[0][1]  # same text, no shared context: other draws
    assert len({segment_seed(s, i) for s in range(50) for i in range(50)}) == 2500
    assert all(0 <= segment_seed(2**32 - 1, i) < 2**63 for i in range(10))
    unseeded = engine.open_session(voice)
    stream = unseeded.generate("x", SamplingParams(max_frames=1))
    assert stream.seed is None and len([f async for f in stream]) == 1
    unseeded.close()
