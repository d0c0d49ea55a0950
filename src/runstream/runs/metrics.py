"""Prometheus metrics of the runs layer, registered on the app's own registry.

Counts are what *this process* saw: runs it created, runs its workers
finished, runs it found abandoned. With several servers or workers, sum the
series across processes. Redis queue depth and janitor counters are reported
by the Redis dispatch layer.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runstream.runs.lifecycle import FINISHED
from runstream.runs.model import RunRecord

__all__ = ["DURATION_BUCKETS", "RunMetrics"]

DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600)
"""Seconds; runs last from a fraction of a second to hours."""


class RunMetrics:
    """The runs series. Create one per app registry (names must be unique in it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.created = Counter(
            "runstream_runs_created", "Runs created through this server.", ["task"], registry=r
        )
        self.finished = Counter(
            "runstream_runs_finished",
            "Runs finished by this process's workers, by final status.",
            ["status"],
            registry=r,
        )
        self.duration = Histogram(
            "runstream_run_duration_seconds",
            "Time from start to finish of runs executed by this process, by final status.",
            ["status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.lost = Counter(
            "runstream_runs_lost",
            "Runs found left running by a dead worker and marked lost.",
            registry=r,
        )
        self.retried = Counter(
            "runstream_runs_retried", "Lost runs queued again for another attempt.", registry=r
        )
        self.running = Gauge(
            "runstream_runs_running", "Runs executing in this process now.", registry=r
        )
        self.queue_depth = Gauge(
            "runstream_runs_queue_depth",
            "Runs waiting for a free slot of this process's worker pool.",
            registry=r,
        )
        for status in sorted(FINISHED):  # every series visible from the start
            self.finished.labels(status)

    def track_pool(self, running: Callable[[], float], pending: Callable[[], float]) -> None:
        """Read the running and waiting counts from a pool at scrape time."""
        self.running.set_function(running)
        self.queue_depth.set_function(pending)

    def observe_finished(self, record: RunRecord) -> None:
        """Count a run this process executed to its end (call once per attempt)."""
        if record.status not in FINISHED:
            return
        self.finished.labels(record.status).inc()
        if record.started_at is not None and record.finished_at is not None:
            self.duration.labels(record.status).observe(
                max(0.0, record.finished_at - record.started_at)
            )
