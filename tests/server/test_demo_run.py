"""``voxlane demo`` (the README's first command) as a process: server, turn, WAV, numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf


@pytest.mark.parametrize(
    "flags",
    [[], ["--quantize", "none", "--codec-precision", "float32"]],
    ids=["default", "float"],
)
def test_voxlane_demo_writes_a_wav_and_prints_latency(
    demo_lm_tiny_dir: Path, demo_snac_dir: Path, tmp_path: Path, flags: list[str]
) -> None:
    out = tmp_path / "demo.wav"
    root = demo_lm_tiny_dir.parent
    assert demo_snac_dir.parent == root
    command = [sys.executable, "-m", "voxlane.cli", "demo", "--size", "tiny", "--root", str(root)]
    command += ["--out", str(out), "--max-frames", "4", "--llm-tps", "200", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "first audio" in done.stdout and "real-time factor" in done.stdout
    settings = "float" if flags else "int8 layers"  # int8 by default
    assert f"speech LM tiny ({settings})" in done.stdout
    if flags:
        assert "(float32 GEMMs)" in done.stdout
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 24000 and len(audio) > 0
    assert f"wrote          {out} ({len(audio)} samples" in done.stdout
