"""docs/protocol.md#chunking over a real socket: uniform frames across segment boundaries.

Every audio frame of a turn but its last has ``round(sample_rate * chunk_ms / 1000)`` samples,
segment boundaries fall inside frames, and each ``turn.mark``'s ``sample`` is exactly where its
segment starts (counted from the frames the engine really produced for each segment).
"""

from __future__ import annotations

from typing import Any

import pytest

from voxlane.protocol import TurnDone
from voxlane.server.engine import engine as engine_module
from voxlane.server.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME
from voxlane.session_protocol import AudioChunk

# Four sentences: several segments, each a few frames (max_frames) so the turn stays short.
TEXT = (
    "Hello there, how are you today? I am fine, thanks for asking. "
    "The weather is lovely this morning. Shall we go for a walk in the park?"
)


@pytest.fixture
def segment_streams(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The engine's frame stream of every segment generated while the test runs, in order."""
    streams: list[Any] = []
    generate = engine_module.Session.generate

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        stream = generate(self, *args, **kwargs)
        streams.append(stream)
        return stream

    monkeypatch.setattr(engine_module.Session, "generate", spy)
    return streams


@pytest.mark.parametrize(("sample_rate", "chunk_ms"), [(24000, 40), (16000, 20)])
async def test_frames_are_uniform_across_segments_and_marks_are_exact(
    start_server: Any, connect: Any, segment_streams: list[Any], sample_rate: int, chunk_ms: int
) -> None:
    server = await start_server()
    async with connect(server) as client:
        await client.send(
            type="session.configure",
            sample_rate=sample_rate,
            chunk_ms=chunk_ms,
            sampling={"max_frames": 6, "seed": 3},
        )
        await client.expect("session.configured")
        turn = await client.speak("t", TEXT)
    assert turn.done.reason == "completed"
    size = round(sample_rate * chunk_ms / 1000)
    audio, marks = turn.audio, turn.marks
    assert len(marks) >= 3 and len(audio) >= 3

    # Every frame but the turn's last is full-size; the last holds the rest.
    assert [a.num_samples for a in audio[:-1]] == [size] * (len(audio) - 1)
    assert 1 <= audio[-1].num_samples <= size

    # Marks: where each segment starts in the turn's samples, from the frames of the segments
    # before it (2,048 samples each at 24 kHz, converted to the output rate).
    frames = [s.frames for s in segment_streams]
    assert len(frames) == len(marks) and all(frames)
    starts = [sum(frames[:k]) * SAMPLES_PER_FRAME for k in range(len(frames))]
    assert [m.sample for m in marks] == [round(s * sample_rate / SAMPLE_RATE) for s in starts]
    assert abs(turn.samples - sum(frames) * SAMPLES_PER_FRAME * sample_rate / SAMPLE_RATE) <= 1
    # Boundaries are not aligned to frames: some segment starts inside a full-size frame.
    assert any(m.sample % size for m in marks[1:])

    # A mark comes before the frame holding its first sample (never late; with resampling it may
    # come a frame or two early, while the previous segment's tail is still in the resampler).
    for i, event in enumerate(turn.events):
        if getattr(event, "type", None) == "turn.mark":
            before = [a for a in turn.events[:i] if isinstance(a, AudioChunk)]
            assert all(a.sample_offset + a.num_samples <= event.sample for a in before)


async def test_a_cancelled_turn_ends_at_a_whole_frame(start_server: Any, connect: Any) -> None:
    server = await start_server()
    async with connect(server) as client:
        await client.send(
            type="session.configure", chunk_ms=40, sampling={"max_frames": 40, "seed": 3}
        )
        await client.expect("session.configured")
        await client.send(type="turn.start", turn_id="t", text=TEXT, end=True)
        chunks: list[AudioChunk] = []
        while not chunks:
            message = await client.recv()
            if isinstance(message, AudioChunk):
                chunks.append(message)
        await client.send(type="turn.cancel", turn_id="t")
        while not isinstance(message := await client.recv(), TurnDone):
            if isinstance(message, AudioChunk):
                chunks.append(message)
    assert message.reason == "cancelled"
    assert [c.num_samples for c in chunks] == [960] * len(chunks)
