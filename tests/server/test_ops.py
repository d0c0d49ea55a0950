"""Deletion, retention, status and the free-disk floor over real HTTP on loopback.

Every test runs the full app (``build_app``: streams, runs, operations) in a
uvicorn server on 127.0.0.1, on memory, SQLite and Redis where it applies.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from runstream.app import build_app
from runstream.config import RetentionSettings, StorageSettings
from runstream.server.ops import OpsAPI
from tests.server.live import LiveServer, SSEReader, make_settings, open_sse, serve_in_task

PY = sys.executable
TASKS: dict[str, Any] = {
    "hello": {"command": [PY, "-c", "print('hello')"], "timeout": 60},
    "sleepy": {
        "command": [PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        "grace": 0.5,
    },
}
ENGINES = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@dataclass
class Ops:
    live: LiveServer
    client: httpx.AsyncClient
    engine: str

    @property
    def api(self) -> OpsAPI:
        ops: OpsAPI = self.live.app.state.ops
        return ops

    async def run(self, task: str = "hello") -> dict[str, Any]:
        r = await self.client.post("/v1/runs", json={"task": task})
        assert r.status_code == 201, r.text
        run: dict[str, Any] = r.json()
        return run

    async def finished(self, task: str = "hello") -> dict[str, Any]:
        """A run of ``task`` that has ended (its SSE stream delivered ``end``)."""
        run = await self.run(task)
        async with open_sse(self.client, f"/v1/runs/{run['id']}/events") as sse:
            await until_end(sse)
        got: dict[str, Any] = (await self.client.get(f"/v1/runs/{run['id']}")).json()
        return got

    async def started(self, task: str = "sleepy") -> dict[str, Any]:
        """A run of ``task`` that is running (its first output arrived)."""
        run = await self.run(task)
        async with open_sse(self.client, f"/v1/runs/{run['id']}/events") as sse:
            while (msg := await asyncio.wait_for(sse.next(), 30)) is not None:
                if msg.event == "stdout":
                    break
        return run


async def until_end(reader: SSEReader) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    while (msg := await asyncio.wait_for(reader.next(), 30)) is not None:
        out.append((msg.event, json.loads(msg.data) if msg.data else None))
    return out


async def drain(ws: Any) -> None:
    """Receive until the server closes the WebSocket (raises ConnectionClosed)."""
    while True:
        await ws.recv()


def backend_for(request: pytest.FixtureRequest, engine: str, tmp_path: Path) -> str:
    if engine == "memory":
        return "memory://"
    if engine == "sqlite":
        return f"sqlite:///{tmp_path / 'ops.db'}"
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=o{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def serving(
    backend: str,
    engine: str,
    *,
    retention: RetentionSettings | None = None,
    storage: StorageSettings | None = None,
    disk_probe: Callable[[str], int] | None = None,
    retention_interval: float | None = None,
) -> AsyncIterator[Ops]:
    settings = make_settings(backend=backend, reconcile_interval=0.2, keepalive=1.0)
    settings = settings.evolve(
        tasks=TASKS,
        retention=retention or RetentionSettings(),
        storage=storage or StorageSettings(min_free_disk=0),
    )
    ops_options: dict[str, Any] = {}
    if disk_probe is not None:
        ops_options["disk_probe"] = disk_probe
    if retention_interval is not None:
        ops_options["retention_interval"] = retention_interval
    app = build_app(settings, workers=2, shutdown_grace=2, ops_options=ops_options)
    live = await serve_in_task(app, settings)
    try:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            yield Ops(live, client, engine)
    finally:
        await live.stop()


@pytest.fixture(params=ENGINES)
async def ops(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ops]:
    async with serving(backend_for(request, request.param, tmp_path), request.param) as served:
        yield served


# -- DELETE /v1/runs/{id} ----------------------------------------------------------


async def test_deleting_an_ended_run_removes_it_and_its_events(ops: Ops) -> None:
    run = await ops.finished()
    r = await ops.client.delete(f"/v1/runs/{run['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["deleted"]["id"] == run["id"]
    assert (await ops.client.get(f"/v1/runs/{run['id']}")).status_code == 404
    events = await ops.client.get(f"/v1/runs/{run['id']}/events")
    assert events.status_code == 404
    assert events.json()["error"]["code"] == "run_not_found"
    assert (await ops.client.get(f"/v1/streams/{run['id']}")).status_code == 404
    again = await ops.client.delete(f"/v1/runs/{run['id']}")
    assert again.status_code == 404


async def test_a_running_run_is_refused_then_force_cancels_waits_and_deletes(ops: Ops) -> None:
    run = await ops.started()
    r = await ops.client.delete(f"/v1/runs/{run['id']}")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "illegal_transition"
    assert (await ops.client.get(f"/v1/runs/{run['id']}")).json()["status"] == "running"

    async with open_sse(ops.client, f"/v1/runs/{run['id']}/events") as sse:
        first = await asyncio.wait_for(sse.next(), 30)
        assert first is not None and first.event == "status"  # the follower is attached
        forced = await ops.client.delete(f"/v1/runs/{run['id']}", params={"force": "1"})
        assert forced.status_code == 200, forced.text
        assert forced.json()["deleted"]["status"] == "cancelled"
        # The follower ends, it does not hang: with the end event if its feed read it
        # before the stream was deleted, else as a deleted stream.
        messages = await until_end(sse)
    ends = [data for event, data in messages if event == "end"]
    assert all(data["status"] == "cancelled" for data in ends)
    assert (await ops.client.get(f"/v1/runs/{run['id']}")).status_code == 404


# -- bulk delete and gc ------------------------------------------------------------


async def test_bulk_delete_needs_a_filter_and_deletes_only_ended_matching_runs(ops: Ops) -> None:
    refused = await ops.client.delete("/v1/runs")
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "all"
    hello = [await ops.finished() for _ in range(2)]
    running = await ops.started()

    r = await ops.client.delete("/v1/runs", params={"task": "hello"})
    assert r.status_code == 200
    assert sorted(r.json()["deleted"]) == sorted(h["id"] for h in hello)
    r = await ops.client.delete("/v1/runs", params={"all": "1"})
    assert r.json() == {"deleted": [], "skipped": 1}
    assert (await ops.client.get(f"/v1/runs/{running['id']}")).json()["status"] == "running"
    bad = await ops.client.delete("/v1/runs", params={"before": "yesterday"})
    assert (bad.status_code, bad.json()["error"]["field"]) == (400, "before")
    await ops.client.post(f"/v1/runs/{running['id']}/cancel")


async def test_bulk_delete_before_a_time(ops: Ops) -> None:
    old = await ops.finished()
    cutoff = (await ops.client.get(f"/v1/runs/{old['id']}")).json()["finished_at"]
    new = await ops.finished()
    r = await ops.client.delete("/v1/runs", params={"before": cutoff})
    assert r.json()["deleted"] == [old["id"]]
    assert (await ops.client.get(f"/v1/runs/{new['id']}")).status_code == 200


@pytest.mark.parametrize("engine", ENGINES)
async def test_gc_applies_max_runs_and_reports_what_it_removed(
    request: pytest.FixtureRequest, tmp_path: Path, engine: str
) -> None:
    backend = backend_for(request, engine, tmp_path)
    async with serving(backend, engine, retention=RetentionSettings(max_runs=1)) as ops:
        runs = [await ops.finished() for _ in range(3)]
        r = await ops.client.post("/v1/gc")
        assert r.status_code == 200
        assert r.json()["runs_deleted"] == 2
        assert r.json()["paused"] == 0, "an asked-for pass runs at full speed"
        listed = (await ops.client.get("/v1/runs")).json()["runs"]
        assert [x["id"] for x in listed] == [runs[-1]["id"]]
        again = (await ops.client.post("/v1/gc")).json()
        assert again["runs_deleted"] == 0
        assert r.json()["full_scan"] is again["full_scan"] is True, "an asked-for pass lists all"


@pytest.mark.parametrize("engine", ENGINES)
async def test_readers_of_an_expired_stream_end_on_every_transport(
    request: pytest.FixtureRequest, tmp_path: Path, engine: str
) -> None:
    backend = backend_for(request, engine, tmp_path)
    retention = RetentionSettings(stream_max_idle=0.001)
    async with serving(backend, engine, retention=retention) as ops:
        r = await ops.client.post("/v1/streams/expiring/events", json={"type": "x", "data": 1})
        assert r.status_code == 201
        ws_url = f"ws://127.0.0.1:{ops.live.port}/v1/streams/expiring/ws"
        async with (
            open_sse(ops.client, "/v1/streams/expiring/events") as sse,
            connect(ws_url, origin=None) as ws,
        ):
            first = await asyncio.wait_for(sse.next(), 30)
            assert first is not None and first.event == "x"
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "x"

            gc = await ops.client.post("/v1/gc")
            assert gc.json()["streams_deleted"] == 1

            await asyncio.wait_for(sse.rest(), 30)  # the SSE response ends
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(drain(ws), 30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
        page = await ops.client.get("/v1/streams/expiring/events", params={"after": 0})
        assert page.status_code == 404


async def test_the_server_applies_retention_on_its_own(tmp_path: Path) -> None:
    backend = f"sqlite:///{tmp_path / 'auto.db'}"
    retention = RetentionSettings(max_runs=0)
    async with serving(backend, "sqlite", retention=retention, retention_interval=0.1) as ops:
        run = await ops.run()  # it may be gone before a GET after its end: read nothing more
        deadline = asyncio.get_running_loop().time() + 20
        # Passes run every 0.1 s in the server; poll the API for their effect.
        while (await ops.client.get(f"/v1/runs/{run['id']}")).status_code != 404:
            assert asyncio.get_running_loop().time() < deadline, "retention never ran"
            await asyncio.sleep(0.05)
        status = (await ops.client.get("/v1/status")).json()
        assert status["retention"]["passes"] >= 1
        assert status["retention"]["max_runs"] == 0
        assert status["retention"]["duty_cycle"] == 0.01
        assert "paused" in status["retention"]["last_pass"]
        metrics = (await ops.client.get("/metrics")).text
        assert 'runstream_retention_deleted_total{kind="runs"} 1.0' in metrics
        assert "runstream_retention_pass_busy_seconds_count" in metrics
        assert 'runstream_retention_pass_seconds_bucket{le="900.0"}' in metrics


# -- status and metrics ------------------------------------------------------------


async def test_status_and_metrics_report_the_store(ops: Ops) -> None:
    await ops.finished()
    r = await ops.client.get("/v1/status")
    assert r.status_code == 200
    status = r.json()
    assert status["engine"] == ops.engine
    assert status["runs"]["runs"] == 1
    if ops.engine == "sqlite":
        assert status["store"]["file_bytes"] > 0 and status["store"]["events"] >= 4
    if ops.engine == "redis":
        assert status["store"]["used_memory"] > 0
    metrics = (await ops.client.get("/metrics")).text
    assert 'runstream_store_rows{kind="runs"} 1.0' in metrics
    if ops.engine != "memory":
        assert "runstream_store_bytes " in metrics


# -- the free-disk floor -----------------------------------------------------------


class Disk:
    """An injected free-disk reading the test opens and closes."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path: str) -> int:
        return self.free


