"""Fixtures: ``start_server`` (real uvicorn on loopback), ``live``, ``client``, ``backend_url``.

Other test packages can reuse them with
``from tests.server.conftest import start_server, live, client  # noqa: F401``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runstream.config import Settings
from runstream.server.app import create_app
from tests.server.live import LiveServer, StartServer, make_settings, serve_in_task


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[LiveServer] = []

    async def start(
        settings: Settings | None = None, *, backend_url: str = "memory://", **kwargs: Any
    ) -> LiveServer:
        settings = settings or make_settings()
        settings = settings.replace(backend=backend_url)
        app = create_app(settings, **kwargs)
        live = await serve_in_task(app, settings)
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
