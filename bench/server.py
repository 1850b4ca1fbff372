"""Streaming server: time to first audio (socket vs in-process vs compute floor), real time.

Everything runs on the ``small`` demo LM and the demo SNAC (noise off) in one process, with
``--threads`` torch threads for the engine thread and for the codec thread. Timings of the
three TTFA paths are interleaved in every repetition and the medians are compared; only
ratios from one run mean anything (the box is shared).

- **floor**: the compute the first chunk cannot avoid, measured directly on the engine and the
  codec: a fresh engine session, the first segment's prefill and the audio tokens the
  decoder needs before its first sample is final (``first_audio_tokens``), then one decode
  call of those frames. No segmenter, no pipeline, no socket.
- **in-process**: a :class:`TurnPipeline` fed the answer text; first text to first chunk
  handed out (``metrics.ttfa_s``).
- **socket**: a real :class:`VoxlaneServer` on loopback; a WebSocket client times
  ``turn.start`` (carrying the text) to the first binary frame.

``ttfa_vs_floor`` is socket over floor (what a client sees over what compute allows);
``ttfa_socket_vs_inprocess`` is what the server and the socket add.

The real-time run feeds one turn over the socket with a simulated LLM: one word per delta at
``--llm-rate`` deltas/s. ``underruns`` and ``rtf`` come from ``turn.done``; the client also
replays the arrival times against real-time playback from its first chunk on, with no start-up
lead (``client_underruns``, stricter than the server's ``underruns``, which are those of a client
with the SDK Player's 120 ms lead).

``first_audio_breakdown_ms`` splits the in-process path (medians): segment release after the
text arrived, engine prefill to the first frame, the remaining frames of the first decoder
call, the first decode call itself, and the hand-off to the consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from voxlane.server.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME

ANSWER = (
    "Sure, I can help you with that right away. The weather in Paris is mild today, with a "
    "light breeze from the west and a few clouds in the afternoon. Tomorrow looks warmer, so "
    "you may want to plan your walk along the river in the morning. Is there anything else "
    "you would like to know about your trip?"
)
FIRST_SEGMENT = "Sure, I can help you with that right away."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.common import add_service_arguments

    add_service_arguments(parser, quantize="none")
    parser.add_argument("--repeats", type=int, default=7, help="TTFA repetitions (median)")
    parser.add_argument("--llm-rate", type=float, default=30.0, help="simulated LLM deltas/s")
    parser.add_argument("--rt-frames", type=int, default=40, help="max frames per segment (RT)")
    parser.add_argument("--rt-runs", type=int, default=1, help="real-time stream runs")
    parser.add_argument("--seed", type=int, default=11)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def _floor(service: Any, settings: Any, params: Any) -> dict[str, float]:
    """Prefill + the first decoder call's frames on a fresh session, then that decode."""
    engine = service.engine
    decoder = service.new_decoder(settings)
    need = decoder.first_audio_tokens // 7
    session = engine.open_session(engine.builtin_voice("tara"), window_segments=1)
    frames: list[Any] = []
    t0 = time.perf_counter()
    stream = session.generate(FIRST_SEGMENT, params)
    first = 0.0
    async for frame in stream:
        frames.append(frame)
        if len(frames) == 1:
            first = time.perf_counter() - t0
        if len(frames) == need:
            break
    frames_s = time.perf_counter() - t0
    stream.cancel()
    session.close()
    if len(frames) < need:
        raise RuntimeError(f"the segment ended after {len(frames)} frames; change --seed")

    def decode_once() -> float:
        t = time.perf_counter()
        decoder.push(frames, buffered_s=0.0)  # nothing is playing yet: decode at once
        return time.perf_counter() - t

    decode_s = await asyncio.get_running_loop().run_in_executor(service.codec_executor, decode_once)
    return {
        "floor": frames_s + decode_s,
        "first_frame": first,
        "frames": frames_s,
        "decode": decode_s,
    }


