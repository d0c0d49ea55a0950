"""A real runstream server (uvicorn on loopback, memory backend) and a fault proxy before it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from runstream.backends.memory.log import MemoryEventLog
from runstream.config import ServerSettings, Settings, Token
from runstream.server.app import create_app
from runstream.server.serve import Server, make_server

from .faultproxy import FaultProxy


class _TestServer(Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # pytest keeps its own signal handlers.
        yield


@dataclass
class LiveServer:
    url: str
    port: int
    backend: MemoryEventLog
    settings: Settings


async def start_server(
    *,
    retry_ms: int = 5,
    keepalive: float = 0.1,
    tasks: dict[str, dict[str, object]] | None = None,
    tokens: tuple[Token, ...] = (),
    **server: object,
) -> tuple[LiveServer, asyncio.Task[None], tuple[Server, socket.socket]]:
    """Start the app (plus the runs API when ``tasks`` are declared) on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = Settings(
        server=ServerSettings(
            host="127.0.0.1",
            port=port,
            backend="memory://",
            retry_ms=retry_ms,
            keepalive=keepalive,
            log_level="warning",
            shutdown_grace=0.2,
            **server,  # type: ignore[arg-type]
        ),
        tasks=tasks or {},
        tokens=tokens,
    )
    backend = MemoryEventLog()
    if tasks:
        from runstream.server.runs import RunsAPI

        runs = RunsAPI.from_settings(settings, shutdown_grace=1.0)
        app = create_app(
            settings, backend=backend, routers=[runs.router], on_startup=[runs.startup]
        )
    else:
        app = create_app(settings, backend=backend)
    srv = make_server(app, settings, access_log=False, server_class=_TestServer)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    while not srv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return LiveServer(f"http://127.0.0.1:{port}", port, backend, settings), task, (srv, sock)


async def stop_server(task: asyncio.Task[None], handle: tuple[Server, socket.socket]) -> None:
    srv, sock = handle
    srv.should_exit = True
    await asyncio.wait_for(task, 10)
    sock.close()


@pytest.fixture
async def live_server() -> AsyncIterator[LiveServer]:
    server, task, handle = await start_server()
    try:
        yield server
    finally:
        await stop_server(task, handle)


@pytest.fixture
async def proxy(live_server: LiveServer) -> AsyncIterator[FaultProxy]:
    fp = FaultProxy("127.0.0.1", live_server.port)
    await fp.start()
    try:
        yield fp
    finally:
        await fp.aclose()
