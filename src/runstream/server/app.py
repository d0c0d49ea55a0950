"""The ASGI application: ``create_app(settings)``.

Routers: streams (``/v1/streams``) and service (``/healthz``, ``/readyz``,
``/metrics``, ``/``). Other layers add theirs through ``routers=`` (e.g. the
runs API) and hook into start-up/shutdown through ``on_startup=``; both get the
:class:`~runstream.server.runtime.Runtime` from ``app.state.runtime``. Every
request passes :class:`~runstream.server.security.SecurityMiddleware` first
(Host, CORS, content types, Origin).

Streaming responses end when :meth:`Runtime.begin_shutdown` is called. The
server in :mod:`runstream.server.serve` calls it as soon as it starts shutting
down; an app mounted elsewhere must arrange the same (the ASGI lifespan
shutdown comes only after every connection closed, too late for that).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from fastapi import APIRouter, FastAPI
from starlette.types import Receive, Scope, Send

from runstream._version import __version__
from runstream.backends import open_backend
from runstream.backends.base import EventLog
from runstream.config import Settings
from runstream.server import service, streams
from runstream.server.errors import install_error_handlers
from runstream.server.fastpath import FrontPath, events_route
from runstream.server.hub import Hub, HubLimits, Subscription
from runstream.server.metrics import LatencyMiddleware, Metrics
from runstream.server.runtime import Runtime
from runstream.server.security import SecurityMiddleware, SecurityPolicy

StartupHook = Callable[[Runtime], Awaitable[Callable[[], Awaitable[None]] | None]]
"""Called once the backend is started; may return a coroutine function run at shutdown."""


class RunstreamApp(FastAPI):
    """The FastAPI app, handing the events endpoint to its :class:`FrontPath` first."""

    front: FrontPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        if front is not None and front.match(scope):
            scope["app"] = self
            await front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    backend: EventLog | None = None,
    routers: Sequence[APIRouter] = (),
    on_startup: Sequence[StartupHook] = (),
    fast_path: bool = True,
) -> FastAPI:
    """Build the app. ``backend`` defaults to ``open_backend(settings.server.backend)``.

    Raises :class:`~runstream.errors.ConfigError` for an ``allowed_hosts`` or
    ``cors_origins`` entry that is not a host or an origin.

    A backend passed in is started by the app only if it is not yet started,
    and is closed by the app only if the app opened it.
    """
    settings = settings or Settings()
    owns = backend is None
    log_backend = backend if backend is not None else open_backend(settings.server.backend)
    hub_limits = HubLimits.from_settings(settings)
    holder: dict[str, Metrics] = {}

    def on_slow(sub: Subscription) -> None:
        holder["m"].slow_consumers.labels(sub.transport).inc()

    hub = Hub(log_backend, hub_limits, on_slow=on_slow)
    metrics = holder["m"] = Metrics(
        subscribers=lambda: float(hub.subscriber_count),
        unreadable=lambda: float(log_backend.unreadable_events),
    )
    sse_delivered, sse_resets = metrics.delivered["sse"], metrics.resets.labels("sse")

    def on_written(events: int, resets: int) -> None:
        if events:
            sse_delivered.inc(events)
        if resets:
            sse_resets.inc(resets)

    hub.on_written = on_written
    runtime = Runtime(settings, log_backend, hub, metrics, owns_backend=owns)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await log_backend.start()
        hub.start()
        cleanups = []
        try:
            for hook in on_startup:
                cleanup = await hook(runtime)
                if cleanup is not None:
                    cleanups.append(cleanup)
            yield
        finally:
            runtime.begin_shutdown()
            for cleanup in reversed(cleanups):
                await cleanup()
            await hub.close()
            if owns:
                await log_backend.aclose()

    app = RunstreamApp(
        title="runstream",
        version=__version__,
        description="Durable event streams over SSE, WebSocket and JSON long-poll.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(streams.router)
    # The runs API (``/v1/tasks``, ``/v1/runs``) is added here by its own router.
    for router in routers:
        app.include_router(router)
    app.include_router(service.router)
    if fast_path:
        # Matched before the routed handlers of the same path (which then only document it).
        app.router.routes.insert(0, events_route(runtime))
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    # Outermost (added last): Host, CORS, content types and Origin are checked before the
    # fast path or any route sees a request.
    policy = SecurityPolicy.from_settings(settings)
    app.add_middleware(SecurityMiddleware, policy=policy)
    if fast_path:
        app.front = FrontPath(runtime, policy, metrics)
    return app
