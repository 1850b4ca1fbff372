"""Shared fixtures: demo checkpoints are written once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# The machine is shared and slow: hypothesis must not fail a test on timing. CI also derandomizes
# so that a failure reproduces from the log.
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo root private to this test run."""
    return tmp_path_factory.mktemp("voxlane-demo")


@pytest.fixture(scope="session")
def demo_snac_dir(demo_root: Path) -> Path:
    """Directory of the random-weight SNAC 24 kHz checkpoint."""
    from voxlane.server.demo import ensure_demo_snac

    return ensure_demo_snac(demo_root)


@pytest.fixture(scope="session")
def demo_lm_tiny_dir(demo_root: Path) -> Path:
    """Directory of the random-weight ``tiny`` Orpheus-architecture LM (with tokenizer)."""
    from voxlane.server.demo import ensure_demo_lm

    return ensure_demo_lm("tiny", demo_root)


@pytest.fixture(scope="session")
def orpheus_tokenizer():
    """The real Orpheus text tokenizer (Llama-3 BPE + 28,684 added tokens), built offline."""
    from voxlane.server.tokenizer import build_orpheus_tokenizer

    return build_orpheus_tokenizer()


@pytest.fixture(scope="session")
def speech_service(demo_lm_tiny_dir: Path, demo_snac_dir: Path) -> Any:
    """One real engine + codec for the whole test run (tiny random LM, demo SNAC, noise off).

    Loading takes seconds, so server, SDK and bridge tests share it. One intra-op thread per
    model thread: the box has 2 cores, and OpenMP spinning between the engine and codec threads
    costs more than it gives.
    """
    import asyncio

    import torch

    from voxlane.server.app import SpeechService
    from voxlane.server.engine import EngineConfig

    torch.set_num_threads(1)
    service = SpeechService.load(
        str(demo_lm_tiny_dir),
        str(demo_snac_dir),
        engine_config=EngineConfig(num_threads=1, max_context=4096),
        codec_threads=1,
    )
    service.codec.noise = False
    # Start the codec thread now, so thread-leak baselines include it.
    service.codec_executor.submit(lambda: None).result()
    yield service
    asyncio.run(service.aclose())
