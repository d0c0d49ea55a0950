"""The ``run_store`` fixtures: one RunStore per test, parametrised over every engine.

The Redis variant uses the session's private redis-server with a unique key
prefix per test, so tests never see each other's runs. ``run_stores`` opens
more handles on the same data (a second server, a CLI next to it) and reopens
it after a close.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runstream.backends import open_run_store
from runstream.runs.store import RunStore

RUN_STORE_ENGINES = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@dataclass
class RunStores:
    """Handles on one engine's run data, all closed when the test ends."""

    engine: str
    url: str
    opened: list[RunStore] = field(default_factory=list)

    @property
    def durable(self) -> bool:
        """Whether runs outlive every handle being closed (not so for ``memory://``)."""
        return self.engine != "memory"

    async def open(self, *, start: bool = True) -> RunStore:
        """A handle on the same runs; ``memory://`` has one store per process."""
        if self.engine == "memory" and self.opened:
            return self.opened[0]
        store = open_run_store(self.url)
        self.opened.append(store)
        if start:
            await store.start()
        return store

    async def close_all(self) -> None:
        while self.opened:
            await self.opened.pop().aclose()


@pytest.fixture(params=RUN_STORE_ENGINES)
async def run_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunStores]:
    engine = request.param
    if engine == "memory":
        url = "memory://"
    elif engine == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
    else:
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}"
    stores = RunStores(engine, url)
    try:
        yield stores
    finally:
        await stores.close_all()


@pytest.fixture
async def run_store(run_stores: RunStores) -> RunStore:
    return await run_stores.open()
