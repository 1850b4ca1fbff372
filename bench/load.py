"""Load, fault and reproducibility of ``voxlane serve`` with its default flags (issue 22).

The server is a real ``voxlane serve --demo MODEL --no-auth --port 0`` subprocess (default
``tiny``) with no other flag unless ``--serve-flags`` adds some, so what is measured is what a
user runs; the clients are raw WebSocket clients in this process. Phases, in order:

- **concurrent**: ``--sessions`` (50) sessions connect at once and speak one turn each
  (``--frames`` frames at most, seed per session). ``completed_ratio_50`` is the share of those
  turns whose ``turn.done`` says ``completed`` (a refused handshake, an ``overloaded`` turn or a
  dropped connection count as not completed; ``not_completed_50`` says why).
  ``first_audio_p50_s_50`` / ``first_audio_p95_s_50``: ``turn.start`` sent to the first audio
  frame, over the turns that got audio. (The keys say 50 whatever ``--sessions`` is; the
  ``sessions`` key gives the count.)
- **stuck client**: a normal client speaks ``--stuck-turns`` turns alone, then as many beside a
  client that started a long turn and reads nothing (a tiny receive buffer: the server's sends
  block at once), then alone again. ``others_delay_s_with_stuck_client`` is the median first
  audio beside the stuck client minus the median alone (both alone runs pooled), in one run.
  ``stuck_client_close_code`` is how the server closed the stuck client (4008 expected): it
  reads nothing until the server's send timeout (``--send-timeout``, 20 s by default) and 5 s
  more have passed, then reads what was buffered up to the close (None: still open);
  ``stuck_client_errors`` are the errors it was sent (``overloaded``: it never got stuck).
  ``normal_turns_not_completed`` says how the normal client's other turns ended.
- **cancel storm**: ``--cancels`` turns over ``--storm-sessions`` sessions, each cancelled at
  once, after ``turn.started`` or after its first audio (in turn). ``engine_failures_cancel_storm``
  is the number of ``engine_error`` messages the clients got (or the growth of the server's own
  ``engine_error`` counter over the storm, if larger); ``cancels_unacked`` (``turn.done``
  ``cancelled`` without ``turn.cancelled`` first) and ``audio_after_cancel_ack`` (frames or
  marks of a turn after its ack) must be 0. ``cancelled_turns`` is how many ended cancelled;
  ``cancel_turns_ended_otherwise`` says how the others ended (refused as ``overloaded``, say),
  ``cancel_storm_hung_turns`` counts turns with no message for 60 s. A session the server
  closes (1008 after too many late cancels) is replaced. The issue's target counts 1,000
  cancelled turns: ``--cancels 1000``.
- **reproducibility**: the same text, voice and seed on fresh sessions, one after the other
  and then two at once beside a third stream: ``same_seed_same_samples`` (alone, bit-exact)
  and ``same_seed_max_lsb_concurrent`` (largest int16 difference when batched with others).

The timings are wall clock on a shared box: compare keys of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEXT = "Hello there, how are you today? I am fine, thanks for asking."
LONG_TEXT = TEXT * 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", choices=["tiny", "small"], help="demo LM")
    parser.add_argument("--serve-flags", default="", help="extra `voxlane serve` flags (quoted)")
    parser.add_argument("--sessions", type=int, default=50, help="concurrent one-turn sessions")
    parser.add_argument("--frames", type=int, default=16, help="max frames of a turn")
    parser.add_argument("--stuck-turns", type=int, default=5, help="normal turns per stuck phase")
    parser.add_argument("--cancels", type=int, default=200, help="cancelled turns in the storm")
    parser.add_argument("--storm-sessions", type=int, default=4, help="sessions of the storm")
    parser.add_argument("--seed", type=int, default=7)


def _host() -> dict[str, Any]:
    """CPU model, core count and the instruction-set flags torch reports (AVX2, AVX512, AMX)."""
    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        capabilities = getattr(torch.cpu, "get_capabilities", None)
        if capabilities is not None:
            info["cpu_flags"] = sorted(k for k, v in capabilities().items() if v is True)
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------- the server


def _serve_args(model: str, flags: list[str]) -> argparse.Namespace:
    """The options ``voxlane serve`` runs with (its own parser: defaults plus ``flags``)."""
    from voxlane.server.serve import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(["--demo", model, "--no-auth", *flags])


class Serve:
    """``voxlane serve`` in a subprocess; ``port`` once it listens."""

    def __init__(self, model: str, flags: list[str]) -> None:
        # The server log lives as long as the server (closed in close()).
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", prefix="voxlane-bench-load-", suffix=".log"
        )
        cmd = [sys.executable, "-m", "voxlane.cli", "serve", "--demo", model]
        cmd += ["--no-auth", "--port", "0", *flags]
        self.command = cmd
        self.send_timeout_s = _serve_args(model, flags).send_timeout
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ}
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"ws://[\d.]+:(\d+)", line)
        if not found:
            self.close()
            self.log.seek(0)
            raise RuntimeError(f"voxlane serve did not start: {line!r}\n{self.log.read()[-3000:]}")
        self.port = int(found.group(1))
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    async def metric(self, name: str) -> float:
        """The sum of a ``/metrics`` sample over its label sets (0 if absent)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()
        return self.process.returncode


