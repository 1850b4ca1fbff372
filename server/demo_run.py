"""``voxlane demo``: the main job end to end, offline, on the demo checkpoints.

Starts a real voxlane server on a loopback port, streams text into one turn with the client
SDK (``voxlane.connect``) the way an LLM would (word by word, at ``--llm-tps`` tokens per
second), writes the audio that comes back to a WAV file and prints the latency numbers people
ask for first.
The demo weights are random, so the WAV holds noise shaped like speech timing, not speech.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

__all__ = ["run_demo"]


async def _stream_turn(url: str, key: str, args: argparse.Namespace) -> dict:
    import voxlane

    async def deltas() -> AsyncIterator[str]:
        # An LLM emits roughly one word per 1.3 tokens; pace deltas like one would.
        delay = 1.3 / args.llm_tps
        for i, word in enumerate(args.text.split(" ")):
            yield word if i == 0 else " " + word
            await asyncio.sleep(delay)

    pcm: list[np.ndarray] = []
    marks: list[voxlane.Mark] = []
    async with voxlane.connect(url, api_key=key) as session:
        await session.configure(voice=args.voice, max_frames=args.max_frames, seed=args.seed)
        turn = session.speak(deltas(), turn_id="demo")
        async for event in turn:
            if isinstance(event, voxlane.AudioChunk):
                pcm.append(event.samples)
            else:
                marks.append(event)
    audio = np.concatenate(pcm) if pcm else np.zeros(0, np.int16)
    return {
        "audio": audio,
        "first_audio": turn.time_to_first_audio_s,
        "done": turn.done,
        "marks": marks,
    }


def run_demo(args: argparse.Namespace) -> int:
    """Build the demo weights if needed, serve them, stream one turn, write a WAV."""
    import soundfile as sf
    from transformers.utils import logging as hf_logging

    from voxlane.server.app import ServerConfig, SpeechService, VoxlaneServer
    from voxlane.server.codec import resolve_codec_precision
    from voxlane.server.demo import ensure_demo_lm, ensure_demo_snac
    from voxlane.server.engine import EngineConfig

    hf_logging.disable_progress_bar()  # the demo prints its own one-line timings
    t0 = time.perf_counter()
    lm_dir = ensure_demo_lm(args.size, args.root)
    snac_dir = ensure_demo_snac(args.root)
    print(f"demo weights   {lm_dir.parent}  ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    quantize = getattr(args, "quantize", "int8")
    # "auto": bfloat16 products only where the CPU has the hardware for them.
    precision = resolve_codec_precision(getattr(args, "codec_precision", None) or "auto")
    service = SpeechService.load(
        str(lm_dir),
        str(snac_dir),
        engine_config=EngineConfig(quantize=quantize),
        codec_precision=precision,
    )
    print(
        f"models loaded  speech LM {args.size}"
        f" ({'float' if quantize == 'none' else quantize + ' layers'})"
        f" + SNAC 24 kHz ({precision} GEMMs)  ({time.perf_counter() - t0:.1f} s)"
    )
    key = secrets.token_urlsafe(16)

    async def main() -> dict:
        try:
            server = VoxlaneServer(service, ServerConfig(port=0, api_keys=(key,)))
            async with server:
                url = f"ws://127.0.0.1:{server.port}"
                print(f"server         {url}")
                return await _stream_turn(url, key, args)
        finally:  # also on failure: stop the engine and codec threads
            await service.aclose()

    result = asyncio.run(main())
    audio, done = result["audio"], result["done"]
    out = Path(args.out)
    sf.write(out, audio, 24000, subtype="PCM_16")
    m = done.metrics
    print(f"segments       {len(result['marks'])}: " + " | ".join(k.text for k in result["marks"]))
    if result["first_audio"] is None or m.time_to_first_audio_s is None:
        print(f"no audio came back (turn.done reason {done.reason}); wrote an empty {out}")
        return 1
    print(
        f"first audio    {result['first_audio'] * 1000:.0f} ms after the first text delta "
        f"(server-side {m.time_to_first_audio_s * 1000:.0f} ms)"
    )
    rtf = f"{m.rtf:.2f}" if m.rtf is not None else "n/a"
    print(
        f"audio          {m.audio_s:.2f} s in {m.generation_s:.2f} s of generation "
        f"(real-time factor {rtf}, underruns {m.underruns})"
    )
    print(f"wrote          {out} ({len(audio)} samples, 24 kHz, 16-bit)")
    return 0