async def test_below_min_free_disk_appends_and_runs_get_507_until_space_returns(
    tmp_path: Path,
) -> None:
    disk = Disk(10 * 2**30)
    storage = StorageSettings(min_free_disk=2**30)
    backend = f"sqlite:///{tmp_path / 'disk.db'}"
    async with serving(backend, "sqlite", storage=storage, disk_probe=disk) as ops:
        ok = await ops.client.post("/v1/streams/s/events", json={"type": "x", "data": 1})
        assert ok.status_code == 201

        disk.free = 100 * 2**20
        assert ops.api.guard is not None
        ops.api.guard.invalidate()
        full = await ops.client.post("/v1/streams/s/events", json={"type": "x", "data": 2})
        assert full.status_code == 507
        assert full.json()["error"]["code"] == "insufficient_storage"
        assert "min_free_disk" in full.json()["error"]["message"]
        run = await ops.client.post("/v1/runs", json={"task": "hello"})
        assert run.status_code == 507
        assert (await ops.client.get("/v1/runs")).json()["runs"] == []
        info = (await ops.client.get("/v1/streams/s")).json()
        assert info["last_id"] == 1, "nothing was written"
        metrics = (await ops.client.get("/metrics")).text
        assert "runstream_storage_refusals 2.0" in metrics

        disk.free = 10 * 2**30
        ops.api.guard.invalidate()
        again = await ops.client.post("/v1/streams/s/events", json={"type": "x", "data": 3})
        assert (again.status_code, again.json()["last_id"]) == (201, 2)
        assert (await ops.finished())["status"] == "succeeded"
