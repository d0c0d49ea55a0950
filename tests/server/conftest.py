"""Fixtures: ``start_server`` (real uvicorn on loopback), ``live``, ``client``, ``backend_url``.

Other test packages can reuse them with
``from tests.server.conftest import start_server, live, client  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runstream.config import Settings
from runstream.server.app import create_app
from runstream.server.serve import make_server
from tests.server.live import LiveServer, StartServer, TestServer, make_settings


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[LiveServer] = []

    async def start(
        settings: Settings | None = None, *, backend_url: str = "memory://", **kwargs: Any
    ) -> LiveServer:
        settings = settings or make_settings()
        settings = settings.replace(backend=backend_url)
        app = create_app(settings, **kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = make_server(app, settings, server_class=TestServer, log_level="warning")
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        deadline = time.monotonic() + 20
        while not server.started:  # uvicorn exposes readiness only as a flag
            if task.done():
                task.result()
                raise RuntimeError("server exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 20 s")
            await asyncio.sleep(0.01)
        live = LiveServer(app, server, task, port)
        servers.append(live)
        return live

    yield start
    for live in servers:
        if not live.task.done():
            await live.stop()


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend the server is tested on (redis uses the session's private redis-server)."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runstream.db'}"
    redis_server = request.getfixturevalue("redis_server")
    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def live(start_server: StartServer) -> LiveServer:
    """A server on memory:// with default settings."""
    return await start_server()


@pytest.fixture
async def client(live: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
        yield c