async def _compute_rates(service: Any, settings: Any, params: Any) -> dict[str, float]:
    """Steady-state speed of the two model threads, each measured alone.

    Engine: audio tokens/s from frame 1 to frame 25 of a segment. Codec: seconds of
    full-size decode calls (``frames_per_call`` frames; plus left and right context for the
    window decoder) per second of the audio they emit. Real time needs 82 tokens/s and a codec
    factor well below 1.
    """
    engine = service.engine
    session = engine.open_session(engine.builtin_voice("tara"), window_segments=1)
    frames: list[Any] = []
    t1 = 0.0
    stream = session.generate(FIRST_SEGMENT, params)
    async for frame in stream:
        frames.append(frame)
        if len(frames) == 1:
            t1 = time.perf_counter()
        if len(frames) == 25:
            break
    tokens_s = (time.perf_counter() - t1) / (7 * (len(frames) - 1))
    stream.cancel()
    session.close()
    n = settings.frames_per_call
    window = (frames * 2)[: n + settings.left + settings.lookahead]
    feed = (frames * 4)[: 8 + 3 * n]

    def decode() -> float:
        if settings.mode == "exact":
            decoder = service.new_decoder(settings)
            decoder.push(feed[:8])  # past the start of the utterance
            t = time.perf_counter()
            for i in range(8, len(feed), n):
                decoder.push(feed[i : i + n])
            return (time.perf_counter() - t) / 3
        t = time.perf_counter()
        service.codec.decode(window)
        return time.perf_counter() - t

    decode_s = await asyncio.get_running_loop().run_in_executor(service.codec_executor, decode)
    return {
        "engine_audio_tokens_per_s": 1.0 / tokens_s,
        "codec_s_per_audio_s": decode_s / (n * SAMPLES_PER_FRAME / SAMPLE_RATE),
    }


