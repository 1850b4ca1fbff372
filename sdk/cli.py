"""The ``voxlane`` command line.

Subcommands import their heavy dependencies (torch, the server) only when they
run, so ``voxlane --help`` and the client commands stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

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


def _cmd_mqtt(args: argparse.Namespace) -> int:
    from voxlane.clients.mqtt import run_mqtt

    return run_mqtt(args)


def _cmd_livekit(args: argparse.Namespace) -> int:
    from voxlane.clients.livekit import run_livekit

    return run_livekit(args)


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


def _cmd_chat(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_chat(args))


class _Answer:
    """One spoken answer of ``voxlane chat``: prints its text, plays or records its audio."""

    def __init__(self, turn: Any, args: argparse.Namespace, number: int) -> None:
        self.turn = turn
        self.args = args
        self.number = number
        self.player: Any = None
        self.samples: list[Any] = []
        self.rate = 24000
        self.open_line = False  # the answer's text line is not finished yet
        import asyncio

        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        import voxlane
        from voxlane.client import AudioChunk

        started = False
        try:
            async for event in self.turn:
                if isinstance(event, voxlane.client.TextDelta):
                    if not started:
                        print("assistant: ", end="", flush=True)
                        started = self.open_line = True
                    print(event.text, end="", flush=True)
                elif isinstance(event, AudioChunk):
                    self.rate = event.sample_rate
                    if self.args.out_dir:
                        self.samples.append(event.samples)
                    else:
                        if self.player is None:
                            self.player = voxlane.Player(
                                event.sample_rate,
                                lead_ms=self.args.lead_ms,
                                device=_device(self.args),
                            )
                        self.player.feed(event)
        except voxlane.VoxlaneError as exc:
            print(f"\n[error] [{exc.code}] {exc}", flush=True)
        if self.open_line:
            print(flush=True)
            self.open_line = False
        if self.player is not None:
            await self.player.drain()
        if self.args.out_dir:
            import numpy as np

            from voxlane.audio import write_wav

            audio = np.concatenate(self.samples) if self.samples else np.zeros(0, np.int16)
            path = Path(self.args.out_dir) / f"answer-{self.number}.wav"
            write_wav(path, audio, self.rate)

    async def interrupt(self) -> None:
        """Barge-in: stop playback and tell the server how much was heard."""
        if self.task.done():
            return
        prefix = "\n" if self.open_line else ""
        self.open_line = False
        if self.player is not None:
            played = self.player.played_samples
            self.player.flush()
            await self.turn.report_playback(played)
            print(f"{prefix}[interrupted after {played / self.rate:.2f} s]", flush=True)
        else:
            print(f"{prefix}[interrupted]", flush=True)

    async def finish(self) -> None:
        await self.task
        if self.player is not None:
            self.player.close()


def _device(args: argparse.Namespace) -> Any:
    return int(args.device) if args.device and args.device.isdigit() else args.device


async def _chat(args: argparse.Namespace) -> int:
    import asyncio

    import voxlane

    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    async with voxlane.connect(args.url, api_key=args.api_key) as session:
        if session.ready is None or session.ready.agent is None:
            print(
                "voxlane chat: error: the server has no agent mode (start it with --llm-url)",
                file=sys.stderr,
            )
            return 1
        sampling = {"seed": args.seed} if args.seed is not None else {}
        await session.configure(
            sample_rate=args.sample_rate, max_frames=args.max_frames, **sampling
        )
        print(
            f"chatting with {session.ready.agent.model}: type a message and press Enter; "
            "type again to interrupt; Ctrl-D to quit",
            file=sys.stderr,
        )
        answers: list[_Answer] = []
        while line := await asyncio.to_thread(sys.stdin.readline):
            text = line.strip()
            if not text:
                continue
            if answers:
                await answers[-1].interrupt()
            turn = await session.respond(text, voice=args.voice)
            answers.append(_Answer(turn, args, len(answers) + 1))
        for answer in answers:
            await answer.finish()
    return 0


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (the ``--log-level`` of the long-running commands)."""
    import logging

    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def session_options(args: argparse.Namespace, names: Sequence[str]) -> dict[str, object]:
    """The voxlane session options among ``names`` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_until_signal(service: object) -> int:
    """Run ``service.run()`` (a bridge) until SIGINT/SIGTERM call ``service.stop()``."""
    import asyncio
    import signal

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, service.stop)  # type: ignore[attr-defined]
        await service.run()  # type: ignore[attr-defined]

    asyncio.run(main())
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
    p.add_argument(
        "--quantize",
        choices=["none", "int8", "int4"],
        default="int8",
        help="the speech LM's layer weights (as `serve --quantize`): int8 (default, the fast CPU"
        " setting: voxlane's native decode step), none (the checkpoint's float weights), int4",
    )
    p.add_argument(
        "--codec-precision",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="SNAC's matrix products (as `serve --codec-precision`); auto (default): bfloat16"
        " where the CPU has bf16 hardware (AMX), else float32",
    )
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

    p = sub.add_parser(
        "chat",
        help="talk with the server's LLM: type a message, hear the answer, type to interrupt",
        description="Agent mode: each line of stdin is a user message; the server's LLM "
        "answers and the answer is spoken. A new line interrupts the answer playing (the "
        "server keeps only what was heard in the dialogue). Needs `voxlane serve --llm-url`.",
    )
    p.add_argument("--url", help="server URL (default $VOXLANE_URL or ws://127.0.0.1:8765)")
    p.add_argument("--api-key", help="API key (default $VOXLANE_API_KEY)")
    p.add_argument("--voice", help="a built-in voice (tara, leo, ...)")
    p.add_argument(
        "--out-dir", metavar="DIR", help="write each answer to DIR/answer-N.wav instead of playing"
    )
    p.add_argument("--lead-ms", type=float, default=120.0, help="playback buffer before sound")
    p.add_argument("--device", help="sounddevice output device (name or index)")
    p.add_argument("--sample-rate", type=int, choices=[8000, 16000, 24000, 48000])
    p.add_argument("--seed", type=int, help="fixed seed for reproducible audio")
    p.add_argument("--max-frames", type=int, help="cap on audio frames per segment (85 ms)")
    handlers["chat"] = _cmd_chat

    p = sub.add_parser("serve", help="run the WebSocket server")
    from voxlane.server.serve import add_serve_arguments

    add_serve_arguments(p)
    handlers["serve"] = _cmd_serve

    p = sub.add_parser(
        "mqtt",
        help="bridge MQTT devices to a server: text on PREFIX/DEVICE/say, audio back",
        description="Serve voxlane to devices through an MQTT broker (see docs/mqtt.md). "
        "Needs the mqtt extra: pip install 'voxlane[mqtt]'.",
    )
    from voxlane.clients.mqtt import add_mqtt_arguments  # light: aiomqtt loads when it runs

    add_mqtt_arguments(p)
    handlers["mqtt"] = _cmd_mqtt

    p = sub.add_parser(
        "livekit",
        help="join a LiveKit room and speak its chat messages (or the LLM's answers)",
        description="Bridge a LiveKit room to a voxlane server (see docs/livekit.md). "
        "Needs the livekit extra: pip install 'voxlane[livekit]'.",
    )
    from voxlane.clients.livekit import add_livekit_arguments  # light: livekit loads when it runs

    add_livekit_arguments(p)
    handlers["livekit"] = _cmd_livekit
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