# ------------------------------------------------------------------------------ the clients


async def _connect(url: str, **kwargs: Any) -> Any:
    import websockets

    ws = await websockets.connect(url, open_timeout=120, **kwargs)
    json.loads(await ws.recv())  # session.ready
    return ws


async def _configure(ws: Any, **fields: Any) -> None:
    await ws.send(json.dumps({"type": "session.configure", **fields}))
    while True:  # skip anything still in flight (a late turn.done, say)
        message = await ws.recv()
        if isinstance(message, str) and json.loads(message)["type"] == "session.configured":
            return


async def _turn(ws: Any, turn_id: str, text: str = TEXT) -> dict[str, Any]:
    """One one-shot turn: reason, first audio seconds, error codes, PCM."""
    t0 = time.perf_counter()
    start = {"type": "turn.start", "turn_id": turn_id, "text": text, "end": True}
    await ws.send(json.dumps(start))
    first: float | None = None
    errors: list[str] = []
    pcm = bytearray()
    while True:
        message = await asyncio.wait_for(ws.recv(), 300)
        if isinstance(message, bytes):
            if first is None:
                first = time.perf_counter() - t0
            pcm += message[20:]
            continue
        data = json.loads(message)
        if data["type"] == "error":
            errors.append(data["code"])
        elif data["type"] == "turn.done" and data["turn_id"] == turn_id:
            return {"reason": data["reason"], "first_audio_s": first, "errors": errors, "pcm": pcm}


async def _one_session(url: str, k: int, frames: int, seed: int) -> dict[str, Any]:
    try:
        ws = await _connect(url)
    except Exception as exc:  # refused handshake (HTTP 503), timeout
        return {"reason": f"connect: {type(exc).__name__}", "first_audio_s": None, "errors": []}
    try:
        await _configure(ws, sampling={"max_frames": frames, "seed": seed + k})
        return await _turn(ws, f"t{k}")
    except Exception as exc:
        return {"reason": f"dropped: {type(exc).__name__}", "first_audio_s": None, "errors": []}
    finally:
        await ws.close()


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))], 4)


async def _concurrent(serve: Serve, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(_one_session(serve.url, k, args.frames, args.seed) for k in range(args.sessions))
    )
    wall = time.perf_counter() - t0
    first = [r["first_audio_s"] for r in results if r["first_audio_s"] is not None]
    not_completed: dict[str, int] = {}
    for r in results:
        if r["reason"] != "completed":
            why = r["reason"] + "".join(f" ({e})" for e in r["errors"])
            not_completed[why] = not_completed.get(why, 0) + 1
    return {
        "completed_ratio_50": round(
            sum(r["reason"] == "completed" for r in results) / len(results), 4
        ),
        "first_audio_p50_s_50": _p(first, 0.5),
        "first_audio_p95_s_50": _p(first, 0.95),
        "not_completed_50": not_completed,
        "concurrent_wall_s": round(wall, 2),
    }


