"""Helpers shared by the benchmarks (not a benchmark itself)."""

from __future__ import annotations

import argparse
from typing import Any, Literal


def add_service_arguments(
    parser: argparse.ArgumentParser,
    *,
    quantize: str,
    codec_precision: str = "float32",
    pace_ahead: float | None = None,
) -> None:
    """``--model``, ``--threads``, ``--quantize`` (default ``quantize``), ``--codec-worker``,
    ``--codec-precision`` (default ``codec_precision``) and ``--pace-ahead`` (default
    ``pace_ahead``) of the benchmarks that run a whole
    :class:`~voxlane.server.app.SpeechService` (see :func:`load_demo_service`).
    """
    parser.add_argument("--model", default="small", help="demo LM size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model thread")
    parser.add_argument(
        "--quantize", default=quantize, choices=["none", "int8", "int4"], help="speech LM weights"
    )
    parser.add_argument(
        "--codec-worker", default="process", choices=["process", "thread"], help="SNAC runs here"
    )
    parser.add_argument(
        "--codec-precision",
        default=codec_precision,
        choices=["float32", "bfloat16"],
        help="SNAC's matrix products",
    )
    parser.add_argument(
        "--pace-ahead",
        type=float,
        default=pace_ahead,
        metavar="SECONDS",
        help="EngineConfig.pace_ahead_s of the server's turns (<= 0: no pacing)",
    )


def load_demo_service(
    model: str,
    threads: int,
    *,
    max_context: int,
    quantize: Literal["none", "int8", "int4"] = "none",
    codec_worker: Literal["process", "thread"] = "process",
    codec_precision: Literal["float32", "bfloat16"] = "float32",
    pace_ahead_s: float | None = None,
) -> Any:
    """A started :class:`~voxlane.server.app.SpeechService` on the demo checkpoints.

    ``threads`` torch intra-op threads for the caller, the engine thread and the codec thread;
    SNAC's noise is off so decodes are deterministic. ``quantize``: the engine's
    :attr:`~voxlane.server.engine.EngineConfig.quantize` and ``pace_ahead_s`` its
    :attr:`~voxlane.server.engine.EngineConfig.pace_ahead_s`; ``codec_worker`` and
    ``codec_precision``: as :meth:`~voxlane.server.app.SpeechService.load`.
    """
    import torch

    from voxlane.server.app import SpeechService
    from voxlane.server.demo import ensure_demo_lm, ensure_demo_snac
    from voxlane.server.engine import EngineConfig

    torch.set_num_threads(threads)
    service = SpeechService.load(
        str(ensure_demo_lm(model)),
        str(ensure_demo_snac()),
        engine_config=EngineConfig(
            num_threads=threads,
            max_context=max_context,
            quantize=quantize,
            pace_ahead_s=pace_ahead_s,
        ),
        codec_threads=threads,
        codec_worker=codec_worker,
        codec_precision=codec_precision,
    )
    service.codec.noise = False
    return service


def service_from_args(args: argparse.Namespace, *, max_context: int) -> Any:
    """:func:`load_demo_service` with the options of :func:`add_service_arguments`."""
    return load_demo_service(
        args.model,
        args.threads,
        max_context=max_context,
        quantize=args.quantize,
        codec_worker=args.codec_worker,
        codec_precision=args.codec_precision,
        pace_ahead_s=args.pace_ahead if args.pace_ahead and args.pace_ahead > 0 else None,
    )
