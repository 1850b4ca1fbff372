"""What a client hears, end to end over a real WebSocket: the text-length frame cap and
reproducible audio under a seed (issue 22, items 11 and 2)."""

from __future__ import annotations

from typing import Any

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
