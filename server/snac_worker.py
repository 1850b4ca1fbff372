"""Exact streaming SNAC decoding in a process of its own.

:class:`SnacWorkerProgram` has the interface of :class:`~voxlane.server.snac_stream.SnacProgram`
(``new_stream``, ``run``, ``delay``), so :class:`~voxlane.server.snac_stream.ExactStreamingDecoder`
and :class:`~voxlane.server.snac_stream.DecodeBatcher` use it unchanged, but the layers run in a
child process that holds its own SNAC and every stream's state. Only frames (7 codes each) go
in and PCM comes out, over a socket pair.

Why a process: the decoder is a few hundred short torch calls per run, each of which releases
and retakes the GIL. In one process those calls take turns with the engine thread's Python
(scheduling, heads, sampling) and the event loop, and each side waits for the other: measured
with two streams on the small demo model, a codec run took twice its own CPU time in wall time
and the engine's steps grew by up to 25 %. In a child process the codec thread of the server
only waits on a socket (GIL released), and the child has a core of its own to run on.

The child is started with ``python -m voxlane.server.snac_worker`` (not ``multiprocessing``'s
spawn, which imports the parent's ``__main__`` again), exits when its socket closes (so it cannot
outlive the server), and is started again by the next run if it died; streams of the dead child
then fail with :class:`~voxlane.errors.EngineError` (their state was lost with it), new streams
work.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from voxlane.errors import EngineError, VoxlaneError
from voxlane.server.orpheus import FRAME_SIZE, Frame
from voxlane.server.snac_stream import check_run

__all__ = ["SnacWorkerProgram", "WorkerStream"]

log = logging.getLogger("voxlane.server")


@dataclass(eq=False)
class WorkerStream:
    """One utterance decoded by a :class:`SnacWorkerProgram`; the layer state lives in the child.

    Same counters as :class:`~voxlane.server.snac_stream.SnacStream`."""

    key: int
    generation: int = 0  # the child holding its state (0: none yet, bound by its first run)
    frames_in: int = 0
    samples_out: int = 0
    finished: bool = False
    noise_seed: int | None = None  # SNAC's noise seed, sent with every run (None: random)
    _release: Any = None  # weakref.finalize telling the child to drop the state


class SnacWorkerProgram:
    """A :class:`~voxlane.server.snac_stream.SnacProgram` running in a child process.

    ``source``: the SNAC checkpoint (HF id or local directory) the child loads, the one
    ``codec`` (the parent's :class:`~voxlane.server.codec.SnacCodec`) was loaded from; each run
    reads ``codec.noise``. ``threads``: torch intra-op threads of the child (None: torch's
    default). ``precision``: the
    child's :class:`SnacProgram` ``precision``. Starting takes a few seconds (importing torch,
    loading SNAC); the constructor waits up to ``start_timeout_s`` for it and raises the child's
    error (:class:`~voxlane.errors.ModelFormatError` for a SNAC it cannot stream, say).

    ``run`` is blocking and serialised (one run at a time); call it from a worker thread. Close
    the program (:meth:`close`, or ``with``) to stop the child.
    """

    def __init__(
        self,
        source: str,
        codec: Any,
        *,
        threads: int | None = None,
        precision: str = "float32",
        start_timeout_s: float = 180.0,
    ) -> None:
        self.source = source
        self.codec = codec
        self.threads = threads
        self.precision = precision
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self._released: list[int] = []  # keys whose streams were dropped unfinished
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._generation = 0
        self._closed = False
        #: Runs the child served, and the child processes started (1 unless one died).
        self.runs = 0
        self.starts = 0
        self.delay = 0
        with self._lock:
            self._start()

    # -- process ----------------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = socket.socketpair()
        cmd = [
            sys.executable,
            "-m",
            "voxlane.server.snac_worker",
            "--fd",
            str(child.fileno()),
            "--source",
            self.source,
            "--device",
            str(getattr(self.codec, "device", "cpu")),
            "--threads",
            str(self.threads or 0),
            "--precision",
            self.precision,
        ]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        conn = Connection(parent.detach())
        try:
            if not conn.poll(self.start_timeout_s):
                raise EngineError(
                    f"the SNAC decoding process did not start within {self.start_timeout_s:g} s"
                )
            reply = conn.recv()
        except (EOFError, OSError) as exc:
            proc.wait(timeout=30)
            conn.close()
            raise EngineError(
                f"the SNAC decoding process exited while starting (code {proc.returncode})"
            ) from exc
        except BaseException:
            _stop(proc, conn)
            raise
        if reply[0] != "ready":
            _stop(proc, conn)
            raise _error(reply)
        self.delay = int(reply[1])
        self._proc, self._conn = proc, conn
        self._generation += 1
        self.starts += 1
        self._released.clear()  # keys of the old child mean nothing to this one

    @property
    def pid(self) -> int | None:
        """The child's process id (None once closed)."""
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """Stop the child (waits for it briefly, then kills it); idempotent."""
        with self._lock:
            self._closed = True
            proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is not None and conn is not None:
            _stop(proc, conn)

    def __enter__(self) -> SnacWorkerProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- streams ----------------------------------------------------------------------------
    def new_stream(self, noise_seed: int | None = None) -> WorkerStream:
        """Fresh state for one utterance (created in the child by its first run);
        ``noise_seed`` seeds SNAC's noise (None: random)."""
        stream = WorkerStream(key=next(self._keys), noise_seed=noise_seed)
        # An utterance abandoned before its final run (barge-in, a failed turn): the child
        # drops its state with the next run.
        stream._release = weakref.finalize(stream, self._released.append, stream.key)
        return stream

    def run(self, jobs: Sequence[tuple[WorkerStream, Sequence[Frame], bool]]) -> list[np.ndarray]:
        """:meth:`SnacProgram.run <voxlane.server.snac_stream.SnacProgram.run>` in the child.

        Raises ``ValueError`` for a stream given twice or already ended (as ``SnacProgram``),
        :class:`~voxlane.errors.EngineError` if the child failed (the run's streams end) or
        died (its streams end; the next run starts a new child).
        """
        if not jobs:
            return []
        states = check_run(jobs)
        with self._lock:
            if self._closed:
                raise EngineError("the SNAC decoding process is closed")
            if self._conn is None:
                self._start()
            for s in states:
                if s.generation == 0:
                    s.generation = self._generation
            stale = [s for s in states if s.generation != self._generation]
            if stale:
                for s in stale:
                    s.finished = True
                raise EngineError(
                    "the SNAC decoding process restarted and lost this stream's state;"
                    " start a new stream"
                )
            released, self._released[:] = list(self._released), []
            message = (
                "run",
                bool(getattr(self.codec, "noise", False)),
                released,
                [
                    (
                        s.key,
                        np.asarray(frames, dtype=np.int16).reshape(-1).tobytes(),
                        bool(final),
                        s.noise_seed,
                    )
                    for s, frames, final in jobs
                ],
            )
            try:
                assert self._conn is not None
                self._conn.send(message)
                reply = self._conn.recv()
            except (EOFError, OSError) as exc:
                code = self._died()
                for s in states:
                    s.finished = True
                raise EngineError(f"the SNAC decoding process exited (code {code})") from exc
            self.runs += 1
        if reply[0] != "ok":
            for s in states:
                s.finished = True
            raise _error(reply)
        outs: list[np.ndarray] = reply[1]
        for (s, frames, final), pcm in zip(jobs, outs, strict=True):
            s.frames_in += len(frames)
            s.samples_out += pcm.size
            if final:
                s.finished = True
                s._release.detach()  # the child dropped it already
        return outs

    def live_streams(self) -> int:
        """Streams whose state the child holds (started, not finished, not yet released)."""
        with self._lock:
            if self._conn is None:
                return 0
            released, self._released[:] = list(self._released), []
            try:
                self._conn.send(("run", False, released, []))
                self._conn.recv()
                self._conn.send(("streams",))
                return int(self._conn.recv()[1])
            except (EOFError, OSError) as exc:
                code = self._died()
                raise EngineError(f"the SNAC decoding process exited (code {code})") from exc

    def _died(self) -> int | None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None or conn is None:
            return None
        _stop(proc, conn)
        log.error("the SNAC decoding process exited (code %s); restarting", proc.returncode)
        return proc.returncode