async def _inprocess(service: Any, settings: Any, params: Any) -> dict[str, float]:
    """A TurnPipeline fed the whole answer at once; instrumented first-audio path."""
    from voxlane.server.pipeline import AudioChunk, TurnPipeline
    from voxlane.server.text.segmenter import Segmenter

    engine = service.engine
    session = engine.open_session(engine.builtin_voice("tara"), window_segments=1)
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    class Timed:
        """Wraps the first FrameStream to time its frames."""

        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def __aiter__(self) -> Any:
            return self._run()

        async def _run(self) -> Any:
            async for frame in self.stream:
                marks.setdefault("first_frame", time.perf_counter() - t0)
                yield frame

        def cancel(self) -> None:
            self.stream.cancel()

    def speak(text: str) -> Any:
        marks.setdefault("segment", time.perf_counter() - t0)
        return Timed(session.generate(text, params))

    def new_decoder() -> Any:
        decoder = service.new_decoder(settings)
        push = decoder.push

        def timed_push(frames: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = push(frames, **kwargs)
            if out.size and "decoded" not in marks:
                marks["decode"] = time.perf_counter() - t
                marks["decoded"] = time.perf_counter() - t0
            return out

        decoder.push = timed_push
        return decoder

    pipeline = TurnPipeline(
        speak=speak,
        new_decoder=new_decoder,
        decode_executor=service.codec_executor,
        segmenter=Segmenter(),
    )
    pipeline.push_text(ANSWER)
    async for item in pipeline.events():
        if isinstance(item, AudioChunk):
            marks["chunk"] = time.perf_counter() - t0
            break
    await pipeline.cancel()
    session.close()
    marks["ttfa"] = pipeline.metrics.ttfa_s or marks["chunk"]
    return marks


async def _socket_ttfa(ws: Any, turn_id: str) -> float:
    t0 = time.perf_counter()
    await ws.send(json.dumps({"type": "turn.start", "turn_id": turn_id, "text": ANSWER}))
    ttfa = None
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            if ttfa is None:
                ttfa = time.perf_counter() - t0
                await ws.send(json.dumps({"type": "turn.cancel", "turn_id": turn_id}))
            continue
        data = json.loads(message)
        if data["type"] == "turn.done" and data["turn_id"] == turn_id:
            assert ttfa is not None
            return ttfa


async def _realtime(ws: Any, turn_id: str, rate: float) -> dict[str, Any]:
    """One turn fed word by word at ``rate`` deltas/s; arrival times replayed as playback."""
    words = ANSWER.split(" ")
    await ws.send(json.dumps({"type": "turn.start", "turn_id": turn_id}))

    async def feed() -> None:
        start = time.perf_counter()
        for k, word in enumerate(words):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            text = word if k == len(words) - 1 else word + " "
            await ws.send(json.dumps({"type": "turn.append", "turn_id": turn_id, "text": text}))
        await ws.send(json.dumps({"type": "turn.end", "turn_id": turn_id}))

    feeder = asyncio.create_task(feed())
    t0 = time.perf_counter()
    arrivals: list[tuple[float, int]] = []  # (time, sample offset)
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            offset = int.from_bytes(message[12:20], "little")
            arrivals.append((time.perf_counter(), offset))
            continue
        data = json.loads(message)
        if data["type"] == "turn.done":
            break
    await feeder
    # The client plays from its first chunk on, stalling when a chunk is late.
    underruns, start = 0, None
    for at, offset in arrivals:
        if start is None:
            start = at
            continue
        due = start + offset / SAMPLE_RATE
        if at > due:
            underruns += 1
            start += at - due
    m = data["metrics"]
    return {
        "underruns": m["underruns"],
        "client_underruns": underruns,
        "rtf": m["rtf"],
        "audio_s": round(m["audio_s"], 2),
        "generation_s": round(m["generation_s"], 2),
        "segments": m["segments"],
        "ttfa_s": m["time_to_first_audio_s"],
        "wall_s": round(time.perf_counter() - t0, 2),
        "feed_s": round(len(words) / rate, 2),
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    import websockets

    from bench.common import service_from_args
    from voxlane.server.app import DecoderSettings, ServerConfig, VoxlaneServer
    from voxlane.server.engine import SamplingParams

    service = service_from_args(args, max_context=4096)
    settings = DecoderSettings()
    params = SamplingParams(max_frames=64, seed=args.seed)
    config = ServerConfig(port=0, auth=False, api_keys=(), decoder=settings)
    result: dict[str, Any] = {
        "model": args.model,
        "threads": args.threads,
        "quantize": args.quantize,
        "codec_worker": args.codec_worker,
        "codec_precision": service.codec_precision,  # "auto" resolved
    }
    try:
        async with (
            VoxlaneServer(service, config) as server,
            websockets.connect(f"ws://127.0.0.1:{server.port}/v1/ws") as ws,
        ):
            json.loads(await ws.recv())  # session.ready
            sampling = {"max_frames": 64, "seed": args.seed}
            await ws.send(json.dumps({"type": "session.configure", "sampling": sampling}))
            json.loads(await ws.recv())
            # Warm up every path once (allocator, first-call costs), then interleave.
            await _floor(service, settings, params)
            await _inprocess(service, settings, params)
            await _socket_ttfa(ws, "warm")
            floors, inproc, socket_s, rates = [], [], [], []
            for k in range(args.repeats):
                floors.append(await _floor(service, settings, params))
                inproc.append(await _inprocess(service, settings, params))
                socket_s.append(await _socket_ttfa(ws, f"ttfa-{k}"))
                if k < 3:
                    rates.append(await _compute_rates(service, settings, params))
            floor = _median([f["floor"] for f in floors])
            ttfa_in = _median([m["ttfa"] for m in inproc])
            ttfa_sock = _median(socket_s)
            result.update(
                ttfa_vs_floor=round(ttfa_sock / floor, 3),
                ttfa_socket_vs_inprocess=round(ttfa_sock / ttfa_in, 3),
                ttfa_inprocess_vs_floor=round(ttfa_in / floor, 3),
                ttfa_socket_s=round(ttfa_sock, 4),
                ttfa_inprocess_s=round(ttfa_in, 4),
                floor_s=round(floor, 4),
                floor_parts_ms={
                    "first_frame": _ms(_median([f["first_frame"] for f in floors])),
                    "first_call_frames": _ms(_median([f["frames"] for f in floors])),
                    "first_decode": _ms(_median([f["decode"] for f in floors])),
                },
                first_audio_breakdown_ms=_breakdown(inproc),
                first_audio_tokens=service.new_decoder(settings).first_audio_tokens,
                repeats=args.repeats,
                engine_audio_tokens_per_s=round(
                    _median([r["engine_audio_tokens_per_s"] for r in rates]), 1
                ),
                codec_s_per_audio_s=round(_median([r["codec_s_per_audio_s"] for r in rates]), 3),
            )
            rt_sampling = {"max_frames": args.rt_frames, "seed": args.seed}
            await ws.send(json.dumps({"type": "session.configure", "sampling": rt_sampling}))
            json.loads(await ws.recv())
            runs = [await _realtime(ws, f"rt-{k}", args.llm_rate) for k in range(args.rt_runs)]
            result["realtime"] = runs[0] if len(runs) == 1 else runs
            result["underruns"] = max(r["underruns"] for r in runs)
            result["client_underruns"] = max(r["client_underruns"] for r in runs)
            result["rtf"] = round(_median([r["rtf"] for r in runs]), 3)
            result["llm_deltas_per_s"] = args.llm_rate
            result["audio_tokens_per_s_needed"] = round(7 * SAMPLE_RATE / SAMPLES_PER_FRAME, 1)
    finally:
        await service.aclose()
    return result


def _breakdown(runs: list[dict[str, float]]) -> dict[str, float]:
    def med(key: str, since: str | None = None) -> float:
        return _ms(_median([r[key] - (r[since] if since else 0.0) for r in runs]))

    return {
        "segment_release": med("segment"),
        "prefill_first_frame": med("first_frame", "segment"),
        "first_call_frames": _ms(
            _median([r["decoded"] - r["decode"] - r["first_frame"] for r in runs])
        ),
        "first_decode": med("decode"),
        "handoff": med("chunk", "decoded"),
        "total": med("ttfa"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_main(args))
