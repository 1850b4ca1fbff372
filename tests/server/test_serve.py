"""``voxlane serve``'s flags reach the service it builds (real demo checkpoints, no socket)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from voxlane.server import snac_stream
from voxlane.server.serve import add_serve_arguments, build_server
from voxlane.server.snac_stream import SnacProgram
from voxlane.server.snac_worker import SnacWorkerProgram


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
def test_defaults_decode_in_a_child_with_one_thread(
    demo_root: Path,
    demo_lm_tiny_dir: Path,
    demo_snac_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    amx: bool,
) -> None:
    # The default precision is float32 on every host (exact: seeded turns reproduce bit for
    # bit); auto follows the host, bf16 GEMMs only where they are faster (AMX).
    monkeypatch.setattr(snac_stream, "bf16_supported", lambda device="cpu": amx)
    server = build_server(_args("--demo", "tiny", "--demo-root", str(demo_root), "--no-auth"))
    service = server.service
    auto = build_server(
        _args(
            "--demo",
            "tiny",
            "--demo-root",
            str(demo_root),
            "--no-auth",
            "--codec-precision",
            "auto",
        )
    ).service
    try:
        assert auto.snac_program.precision == ("bfloat16" if amx else "float32")
        program = service.snac_program
        assert isinstance(program, SnacWorkerProgram)
        assert program.threads == 1
        assert program.precision == "float32"
        assert service.engine.config.pace_ahead_s is None  # no pacing unless asked
        assert service.engine.config.segment_cap_s_per_char == 0.25  # the text cap is on
        # Turns beyond the measured capacity queue for up to 30 s; SIGTERM drains for 10 s.
        assert service.engine.config.admission == "wait"
        assert service.engine.config.admission_wait_s == 30.0
        assert server.config.drain_timeout_s == 10.0 and server.config.max_sessions == 64
        # The LM gets the cores the codec does not use.
        assert service.engine.config.num_threads == max(1, (os.cpu_count() or 2) - 1)
    finally:
        asyncio.run(service.aclose())
        asyncio.run(auto.aclose())


def test_codec_flags_choose_a_thread_and_bf16(
    demo_root: Path, demo_lm_tiny_dir: Path, demo_snac_dir: Path
) -> None:
    args = _args(
        "--demo",
        "tiny",
        "--demo-root",
        str(demo_root),
        "--no-auth",
        "--codec-worker",
        "thread",
        "--codec-precision",
        "bfloat16",
        "--engine-threads",
        "1",
        "--pace-ahead",
        "1.5",
        "--segment-cap",
        "off",
    )
    service = build_server(args).service
    try:
        program = service.snac_program
        assert type(program) is SnacProgram and program.precision == "bfloat16"
        assert service.engine.config.num_threads == 1
        assert service.engine.config.pace_ahead_s == 1.5
        assert service.engine.config.segment_cap_s_per_char is None
        assert service.engine.config.segment_frame_cap("Hello there!") is None
    finally:
        asyncio.run(service.aclose())