def _stop(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    with contextlib.suppress(OSError):
        conn.send(("close",))
    conn.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _error(reply: tuple[Any, ...]) -> BaseException:
    """The exception a child reported (``("error", pickled exception, text)``)."""
    try:
        exc = pickle.loads(reply[1])
    except Exception:
        exc = None
    if isinstance(exc, VoxlaneError):
        return exc
    return EngineError(f"SNAC decoding failed: {reply[2]}")


def _report(conn: Connection, exc: BaseException) -> None:
    try:
        blob = pickle.dumps(exc)
    except Exception:
        blob = b""
    conn.send(("error", blob, f"{type(exc).__name__}: {exc}"))


def _serve(conn: Connection, source: str, device: str, threads: int, precision: str) -> None:
    """The child's loop: load SNAC, then serve runs until the socket closes."""
    import torch

    from voxlane.server.codec import load_snac
    from voxlane.server.snac_stream import SnacProgram

    try:
        if threads:
            torch.set_num_threads(threads)
        codec = load_snac(source, device=device, noise=False)
        program = SnacProgram(codec, precision=precision)
    except Exception as exc:
        _report(conn, exc)
        return
    conn.send(("ready", program.delay))
    streams: dict[int, Any] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if message[0] == "close":
            return
        if message[0] == "streams":
            conn.send(("ok", len(streams)))
            continue
        _, noise, released, jobs = message
        for key in released:
            streams.pop(key, None)
        codec.noise = noise
        batch = []
        for key, codes, final, noise_seed in jobs:
            stream = streams.get(key)
            if stream is None:
                stream = streams[key] = program.new_stream(noise_seed)
            frames = np.frombuffer(codes, dtype=np.int16).reshape(-1, FRAME_SIZE)
            batch.append((stream, frames, final))
        try:
            outs = program.run(batch)
        except Exception as exc:  # half-advanced states are of no use: drop them
            for key, *_ in jobs:
                streams.pop(key, None)
            _report(conn, exc)
            continue
        for key, _, final, _ in jobs:
            if final:
                streams.pop(key, None)
        conn.send(("ok", outs))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the child (``python -m voxlane.server.snac_worker``)."""
    p = argparse.ArgumentParser(description="voxlane's SNAC decoding process (started by voxlane)")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precision", default="float32")
    args = p.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(os.dup(args.fd))
    os.close(args.fd)
    try:
        _serve(conn, args.source, args.device, args.threads, args.precision)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
