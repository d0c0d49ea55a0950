"""Counters a follower and its handlers keep, and an optional Prometheus export.

One :class:`Metrics` object belongs to one follower (one ``follow()`` or
``run_forever()``). It is plain data updated on the event loop; read it from
handlers through ``ctx.metrics`` (or the shortcuts on the context), or call
:func:`export_prometheus` to expose it on a ``prometheus_client`` registry.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, math.inf)
"""Upper bounds (seconds) of the receipt-to-handled latency histogram."""


@dataclass(slots=True)
class LatencyStats:
    """Receipt-to-handled latency of events: count, sum, max and a cumulative histogram."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass(slots=True)
class Metrics:
    """What one follower observed.

    ``reconnects`` counts reconnections by reason (``"network"``, ``"eof"``,
    ``"http_503"``, ``"first_event"``, ``"idle"``, ``"stale"``, ``"gap"``, ...);
    ``watchdog_kills`` counts connections dropped by each watchdog timer.
    ``handler_exceptions`` counts every failed handler call, ``handler_retries``
    the calls made again, ``dead_lettered`` the items given up on.
    """

    events: int = 0
    resets: int = 0
    reconnects: Counter[str] = field(default_factory=Counter)
    watchdog_kills: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    duplicates_dropped: int = 0
    handler_exceptions: int = 0
    handler_retries: int = 0
    dead_lettered: int = 0
    handled: int = 0
    latency: LatencyStats = field(default_factory=LatencyStats)
    queue_depth: int = 0
    last_id: int = 0
    epoch: str | None = None
    mode: str = "stream"
    connections: int = 0
    bytes_received: int = 0
    checkpoint: str | None = None
    """The last position saved to the checkpoint store (``run_forever(checkpoint=...)``)."""
    checkpoint_errors: int = 0

    @property
    def reconnect_count(self) -> int:
        return sum(self.reconnects.values())

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy of every figure."""
        return {
            "events": self.events,
            "resets": self.resets,
            "reconnects": dict(self.reconnects),
            "reconnect_count": self.reconnect_count,
            "watchdog_kills": dict(self.watchdog_kills),
            "malformed": self.malformed,
            "duplicates_dropped": self.duplicates_dropped,
            "handler_exceptions": self.handler_exceptions,
            "handler_retries": self.handler_retries,
            "dead_lettered": self.dead_lettered,
            "handled": self.handled,
            "latency": {
                "count": self.latency.count,
                "mean": self.latency.mean,
                "max": self.latency.max,
            },
            "queue_depth": self.queue_depth,
            "last_id": self.last_id,
            "epoch": self.epoch,
            "mode": self.mode,
            "connections": self.connections,
            "bytes_received": self.bytes_received,
            "checkpoint": self.checkpoint,
            "checkpoint_errors": self.checkpoint_errors,
        }


class _Collector:
    """A ``prometheus_client`` custom collector reading one :class:`Metrics` on scrape."""

    def __init__(self, metrics: Metrics, prefix: str, labels: dict[str, str]) -> None:
        self._m = metrics
        self._prefix = prefix
        self._labels = labels

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m, p = self._m, self._prefix
        keys = list(self._labels)
        vals = list(self._labels.values())

        def counter(name: str, doc: str, value: float) -> Any:
            fam = CounterMetricFamily(f"{p}_{name}", doc, labels=keys)
            fam.add_metric(vals, value)
            return fam

        def gauge(name: str, doc: str, value: float) -> Any:
            fam = GaugeMetricFamily(f"{p}_{name}", doc, labels=keys)
            fam.add_metric(vals, value)
            return fam

        yield counter("events", "Events delivered by the follower", m.events)
        yield counter("resets", "History-lost resets received", m.resets)
        yield counter("malformed", "Malformed messages skipped", m.malformed)
        yield counter("handler_exceptions", "Handler calls that raised", m.handler_exceptions)
        yield counter("handler_retries", "Handler calls retried after a failure", m.handler_retries)
        yield counter(
            "dead_lettered", "Items given up on after their handler's retries", m.dead_lettered
        )
        yield counter("checkpoint_errors", "Checkpoint saves that failed", m.checkpoint_errors)
        rec = CounterMetricFamily(
            f"{p}_reconnects", "Reconnections by reason", labels=[*keys, "reason"]
        )
        for reason, n in sorted(m.reconnects.items()):
            rec.add_metric([*vals, reason], n)
        yield rec
        kills = CounterMetricFamily(
            f"{p}_watchdog_kills", "Connections dropped by a watchdog", labels=[*keys, "kind"]
        )
        for kind, n in sorted(m.watchdog_kills.items()):
            kills.add_metric([*vals, kind], n)
        yield kills
        yield gauge("queue_depth", "Events waiting for a handler", m.queue_depth)
        yield gauge("last_id", "Id of the last delivered event", m.last_id)
        hist = HistogramMetricFamily(
            f"{p}_event_latency_seconds", "Receipt to handled latency", labels=keys
        )
        bounds = [("+Inf" if math.isinf(b) else repr(b)) for b in LATENCY_BUCKETS]
        hist.add_metric(
            vals,
            list(zip(bounds, [float(c) for c in m.latency.buckets], strict=True)),
            m.latency.total,
        )
        yield hist


def export_prometheus(
    metrics: Metrics,
    registry: Any = None,
    *,
    prefix: str = "runstream_client",
    labels: dict[str, str] | None = None,
) -> Any:
    """Register ``metrics`` on a ``prometheus_client`` registry (default: the global one).

    Returns the collector; pass it to ``registry.unregister`` when the follower
    is done. Use ``labels`` (e.g. ``{"stream": name}``) and distinct values to
    export several followers on one registry.
    """
    from prometheus_client import REGISTRY

    collector = _Collector(metrics, prefix, labels or {})
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
