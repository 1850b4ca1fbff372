"""``voxlane say`` and the examples, run as processes against a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from .conftest import KEY

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    """Run ``python ARGS``; returns (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else b""), 180
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out.decode(), err.decode()


def say(server: Any, *args: str) -> list[str]:
    short = ["--seed", "1", "--max-frames", "3"]
    return ["-m", "voxlane.cli", "say", *args, "--url", server.url, "--api-key", KEY, *short]


def reference_wav(path: Path) -> Path:
    t = np.arange(24000) / 24000
    sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t), 24000, subtype="PCM_16")
    return path


async def test_say_writes_a_wav_and_prints_latency(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    code, stdout, stderr = await run(*say(server, "Hello there. How are you?", "--out", str(out)))
    assert code == 0, stderr
    assert "first audio" in stdout and " ms after the text was sent" in stdout
    assert "real-time factor" in stdout
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 24000 and len(audio) > 0
    assert f"({len(audio)} samples, 24000 Hz)" in stdout


async def test_say_streams_stdin_at_another_rate(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "stdin.wav"
    args = say(server, "-", "--out", str(out), "--sample-rate", "16000", "--voice", "leo")
    code, stdout, stderr = await run(*args, stdin="Hello there.\nHow are you?\n")
    assert code == 0, stderr
    assert "voice          leo" in stdout
    assert sf.info(out).samplerate == 16000 and sf.info(out).frames > 0


async def test_say_with_a_cloned_voice(server: Any, tmp_path: Path) -> None:
    ref = reference_wav(tmp_path / "ref.wav")
    out = tmp_path / "cloned.wav"
    args = say(server, "Now I sound like you.", "--out", str(out), "--clone", str(ref))
    code, stdout, stderr = await run(*args, "--transcript", "This is my voice.")
    assert code == 0, stderr
    assert "cloned         clone-" in stdout and sf.info(out).frames > 0

    code, _, stderr = await run(*say(server, "Hi.", "--out", str(out), "--clone", str(ref)))
    assert code != 0 and "--clone needs --transcript" in stderr


async def test_say_reports_typed_errors(server: Any, tmp_path: Path) -> None:
    out = str(tmp_path / "x.wav")
    args = ["-m", "voxlane.cli", "say", "Hi.", "--url", server.url, "--out", out]
    code, _, stderr = await run(*args, "--api-key", "wrong")
    assert code == 1 and "voxlane: error: [unauthorized]" in stderr
    code, _, stderr = await run(*args, "--api-key", KEY, "--voice", "nobody")
    assert code == 1 and "[unknown_voice]" in stderr


async def test_example_save_wav(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "example.wav"
    script = str(EXAMPLES / "save_wav.py")
    code, stdout, stderr = await run(
        script, "Hi there.", "--out", str(out), "--url", server.url, "--api-key", KEY
    )
    assert code == 0, stderr
    assert "first audio after" in stdout and sf.info(out).frames > 0


async def test_example_clone_voice(server: Any, tmp_path: Path) -> None:
    ref = reference_wav(tmp_path / "ref.wav")
    out = tmp_path / "example.wav"
    args = [str(EXAMPLES / "clone_voice.py"), str(ref), "This is my voice.", "--name", "me"]
    code, stdout, stderr = await run(
        *args, "--out", str(out), "--url", server.url, "--api-key", KEY
    )
    assert code == 0, stderr
    assert "cloned me from" in stdout and sf.info(out).frames > 0


@pytest.fixture
async def fake_llm() -> AsyncIterator[tuple[str, list[dict]]]:
    """A minimal OpenAI-compatible streaming endpoint: answers every chat request with
    the same text, one SSE ``chat.completion.chunk`` per few characters."""
    answer = "Sure! The capital of France is Paris. It is lovely in spring."
    requests: list[dict] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        requests.append(json.loads(await reader.readexactly(length)))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        )
        for i in range(0, len(answer), 5):
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"delta": {"content": answer[i : i + 5]}}],
            }
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1", requests
    server.close()
    await server.wait_closed()


async def test_example_llm_to_speech(server: Any, fake_llm: Any, tmp_path: Path) -> None:
    pytest.importorskip("httpx")
    base_url, requests = fake_llm
    out = tmp_path / "answer.wav"
    args = [str(EXAMPLES / "llm_to_speech.py"), "What is the capital of France?"]
    code, stdout, stderr = await run(
        *args, "--llm", base_url, "--out", str(out), "--url", server.url, "--api-key", KEY
    )
    assert code == 0, stderr
    assert requests[0]["stream"] is True
    assert requests[0]["messages"][-1]["content"] == "What is the capital of France?"
    assert "after the LLM's first delta" in stdout and sf.info(out).frames > 0