async def _stuck(serve: Serve, args: argparse.Namespace) -> dict[str, Any]:
    normal = await _connect(serve.url)
    await _configure(normal, sampling={"max_frames": args.frames, "seed": args.seed})
    n = 0

    failed: dict[str, int] = {}

    async def turns() -> list[float]:
        nonlocal n
        out = []
        for _ in range(args.stuck_turns):
            n += 1
            r = await _turn(normal, f"n{n}")
            if r["reason"] == "completed" and r["first_audio_s"] is not None:
                out.append(r["first_audio_s"])
            else:
                why = r["reason"] + "".join(f" ({e})" for e in r["errors"])
                failed[why] = failed.get(why, 0) + 1
        return out

    await turns()  # warm-up
    alone = await turns()
    # The stuck client: a tiny receive buffer and no client-side queue, then it reads nothing.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", serve.port))
    sock.setblocking(False)
    stuck = await _connect(serve.url, sock=sock, max_queue=1)
    await _configure(
        stuck,
        sample_rate=48000,
        sample_format="pcm_f32le",
        sampling={"max_frames": 1000, "seed": args.seed},
    )
    t_stuck = time.perf_counter()
    start = {"type": "turn.start", "turn_id": "flood", "text": LONG_TEXT, "end": True}
    await stuck.send(json.dumps(start))
    await asyncio.sleep(1.0)  # its first audio fills the socket buffers
    beside = await turns()
    completed_beside = len(beside)
    after = await turns()
    await normal.close()
    # Still reading nothing until the server must have given up: reading earlier would
    # unblock its sends. Then the buffered audio, and the close frame behind it.
    await asyncio.sleep(max(0.0, t_stuck + serve.send_timeout_s + 5.0 - time.perf_counter()))
    code = None
    stuck_errors: list[str] = []  # an "overloaded" here: the stuck turn never ran at all
    try:
        while True:
            message = await asyncio.wait_for(stuck.recv(), 10)
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                stuck_errors.append(json.loads(message)["code"])
    except asyncio.TimeoutError:
        pass  # still open
    except Exception:
        code = stuck.close_code
    finally:
        await stuck.close()
    base = alone + after
    delay = None
    if base and beside:
        delay = round(statistics.median(beside) - statistics.median(base), 4)
    return {
        "others_delay_s_with_stuck_client": delay,
        "first_audio_alone_s": _p(base, 0.5),
        "first_audio_beside_stuck_s": _p(beside, 0.5),
        "turns_completed_beside_stuck": f"{completed_beside}/{args.stuck_turns}",
        "stuck_client_close_code": code,
        "stuck_client_errors": stuck_errors,
        "normal_turns_not_completed": failed,
    }


