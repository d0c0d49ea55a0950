"""Helpers for tests over real HTTP: a uvicorn server in the test's loop, an SSE reader.

``start_server(settings=..., backend=...)`` returns a :class:`LiveServer` with
its base ``url``; the fixture stops every server it started. Reusable by any
test that needs the HTTP API (the runs API adds its routers via ``routers=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
from fastapi import FastAPI

from runstream.config import LimitSettings, ServerSettings, Settings
from runstream.protocol.sse import SSEDecoder, SSEMessage
from runstream.server.runtime import Runtime
from runstream.server.serve import Server, make_server


class TestServer(Server):
    __test__ = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The test process keeps its own signal handlers (pytest's Ctrl-C).
        yield


async def serve_in_task(
    app: FastAPI, settings: Settings, *, port: int = 0, **config: Any
) -> LiveServer:
    """Start ``app`` on loopback in this loop; returns once it accepts connections.

    ``port`` 0 takes a free one; a given port may be one a stopped server just used.
    ``config`` goes to :func:`make_server` (uvicorn options such as ``http="h11"``).
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    server = make_server(app, settings, server_class=TestServer, log_level="warning", **config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 20
    while not server.started:  # uvicorn exposes readiness only as a flag
        if task.done():
            task.result()
            raise RuntimeError("server exited during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start in 20 s")
        await asyncio.sleep(0.01)
    return LiveServer(app, server, task, port)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, settings: Settings) -> Iterator[str]:
    """Run ``app`` in its own thread and loop (for synchronous callers); yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, settings, log_level="critical")
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:  # uvicorn exposes readiness only as a flag
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@dataclasses.dataclass
class LiveServer:
    app: FastAPI
    server: Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    async def stop(self) -> float:
        """Ask the server to exit as on SIGTERM; returns how long it took to finish."""
        start = time.monotonic()
        self.server.should_exit = True
        await self.task
        return time.monotonic() - start


def make_settings(**server: Any) -> Settings:
    """Settings for tests; ``limit_*`` keywords go to ``[limits]``, the rest to ``[server]``."""
    limits = {k[6:]: v for k, v in server.items() if k.startswith("limit_")}
    rest = {k: v for k, v in server.items() if not k.startswith("limit_")}
    tokens = rest.pop("tokens", ())
    return Settings(
        server=ServerSettings(**{"keepalive": 15.0, "log_level": "warning", **rest}),
        limits=LimitSettings(**limits),
        tokens=tuple(tokens),
    )


StartServer = Callable[..., Awaitable[LiveServer]]


class SSEReader:
    """Reads an SSE response incrementally with the protocol decoder."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.decoder = SSEDecoder()
        self._chunks = response.aiter_bytes()
        self._pending: list[SSEMessage] = []
        self.comments_seen = 0
        self.eof = False

    async def next(self) -> SSEMessage | None:
        """The next event, or ``None`` at the end of the body."""
        while not self._pending:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self.eof = True
                self._pending.extend(self.decoder.close())
                if not self._pending:
                    return None
                break
            self._pending.extend(self.decoder.feed(chunk))
        return self._pending.pop(0)

    async def take(self, n: int) -> list[SSEMessage]:
        out = []
        for _ in range(n):
            msg = await self.next()
            if msg is None:
                break
            out.append(msg)
        return out

    async def rest(self) -> list[SSEMessage]:
        out = []
        while (msg := await self.next()) is not None:
            out.append(msg)
        return out


@contextlib.asynccontextmanager
async def open_sse(
    client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None, **params: Any
) -> AsyncIterator[SSEReader]:
    hdrs = {"Accept": "text/event-stream", **(headers or {})}
    # Passing params={} would drop a query string already in ``path``.
    async with client.stream("GET", path, headers=hdrs, params=params or None) as response:
        yield SSEReader(response)


async def publish(
    client: httpx.AsyncClient, stream: str, n: int, *, start: int = 0, type_: str = "tick"
) -> None:
    """Append ``n`` events ``{"i": start..start+n-1}`` in one batch."""
    body = [{"type": type_, "data": {"i": start + i}} for i in range(n)]
    r = await client.post(f"/v1/streams/{stream}/events", json=body)
    assert r.status_code == 201, r.text
