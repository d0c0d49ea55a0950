"""Prometheus metrics, one registry per app (never the process-global one).

Each app owns a :class:`Metrics`; two apps in one process (tests) do not share
or collide. :class:`LatencyMiddleware` observes request latency up to the
response start, which for a streaming response is its time to first byte.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TRANSPORTS = ("sse", "ws", "longpoll")
ROUTE_KEY = "runstream.route"
"""Scope key naming the route template for requests served outside the router."""


class Metrics:
    """The server's counters. Label ``transport`` is ``sse``, ``ws`` or ``longpoll``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        subscribers: Callable[[], float] | None = None,
        unreadable: Callable[[], float] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.open_connections = Gauge(
            "runstream_open_connections", "Open streaming connections.", ["transport"], registry=r
        )
        self.connections = Counter(
            "runstream_connections", "Streaming connections accepted.", ["transport"], registry=r
        )
        self.events_appended = Counter(
            "runstream_events_appended", "Events appended through the API.", registry=r
        )
        self.events_delivered = Counter(
            "runstream_events_delivered", "Events written to clients.", ["transport"], registry=r
        )
        self.slow_consumers = Counter(
            "runstream_slow_consumer_disconnects",
            "Clients disconnected because they fell behind their buffer.",
            ["transport"],
            registry=r,
        )
        self.disconnects = Counter(
            "runstream_stream_ends",
            "Streaming responses ended, by reason.",
            ["transport", "reason"],
            registry=r,
        )
        self.resumes = Counter(
            "runstream_resumes",
            "Streaming reads that resumed from a position (Last-Event-ID or after).",
            ["transport"],
            registry=r,
        )
        self.resets = Counter(
            "runstream_resets",
            "Reset control events sent (or 410 answers): history could not be served.",
            ["transport"],
            registry=r,
        )
        self.latency = Histogram(
            "runstream_http_request_duration_seconds",
            "Time from request to response start, by route.",
            ["method", "route", "status"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        gauge = Gauge("runstream_subscribers", "Subscriptions held by the fan-out hub.", registry=r)
        if subscribers is not None:
            gauge.set_function(subscribers)
        unreadable_gauge = Gauge(
            "runstream_unreadable_events",
            "Stored entries served as 'unreadable' items since start (see the server log).",
            registry=r,
        )
        if unreadable is not None:
            unreadable_gauge.set_function(unreadable)
        # Bound children for the per-batch hot path (labels() takes a lock each call).
        self.delivered = {t: self.events_delivered.labels(t) for t in TRANSPORTS}
        for t in TRANSPORTS:  # make every series visible from the start
            self.open_connections.labels(t)
            self.connections.labels(t)
            self.events_delivered.labels(t)
            self.slow_consumers.labels(t)
            self.resumes.labels(t)
            self.resets.labels(t)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """Pure ASGI middleware (does not buffer streaming bodies) timing each HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route: Any = scope.get("route")
                path = getattr(route, "path", None) or scope.get(ROUTE_KEY) or "unmatched"
                self.metrics.latency.labels(
                    scope.get("method", ""), path, str(message["status"])
                ).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, timed_send)
