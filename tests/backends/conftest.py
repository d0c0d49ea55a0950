"""The ``log`` fixture: one EventLog per test, parametrised over every backend.

The Redis variant uses the session's private redis-server with a unique key
prefix per test, so tests never see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runstream.backends import EventLog, open_backend

BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'log.db'}"
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def log(backend_url: str) -> AsyncIterator[EventLog]:
    backend = open_backend(backend_url)
    async with backend:
        yield backend
