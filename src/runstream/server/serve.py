"""Running the app under uvicorn with a prompt, explicit graceful shutdown.

uvicorn's shutdown stops accepting, then waits for open connections to finish
before it runs the ASGI lifespan shutdown. An SSE or WebSocket response never
finishes by itself, so the app must be told *before* that wait. Rather than
patching uvicorn, :class:`Server` subclasses it and calls the app's
:meth:`Runtime.begin_shutdown` at the start of its own ``shutdown``; every open
stream then ends within ``shutdown_grace`` seconds.

Secrets stay out of its logs: :func:`make_server` puts
:class:`~runstream.redact.RedactingFilter` on uvicorn's loggers, so the access
log shows ``?token=***``.

The connection-level limits uvicorn lacks (a timeout for requests that never
finish arriving, a connection cap that still lets real clients in, quiet
``accept()`` failures) come from :class:`~runstream.server.connections.ConnectionGuard`,
whose protocol classes (uvicorn's own, subclassed) :func:`make_server` passes to
uvicorn.

Once started, the server also takes what it allocated while starting (modules,
the app, the schemas: most of its heap) out of the cyclic garbage collector's
way with :func:`gc.freeze`. A full collection otherwise walks all of it every
time, and with a thousand connections open that stalls the event loop, and
every stream with it, for a tenth of a second or more.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from runstream.config import Settings
from runstream.redact import install_log_redaction
from runstream.server.app import create_app
from runstream.server.connections import ConnectionGuard, connection_limits
from runstream.server.runtime import Runtime

log = logging.getLogger("runstream.server")

GC_THRESHOLDS = (20_000, 50, 100)
"""Collector thresholds while serving (CPython's default is 700, 10, 10)."""


class Server(uvicorn.Server):
    """A uvicorn server that ends the app's streaming responses when it starts shutting down."""

    def __init__(
        self,
        config: uvicorn.Config,
        runtime: Runtime,
        *,
        settle_heap: bool = False,
        guard: ConnectionGuard | None = None,
    ) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.settle_heap = settle_heap
        self.guard = guard

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        guard = self.guard
        if guard is not None:
            guard.install(asyncio.get_running_loop())
        try:
            await super().startup(sockets)
        finally:
            if guard is not None and not self.started:
                guard.uninstall()
        if guard is not None and self.started:
            self.runtime.metrics.registry.register(guard)
        if self.settle_heap and not self.should_exit:
            settle_heap()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.runtime.begin_shutdown()
        try:
            await super().shutdown(sockets)
        finally:
            if self.guard is not None:
                self.guard.uninstall()
                with contextlib.suppress(KeyError):
                    self.runtime.metrics.registry.unregister(self.guard)


def settle_heap() -> None:
    """Collect once, then exempt every surviving object from later collections.

    Called when startup is done: what exists then lives as long as the process,
    so scanning it again on every full collection only costs pauses. Objects
    made later (connections, requests) are collected as usual.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def make_server(
    app: FastAPI,
    settings: Settings,
    *,
    server_class: type[Server] | None = None,
    settle: bool = False,
    **config: Any,
) -> Server:
    """A :class:`Server` for ``app`` on the settings' host and port; ``config`` goes to uvicorn.

    ``http`` may name the parser (``"httptools"``, ``"h11"``; default ``"auto"``): the
    connection guard wraps whichever it is.

    ``settle`` calls :func:`settle_heap` once started: for a process that only
    serves (it changes the collector for the whole process).
    """
    s, lim = settings.server, settings.limits
    max_connections, backlog, nofile = connection_limits(lim.max_connections)
    if lim.max_connections is not None and max_connections < lim.max_connections:
        log.warning(
            "limits.max_connections=%d does not fit the open-file limit (%d): using %d",
            lim.max_connections,
            nofile,
            max_connections,
        )
    guard = ConnectionGuard(header_timeout=lim.header_timeout, max_connections=max_connections)
    options: dict[str, Any] = {
        "host": s.host,
        "port": s.port,
        "log_level": s.log_level,
        "lifespan": "on",
        # A backstop only: streams end on begin_shutdown well before this.
        "timeout_graceful_shutdown": max(5.0, s.shutdown_grace * 5),
        "proxy_headers": False,
        "backlog": backlog,
    }
    http = config.pop("http", "auto")
    # A parser by name keeps the guard; a protocol class given here replaces it.
    options["http"] = guard.http_protocol(http) if isinstance(http, str) else http
    ws = guard.ws_protocol()
    if ws is not None:
        options["ws"] = ws
    options.update(config)
    runtime: Runtime = app.state.runtime
    uv_config = uvicorn.Config(app, **options)  # configures uvicorn's loggers
    # uvicorn logs request paths with their query strings (?token= for EventSource).
    install_log_redaction()
    return (server_class or Server)(uv_config, runtime, settle_heap=settle, guard=guard)


def serve(settings: Settings, app: FastAPI | None = None) -> None:
    """Run the API until SIGTERM/SIGINT. Refuses a non-loopback bind without a token.

    Raises :class:`~runstream.errors.ConfigError` before binding if the
    settings are unsafe or invalid.
    """
    settings.check_bind()
    app = app or create_app(settings)
    server = make_server(app, settings, settle=True)
    # asyncio's own loop, not uvicorn's "auto" choice (uvloop): the runner needs
    # asyncio.SubprocessTransport, and uvloop measured no faster on appends
    # (docs/benchmarks.md).
    asyncio.run(server.serve())
