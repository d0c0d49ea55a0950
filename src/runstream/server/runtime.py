"""What every request handler needs, held in ``app.state.runtime``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from runstream.backends.base import EventLog
from runstream.config import Settings
from runstream.server.hub import Hub
from runstream.server.metrics import Metrics


@dataclass(eq=False)
class Runtime:
    """Settings, backend, fan-out hub, metrics and the shutdown signal of one app.

    :meth:`begin_shutdown` is what makes open streaming responses end promptly:
    the server calls it when it starts shutting down (before waiting for
    connections to finish), not from the lifespan's shutdown, which the server
    runs only after every connection has closed.
    """

    settings: Settings
    backend: EventLog
    hub: Hub
    metrics: Metrics
    owns_backend: bool = True
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)

    def begin_shutdown(self) -> None:
        """End every open SSE/WS/long-poll response now. Idempotent; call on the loop."""
        if not self.shutting_down.is_set():
            self.shutting_down.set()
            self.hub.begin_close()


def get_runtime(conn: HTTPConnection) -> Runtime:
    runtime: Runtime = conn.app.state.runtime
    return runtime
