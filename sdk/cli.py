"""The ``voxlane`` command line.

Subcommands import their heavy dependencies (torch, the server) only when they
run, so ``voxlane --help`` and the client commands stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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