async def _storm(serve: Serve, args: argparse.Namespace) -> dict[str, Any]:
    before = await serve.metric('voxlane_errors_total{code="engine_error"}')
    counts = dict.fromkeys(
        [
            "engine_error_messages",
            "unacked",
            "after_ack",
            "hung",
            "cancelled",
        ],
        0,
    )
    other_errors: dict[str, int] = {}
    ended: dict[str, int] = {}  # turns that ended without being cancelled, by reason
    per = [args.cancels // args.storm_sessions] * args.storm_sessions
    per[0] += args.cancels - sum(per)

    def error(data: dict[str, Any]) -> None:
        if data["code"] == "engine_error":
            counts["engine_error_messages"] += 1
        else:
            other_errors[data["code"]] = other_errors.get(data["code"], 0) + 1

    async def cancel_one(ws: Any, turn_id: str, when: int) -> None:
        """Start a turn, cancel it at point ``when`` (0 at once, 1 after turn.started, 2
        after its first audio), read up to its turn.done."""
        start = {"type": "turn.start", "turn_id": turn_id, "text": TEXT, "end": True}
        await ws.send(json.dumps(start))
        while when:
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, bytes):
                when = 0 if when == 2 else when
                continue
            data = json.loads(message)
            if data["type"] == "error":
                error(data)
            elif data["type"] == "turn.started" and when == 1:
                when = 0
            elif data["type"] == "turn.done" and data["turn_id"] == turn_id:
                why = f"{data['reason']} before the cancel"  # refused, or no audio at all
                ended[why] = ended.get(why, 0) + 1
                return
        await ws.send(json.dumps({"type": "turn.cancel", "turn_id": turn_id}))
        acked = False
        codes: list[str] = []
        while True:
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, bytes):
                counts["after_ack"] += acked
                continue
            data = json.loads(message)
            kind = data["type"]
            if kind == "error":
                error(data)
                codes.append(data["code"])
            elif kind == "turn.cancelled":
                acked = True
            elif kind == "turn.done" and data["turn_id"] == turn_id:
                if data["reason"] == "cancelled":
                    counts["cancelled"] += 1
                    counts["unacked"] += not acked  # the protocol promises the ack first
                else:  # it ended before the cancel arrived (refused, say): no cancel to ack
                    why = data["reason"] + "".join(f" ({c})" for c in codes)
                    ended[why] = ended.get(why, 0) + 1
                return
            elif acked and data.get("turn_id") == turn_id:
                counts["after_ack"] += 1

    async def storm(s: int, turns: int) -> None:
        k = 0
        while k < turns:
            # A session closed under the storm (1008 after too many late cancels of refused
            # turns, say) is replaced; a turn that hangs (60 s without a message) is counted.
            ws = await _connect(serve.url)
            try:
                await _configure(ws, sampling={"max_frames": 300, "seed": args.seed + s})
                while k < turns:
                    k += 1
                    await cancel_one(ws, f"s{s}-{k}", k % 3)
            except asyncio.TimeoutError:
                counts["hung"] += 1
            except Exception as exc:  # websockets' ConnectionClosed
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                key = f"session closed {code}"
                other_errors[key] = other_errors.get(key, 0) + 1
            finally:
                await ws.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(storm(s, n) for s, n in enumerate(per)))
    wall = time.perf_counter() - t0
    after = await serve.metric('voxlane_errors_total{code="engine_error"}')
    return {
        "engine_failures_cancel_storm": max(counts["engine_error_messages"], int(after - before)),
        "cancelled_turns": counts["cancelled"],
        "cancel_turns_requested": args.cancels,
        "cancels_unacked": counts["unacked"],
        "audio_after_cancel_ack": counts["after_ack"],
        "cancel_turns_ended_otherwise": ended,
        "cancel_storm_hung_turns": counts["hung"],
        "cancel_storm_other_errors": other_errors,
        "cancel_storm_wall_s": round(wall, 2),
    }


async def _reproducibility(serve: Serve, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    sampling = {"max_frames": args.frames, "seed": 1234, "temperature": 0.9}

    async def fresh(turn_id: str, seed: int = 1234) -> Any:
        ws = await _connect(serve.url)
        try:
            await _configure(ws, sampling={**sampling, "seed": seed})
            return np.frombuffer(bytes((await _turn(ws, turn_id))["pcm"]), "<i2")
        finally:
            await ws.close()

    a, b = await fresh("r1"), await fresh("r2")
    c, _, d = await asyncio.gather(fresh("r3"), fresh("r4", seed=99), fresh("r5"))
    lsb = None
    if a.shape == c.shape == d.shape:
        lsb = int(max(np.abs(c.astype(int) - a).max(), np.abs(d.astype(int) - a).max()))
    return {
        "same_seed_same_samples": bool(a.size and np.array_equal(a, b)),
        "same_seed_max_lsb_concurrent": lsb,
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    flags = shlex.split(args.serve_flags)
    serve = await asyncio.to_thread(Serve, args.model, flags)
    result: dict[str, Any] = {
        "model": args.model,
        "serve_flags": flags,
        "sessions": args.sessions,
        "frames": args.frames,
        "host": _host(),
    }
    try:
        result.update(await _concurrent(serve, args))
        result.update(await _stuck(serve, args))
        result.update(await _storm(serve, args))
        result.update(await _reproducibility(serve, args))
        result["server_alive_at_end"] = serve.process.poll() is None
    finally:
        result["server_exit_code"] = await asyncio.to_thread(serve.close)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase against one ``voxlane serve`` subprocess; one JSON object."""
    return asyncio.run(_main(args))
