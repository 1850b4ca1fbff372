"""What a client hears, end to end over a real WebSocket: the text-length frame cap and
reproducible audio under a seed (issue 22, items 11 and 2)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from voxlane.server.orpheus import SAMPLES_PER_FRAME


async def test_a_segment_the_lm_never_ends_is_capped_by_its_text(
    start_server: Any, connect: Any
) -> None:
    # The demo LM's random weights never say END_OF_SPEECH: with max_frames alone (512, the
    # protocol default) "Hello there!" spoke 43.7 s of noise.
    server = await start_server()
    async with connect(server) as client:
        await client.send(type="session.configure", sampling={"seed": 1})
        await client.expect("session.configured")
        result = await client.speak("t", "Hello there!")
    assert result.done.reason == "completed" and result.done.metrics.segments == 1
    cap = server.service.engine.config.segment_frame_cap("Hello there!")
    assert result.samples == cap * SAMPLES_PER_FRAME  # cut at 5 s (59 frames), not 512 frames
    assert "voxlane_segments_capped_total 1.0" in server.metrics.render().splitlines()


async def test_the_same_seed_gives_the_same_samples_alone_and_batched(
    start_server: Any, connect: Any, speech_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 22 item 2: with SNAC's noise on (as served; the test service turns it off) the
    # same seed gave audio no more alike than unseeded runs. Two segments (each with a seed
    # of its own), frames decoded in the codec process, float32: the same bytes every time,
    # alone or with another turn generated and decoded alongside.
    monkeypatch.setattr(speech_service.codec, "noise", True)
    server = await start_server()
    text = "Hello there, how are you? This is a seeded turn."

    async def pcm(seed: int, words: str = text) -> bytes:
        async with connect(server) as client:
            await client.send(type="session.configure", sampling={"seed": seed, "max_frames": 12})
            await client.expect("session.configured")
            result = await client.speak("t", words)
        assert result.done.reason == "completed" and result.done.metrics.segments == 2
        return b"".join(chunk.pcm for chunk in result.audio)

    first = await pcm(7)
    again = await pcm(7)
    batched, _ = await asyncio.gather(pcm(7), pcm(3, "Another turn at once. Right alongside."))
    other = await pcm(8)
    assert len(first) == 2 * 12 * SAMPLES_PER_FRAME * 2  # 16-bit samples, 12 frames a segment
    assert first == again == batched
    assert first != other
