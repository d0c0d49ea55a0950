"""Durable Streams tests: a real ``runstream serve`` per engine, and the npm packages.

The npm packages (the official conformance suite and TypeScript client) come from
the registry through ``package-lock.json`` here; ``npm ci`` runs when
``node_modules`` is missing. Without Node.js/npm these tests skip, unless
``RUNSTREAM_REQUIRE_BROWSER=1`` (or ``CI``) makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.chaos.harness import PY, ServeProcess, _spawn

NPM_DIR = Path(__file__).parent
ENGINES = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]
CORS_ORIGIN = "https://example.com"
"""The origin the suite's CORS preflight test sends (CORS is off unless origins are listed)."""


def node_required() -> bool:
    return bool(os.environ.get("RUNSTREAM_REQUIRE_BROWSER") or os.environ.get("CI"))


def npx() -> str:
    """``npx`` with this directory's packages installed (``npm ci`` if needed)."""
    path = shutil.which("npx")
    if path is None or shutil.which("node") is None or shutil.which("npm") is None:
        if node_required():
            pytest.fail("Node.js and npm are required here but not found")
        pytest.skip("Node.js / npm not installed")
    if not (NPM_DIR / "node_modules" / "@durable-streams" / "server-conformance-tests").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NPM_DIR, check=True, timeout=600
        )
    return path


def backend_url(engine: str, request: pytest.FixtureRequest, directory: Path) -> str:
    if engine == "memory":
        return "memory://"
    if engine == "sqlite":
        return f"sqlite:///{directory / 'ds.db'}"
    redis = request.getfixturevalue("redis_server")
    return f"{redis.url}?prefix=ds{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def ds_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ServeProcess]:
    """``runstream serve`` on ``request.param``'s engine, CORS open to :data:`CORS_ORIGIN`."""
    config = tmp_path / "runstream.toml"
    config.write_text(f'[server]\ncors_origins = ["{CORS_ORIGIN}"]\n')
    server = ServeProcess(backend_url(request.param, request, tmp_path), tmp_path, config=config)
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class WorkerServe(ServeProcess):
    """``runstream serve`` that also runs tasks (``--workers``), restartable after ``kill -9``."""

    workers: int = 1

    async def start(self) -> float:
        args = [PY, "-m", "runstream.cli.main", "serve", "--backend", self.backend]
        args += ["--port", str(self.port), "--workers", str(self.workers)]
        if self.config is not None:
            args += ["--config", str(self.config)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
        env.update(RUNSTREAM_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        self.starts += 1
        log = (self.directory / f"serve-{self.starts}.log").open("wb")
        started = time.monotonic()
        proc = await asyncio.to_thread(_spawn, args, log, env, self.directory)
        self.proc = proc
        log.close()
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            while True:  # a child process's readiness: nothing to await but its port
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/readyz")).status_code == 200:
                        return time.monotonic() - started
                assert proc.poll() is None, self.log_text()
                assert time.monotonic() < started + 45, "server did not start in 45 s"
                await asyncio.sleep(0.05)
