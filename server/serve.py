"""``voxlane serve``: run the WebSocket server until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING

from voxlane.protocol import Limits
from voxlane.server.codec import CODEC_PRECISIONS

if TYPE_CHECKING:
    from voxlane.server.agent import LLMConfig
    from voxlane.server.app import VoxlaneServer

__all__ = ["add_serve_arguments", "run_serve"]

DEFAULT_MODEL = "canopylabs/orpheus-3b-0.1-ft"
DEFAULT_CODEC = "hubertsiuzdak/snac_24khz"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``voxlane serve``."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="speech LM: HF id or local dir")
    p.add_argument("--codec", default=DEFAULT_CODEC, help="SNAC 24 kHz: HF id or local dir")
    p.add_argument(
        "--demo",
        choices=["tiny", "small"],
        nargs="?",
        const="small",
        help="serve the random-weight demo checkpoints instead (built on first use)",
    )
    p.add_argument("--demo-root", help="where demo checkpoints live")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted API key (repeatable; also $VOXLANE_API_KEYS, comma-separated)",
    )
    p.add_argument("--no-auth", action="store_true", help="accept clients without an API key")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=64,
        help="open WebSocket sessions (beyond: HTTP 503 at the handshake); default 64",
    )
    p.add_argument("--max-turns", type=int, default=8, help="open turns per session")
    p.add_argument("--max-turn-chars", type=int, default=20_000)
    p.add_argument("--max-message-bytes", type=int, default=256 * 1024)
    p.add_argument("--max-clone-seconds", type=float, default=30.0)
    p.add_argument("--send-timeout", type=float, default=20.0, help="drop non-reading clients")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT: refuse new sessions and turns (HTTP 503), let active turns"
        " finish for up to this long, end the rest with turn.done, then close with 1001",
    )
    p.add_argument("--max-context", type=int, default=8192, help="KV cache slots per session")
    p.add_argument(
        "--admission",
        choices=["wait", "refuse", "off"],
        default="wait",
        help="turns beyond the streams the speech LM keeps real time (measured): 'wait' (default)"
        " queues them, oldest first, for up to --admission-wait seconds, then refuses them"
        " ('overloaded'); 'refuse' refuses them at once; 'off' admits every turn",
    )
    p.add_argument(
        "--admission-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --admission wait: longest a turn waits for room before it is refused"
        " (default 30)",
    )
    p.add_argument("--max-batch", type=int, default=None, help="most requests per engine step")
    p.add_argument(
        "--pace-ahead",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a turn whose listener holds more than this much audio waits (leaves the CPU to"
        " the codec and other turns; 1 helps many streams on a small CPU); default: no pacing",
    )
    p.add_argument(
        "--segment-cap",
        type=_segment_cap,
        default=0.25,
        metavar="SECONDS_PER_CHAR|off",
        help="a text segment speaks at most 2 s + this per character (a digit counts 3, a wide"
        " character 2), so a speech LM that never ends a segment stops; default 0.25",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8", "int4"],
        default="none",
        help="int8: the speech LM's layer weights in int8 (CPU: a native C decode step, ~4x"
        " faster than float, small drift); int4 (CPU): 4-bit decode weights (more drift)",
    )
    p.add_argument(
        "--codec-worker",
        choices=["process", "thread"],
        default="process",
        help="where exact SNAC decoding runs: a child process (no GIL contention with the"
        " engine) or a thread of the server process",
    )
    p.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="torch threads of the speech LM (default on CPU: the cores the codec leaves)",
    )
    p.add_argument(
        "--codec-threads",
        type=int,
        default=None,
        help="torch threads of SNAC decoding (default on CPU: 1)",
    )
    p.add_argument(
        "--codec-precision",
        choices=CODEC_PRECISIONS,
        default="float32",
        help="SNAC's matrix products: float32 (default) is exact, so a seeded turn gives the same"
        " samples bit for bit; bfloat16 is ~1.4x faster on CPUs with AMX (~40 dB from the float32"
        " decode, samples vary with batching) and slower without; auto: bfloat16 where the"
        " device has bf16 matrix hardware, else float32",
    )
    p.add_argument("--log-level", default="INFO")
    agent = p.add_argument_group("agent mode (the server asks an OpenAI-compatible LLM)")
    agent.add_argument(
        "--llm-url",
        help="base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1): "
        "enables agent.respond",
    )
    agent.add_argument("--llm-model", help="model name sent upstream (required with --llm-url)")
    agent.add_argument("--llm-api-key", help="upstream API key (default $VOXLANE_LLM_API_KEY)")
    agent.add_argument("--system-prompt", help="system prompt of every dialogue")
    agent.add_argument(
        "--llm-timeout", type=float, default=30.0, help="seconds to connect / between chunks"
    )
    agent.add_argument(
        "--llm-max-response", type=float, default=120.0, help="seconds one answer may stream"
    )
    agent.add_argument("--llm-max-tokens", type=int, default=512)
    agent.add_argument("--max-history-messages", type=int, default=32)
    agent.add_argument("--max-history-chars", type=int, default=32_000)


def _segment_cap(value: str) -> float | None:
    """``--segment-cap``: seconds per character, or ``off``."""
    if value.strip().lower() == "off":
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number or 'off'") from None
    if not 0 < seconds <= 60:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 60]")
    return seconds


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get("VOXLANE_API_KEYS", "").split(",") if k.strip()]
    return tuple(keys)


def llm_config(args: argparse.Namespace) -> LLMConfig | None:
    """The agent-mode LLM of the ``--llm-*`` flags (None without ``--llm-url``)."""
    from voxlane.server.agent import LLMConfig

    if not args.llm_url:
        return None
    if not args.llm_model:
        raise SystemExit("voxlane serve: error: --llm-url needs --llm-model")
    return LLMConfig(
        base_url=args.llm_url,
        model=args.llm_model,
        api_key=args.llm_api_key or os.environ.get("VOXLANE_LLM_API_KEY") or None,
        system_prompt=args.system_prompt,
        timeout_s=args.llm_timeout,
        max_response_s=args.llm_max_response,
        max_tokens=args.llm_max_tokens,
        max_history_messages=args.max_history_messages,
        max_history_chars=args.max_history_chars,
    )


def build_server(args: argparse.Namespace) -> VoxlaneServer:
    """Load the models named by ``args`` and return an unstarted server."""
    from voxlane.server.app import ServerConfig, SpeechService, VoxlaneServer
    from voxlane.server.codec import resolve_codec_precision
    from voxlane.server.engine.config import EngineConfig

    model, codec = args.model, args.codec
    if args.demo:
        from voxlane.server.demo import ensure_demo_lm, ensure_demo_snac

        model = str(ensure_demo_lm(args.demo, args.demo_root))
        codec = str(ensure_demo_snac(args.demo_root))
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_keys=_api_keys(args),
        auth=not args.no_auth,
        max_sessions=args.max_sessions,
        limits=Limits(
            max_message_bytes=args.max_message_bytes,
            max_turn_chars=args.max_turn_chars,
            max_turns=args.max_turns,
            max_clone_seconds=args.max_clone_seconds,
        ),
        send_timeout_s=args.send_timeout,
        drain_timeout_s=args.drain_timeout,
        llm=llm_config(args),
    )
    service = SpeechService.load(
        model,
        codec,
        device=args.device,
        dtype=dtype,
        engine_config=EngineConfig(
            max_context=args.max_context,
            admission=args.admission,
            admission_wait_s=args.admission_wait,
            max_batch=args.max_batch,
            pace_ahead_s=args.pace_ahead,
            segment_cap_s_per_char=args.segment_cap,
            quantize=args.quantize,
            num_threads=args.engine_threads,
        ),
        codec_threads=args.codec_threads,
        codec_worker=args.codec_worker,
        codec_precision=resolve_codec_precision(args.codec_precision, args.device),
    )
    return VoxlaneServer(service, config)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    server = build_server(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        print(f"voxlane serving ws://{server.config.host}:{server.port}", flush=True)
        await stop.wait()
        await server.close(close_service=True)

    asyncio.run(main())
    return 0
