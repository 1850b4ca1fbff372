"""The benchmarks' shared service options: settings chosen per host, and the host reported."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from bench import concurrency
from bench.common import host_info, service_from_args
from voxlane.server import snac_stream


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
def test_concurrency_defaults_use_bf16_codec_only_with_amx(
    demo_root: Path,
    demo_lm_tiny_dir: Path,
    demo_snac_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    amx: bool,
) -> None:
    # `python -m bench concurrency` with its default codec precision, on a host with or without
    # AMX: bf16 SNAC products are slower than float32 without it (1 real-time stream, not 2).
    monkeypatch.setenv("VOXLANE_DEMO_DIR", str(demo_root))
    monkeypatch.setattr(snac_stream, "bf16_supported", lambda device="cpu": amx)
    parser = argparse.ArgumentParser()
    concurrency.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--codec-worker", "thread"])
    service = service_from_args(args, max_context=256)
    try:
        assert service.codec_precision == ("bfloat16" if amx else "float32")
        assert service.snac_program.precision == service.codec_precision
    finally:
        asyncio.run(service.aclose())


def test_host_info_names_the_features_the_choices_depend_on() -> None:
    info = host_info()
    assert info["cores"] >= 1
    assert isinstance(info["native_step"], bool)
    # The codec's bf16 choice and the reported flags agree.
    assert ("amx_bf16" in info["cpu_flags"]) == snac_stream.bf16_supported()
