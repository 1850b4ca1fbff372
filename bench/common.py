"""Helpers shared by the benchmarks (not a benchmark itself)."""

from __future__ import annotations

import argparse
from typing import Any, Literal

from voxlane.server.codec import CODEC_PRECISIONS

#: CPU features the speed choices depend on: bf16 GEMMs pay with AMX-BF16 only
#: (``bf16_supported``), fbgemm's and the native step's int8 products want AVX512-VNNI.
_CPU_FLAGS = ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def host_info() -> dict[str, Any]:
    """The host a run measured: CPU name, logical cores and the features in :data:`_CPU_FLAGS`
    that it has (as ``torch.cpu.get_capabilities()`` reports them; empty where this torch
    cannot tell), and whether the engine's native library built."""
    import os

    import torch

    from voxlane.server.engine import native

    capabilities = getattr(torch.cpu, "get_capabilities", None)  # public since torch 2.9
    caps: dict[str, Any] = capabilities() if capabilities is not None else {}
    return {
        "cpu": caps.get("cpu_name"),
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in _CPU_FLAGS if caps.get(f)],
        "native_step": native.available(),
    }


def add_service_arguments(
    parser: argparse.ArgumentParser,
    *,
    quantize: str,
    codec_precision: str = "float32",
    pace_ahead: float | None = None,
) -> None:
    """``--model``, ``--threads``, ``--quantize`` (default ``quantize``), ``--codec-worker``,
    ``--codec-precision`` (default ``codec_precision``; ``auto`` is resolved by
    :func:`~voxlane.server.codec.resolve_codec_precision`) and ``--pace-ahead`` (default
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
        choices=CODEC_PRECISIONS,
        help="SNAC's matrix products (auto: bfloat16 where the CPU has AMX, else float32)",
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
    codec_precision: Literal["auto", "float32", "bfloat16"] = "float32",
    pace_ahead_s: float | None = None,
) -> Any:
    """A started :class:`~voxlane.server.app.SpeechService` on the demo checkpoints.

    ``threads`` torch intra-op threads for the caller, the engine thread and the codec thread;
    SNAC's noise is off so decodes are deterministic. ``quantize``: the engine's
    :attr:`~voxlane.server.engine.EngineConfig.quantize` and ``pace_ahead_s`` its
    :attr:`~voxlane.server.engine.EngineConfig.pace_ahead_s`; ``codec_worker`` and
    ``codec_precision``: as :meth:`~voxlane.server.app.SpeechService.load`, or ``auto``
    (:func:`~voxlane.server.codec.resolve_codec_precision`); the service's
    ``codec_precision`` is the one chosen.
    """
    import torch

    from voxlane.server.app import SpeechService
    from voxlane.server.codec import resolve_codec_precision
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
        codec_precision=resolve_codec_precision(codec_precision),
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
