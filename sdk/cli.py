"""The ``voxlane`` command line.

Subcommands import their heavy dependencies (torch, the server) only when they
run, so ``voxlane --help`` and the client commands stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Callable, Sequence

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _cmd_demo_weights(args: argparse.Namespace) -> int:
    from voxlane.server.demo import default_demo_root, ensure_demo_lm, ensure_demo_snac

    root = args.root or default_demo_root()
    print(f"snac      -> {ensure_demo_snac(root)}")
    for size in args.sizes:
        print(f"lm-{size:<6} -> {ensure_demo_lm(size, root)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from voxlane.server.demo_run import run_demo

    return run_demo(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from voxlane.server.serve import run_serve

    return run_serve(args)


def _cmd_say(args: argparse.Namespace) -> int:
    import asyncio

    if args.clone and not args.transcript:
        raise SystemExit("voxlane say: error: --clone needs --transcript (the words spoken in it)")
    if args.clone and args.voice:
        raise SystemExit("voxlane say: error: use --voice or --clone, not both")
    return asyncio.run(_say(args))


async def _stdin_deltas() -> AsyncIterator[str]:
    import asyncio

    # Lines are forwarded as they arrive: `llm ... | voxlane say -` speaks while it streams.
    while line := await asyncio.to_thread(sys.stdin.readline):
        yield line


async def _say(args: argparse.Namespace) -> int:
    import time

    import voxlane

    out = print
    device = int(args.device) if args.device and args.device.isdigit() else args.device
    async with voxlane.connect(args.url, api_key=args.api_key) as session:
        sampling = {"seed": args.seed} if args.seed is not None else {}
        await session.configure(
            sample_rate=args.sample_rate, max_frames=args.max_frames, **sampling
        )
        voice = args.voice
        if args.clone:
            t0 = time.perf_counter()
            cloned = await session.clone_voice(args.clone, args.transcript)
            voice = cloned.voice_id
            out(
                f"cloned         {voice} from {cloned.duration_s:.1f} s of reference audio "
                f"({time.perf_counter() - t0:.2f} s)"
            )
        text = _stdin_deltas() if args.text == "-" else args.text
        t0 = time.perf_counter()
        async with session.speak(text, voice=voice) as turn:
            if args.out:
                result = await voxlane.save_wav(args.out, turn)
                samples = result.samples_written
            else:
                player = await voxlane.play(turn, lead_ms=args.lead_ms, device=device)
                samples = player.played_samples
        wall = time.perf_counter() - t0
    m = turn.metrics
    started = turn.started
    rate = started.sample_rate if started else session.config.sample_rate
    ttfa = turn.time_to_first_audio_s
    if ttfa is None or m is None:
        out("no audio came back")
        return 1
    server = f" (server-side {m.time_to_first_audio_s * 1000:.0f} ms)"
    out(f"voice          {started.voice if started else voice}")
    out(f"first audio    {ttfa * 1000:.0f} ms after the text was sent{server}")
    if not args.out:
        out(
            f"first sound    {ttfa * 1000 + args.lead_ms:.0f} ms "
            f"(first audio + {args.lead_ms:.0f} ms playback lead); "
            f"player underruns {player.underruns}"
        )
    rtf = f"{m.rtf:.2f}" if m.rtf is not None else "n/a"
    out(
        f"audio          {m.audio_s:.2f} s in {wall:.2f} s wall, {m.generation_s:.2f} s of "
        f"generation (real-time factor {rtf}, server underruns {m.underruns})"
    )
    if args.out:
        out(f"wrote          {args.out} ({samples} samples, {rate} Hz)")
    return 0


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="voxlane", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Handler] = {}

    p = sub.add_parser("demo-weights", help="write the random-weight demo checkpoints")
    p.add_argument("--root", help="demo root (default $VOXLANE_DEMO_DIR or ~/.cache/voxlane/demo)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    handlers["demo-weights"] = _cmd_demo_weights

    p = sub.add_parser(
        "demo",
        help="offline end-to-end run on the demo weights: text -> speech LM -> SNAC -> WAV",
    )
    p.add_argument("--root", help="demo root (default $VOXLANE_DEMO_DIR or ~/.cache/voxlane/demo)")
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument(
        "--text",
        default="Hello there! This is voxlane, streaming speech from a language model <laugh>.",
    )
    p.add_argument("--voice", default="tara")
    p.add_argument("--out", default="voxlane-demo.wav", help="WAV file to write")
    p.add_argument("--max-frames", type=int, default=48, help="audio frames per segment (85 ms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-tps", type=float, default=30.0, help="simulated LLM tokens per second")
    handlers["demo"] = _cmd_demo

    p = sub.add_parser(
        "say",
        help="speak text through a running server: write a WAV or play it",
        description="Speak TEXT through a voxlane server (see `voxlane serve`) and print "
        "the latency: time to first audio (text sent -> first audio chunk received), the "
        "server's own measure, and the real-time factor.",
    )
    p.add_argument("text", help="what to say; '-' streams stdin line by line")
    p.add_argument("--url", help="server URL (default $VOXLANE_URL or ws://127.0.0.1:8765)")
    p.add_argument("--api-key", help="API key (default $VOXLANE_API_KEY)")
    p.add_argument("--voice", help="a built-in voice (tara, leo, ...) or one cloned earlier")
    p.add_argument("--clone", metavar="REF", help="clone the voice of this recording first")
    p.add_argument("--transcript", help="the words spoken in the --clone recording")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--out", metavar="FILE.wav", help="write the audio to a WAV file")
    target.add_argument(
        "--play", action="store_true", help="play on the sound device (the default)"
    )
    p.add_argument("--lead-ms", type=float, default=120.0, help="playback buffer before sound")
    p.add_argument("--device", help="sounddevice output device (name or index)")
    p.add_argument("--sample-rate", type=int, choices=[8000, 16000, 24000, 48000])
    p.add_argument("--seed", type=int, help="fixed seed for reproducible audio")
    p.add_argument("--max-frames", type=int, help="cap on audio frames per segment (85 ms)")
    handlers["say"] = _cmd_say

    p = sub.add_parser("serve", help="run the WebSocket server")
    from voxlane.server.serve import add_serve_arguments

    add_serve_arguments(p)
    handlers["serve"] = _cmd_serve
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``voxlane`` command line; returns the process exit code."""
    parser, handlers = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for users; tracebacks with VOXLANE_DEBUG=1
        import os

        if os.environ.get("VOXLANE_DEBUG"):
            raise
        from voxlane.errors import VoxlaneError

        kind = f"[{exc.code}] " if isinstance(exc, VoxlaneError) else f"{type(exc).__name__}: "
        print(f"voxlane: error: {kind}{exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
