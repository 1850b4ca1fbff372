"""Prometheus metrics of a voxlane server (served at ``/metrics``).

Each :class:`ServerMetrics` has its own registry, so several servers (tests) can live in one
process without clashing over metric names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from voxlane.errors import VoxlaneError
    from voxlane.server.pipeline import TurnMetrics

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_RTF_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0)


class ServerMetrics:
    """The server's counters, gauges and histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("voxlane_sessions", "Open WebSocket sessions.", registry=r)
        self.session_seconds = Histogram(
            "voxlane_session_seconds",
            "Session durations.",
            buckets=(1, 10, 60, 300, 1800, 3600, 4 * 3600),
            registry=r,
        )
        self.turns = Counter("voxlane_turns", "Finished turns by outcome.", ["reason"], registry=r)
        self.first_audio = Histogram(
            "voxlane_first_audio_seconds",
            "First text delta to first audio chunk sent, per turn.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "voxlane_real_time_factor",
            "Generation seconds per second of audio, per turn (below 1 is faster than real time).",
            buckets=_RTF_BUCKETS,
            registry=r,
        )
        self.underruns = Counter(
            "voxlane_underruns", "Moments a stream fell behind real time.", registry=r
        )
        self.audio_seconds = Counter(
            "voxlane_audio_seconds", "Seconds of audio generated.", registry=r
        )
        self.errors = Counter("voxlane_errors", "Errors by code.", ["code"], registry=r)
        self.capped_segments = Counter(
            "voxlane_segments_capped",
            "Segments the speech LM did not end, cut at the most frames their text can take.",
            registry=r,
        )
        self.close_undelivered = Counter(
            "voxlane_close_undelivered",
            "Close frames that could not reach their client (it stopped reading), by close code.",
            ["code"],
            registry=r,
        )

    def observe_turn(self, m: TurnMetrics, error: VoxlaneError | None) -> None:
        """Record a finished turn."""
        reason = "cancelled" if m.cancelled else ("error" if error is not None else "completed")
        self.turns.labels(reason).inc()
        if error is not None:
            self.errors.labels(error.code).inc()
        if m.ttfa_s is not None:
            self.first_audio.observe(m.ttfa_s)
        if m.rtf is not None:
            self.rtf.observe(m.rtf)
        self.underruns.inc(m.underruns)
        self.audio_seconds.inc(m.audio_s)
        self.capped_segments.inc(m.capped_segments)

    def render(self) -> str:
        """The Prometheus text exposition."""
        return generate_latest(self.registry).decode()
