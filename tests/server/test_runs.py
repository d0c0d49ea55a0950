"""The runs API over real HTTP on loopback: tasks, create, list, get, cancel, SSE/JSON/WS."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from runstream.config import Token
from runstream.runs.service import RunService
from runstream.runs.tasks import TaskRegistry
from runstream.server.runs import RunsAPI
from tests.conftest import RedisServer
from tests.server.conftest import start_server  # noqa: F401 - fixture
from tests.server.live import LiveServer, SSEReader, StartServer, make_settings, open_sse

PY = sys.executable


def registry() -> TaskRegistry:
    reg = TaskRegistry()
    reg.command(
        "hello",
        [PY, "-c", "import sys; print('hello', sys.argv[1])", "{name}"],
        params={"name": {"type": "string", "default": "world", "max_length": 100}},
        timeout=600,
        concurrency=4,
        description="greets",
    )
    reg.command(
        "sleepy",
        [PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        grace=0.5,
    )
    return reg


@dataclass
class Api:
    live: LiveServer
    runs: RunsAPI
    client: httpx.AsyncClient

    @property
    def service(self) -> RunService:
        assert self.runs.service is not None
        return self.runs.service


async def serve(
    start: StartServer, backend_url: str, *, workers: int = 2, **settings: object
) -> tuple[LiveServer, RunsAPI]:
    runs = RunsAPI(registry(), workers=workers, shutdown_grace=2)
    live = await start(
        make_settings(reconcile_interval=0.2, **settings),
        backend_url=backend_url,
        routers=[runs.router],
        on_startup=[runs.startup],
    )
    return live, runs


@pytest.fixture(params=["memory", "sqlite"])
async def api(
    request: pytest.FixtureRequest,
    start_server: StartServer,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> AsyncIterator[Api]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'api.db'}"
    live, runs = await serve(start_server, url)
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        yield Api(live, runs, client)


async def sse_until_end(reader: SSEReader) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    while (msg := await asyncio.wait_for(reader.next(), 30)) is not None:
        out.append((msg.event, json.loads(msg.data)))
    return out


async def test_tasks_lists_declarations(api: Api) -> None:
    r = await api.client.get("/v1/tasks")
    assert r.status_code == 200
    tasks = {t["name"]: t for t in r.json()["tasks"]}
    assert set(tasks) == {"hello", "sleepy"}
    assert tasks["hello"]["params"] == {
        "name": {"type": "string", "required": False, "default": "world", "max_length": 100}
    }
    assert (tasks["hello"]["timeout"], tasks["hello"]["concurrency"]) == (600, 4)


async def test_run_is_created_followed_over_sse_and_succeeds(api: Api) -> None:
    r = await api.client.post("/v1/runs", json={"task": "hello", "params": {"name": "$(id)"}})
    assert r.status_code == 201, r.text
    run = r.json()
    assert (run["status"], run["task"], run["params"], run["stream"]) == (
        "queued", "hello", {"name": "$(id)"}, run["id"],
    )  # fmt: skip
    async with open_sse(api.client, f"/v1/runs/{run['id']}/events") as sse:
        assert sse.response.status_code == 200
        messages = await sse_until_end(sse)
    kinds = [(event, data) for event, data in messages if event != "status"]
    assert kinds == [
        ("stdout", {"line": "hello $(id)"}),
        ("end", {"status": "succeeded", "reason": None}),
    ]
    assert [d["status"] for e, d in messages if e == "status"] == [  # type: ignore[index]
        "queued", "running", "succeeded",
    ]  # fmt: skip
    got = (await api.client.get(f"/v1/runs/{run['id']}")).json()
    assert (got["status"], got["exit_code"], got["attempt"]) == ("succeeded", 0, 1)
    assert got["finished_at"].endswith("Z")


async def test_json_long_poll_of_a_run(api: Api) -> None:
    run = (await api.client.post("/v1/runs", json={"task": "hello"})).json()
    after, events = 0, []
    while True:
        r = await api.client.get(f"/v1/runs/{run['id']}/events", params={"after": after, "wait": 5})
        assert r.status_code == 200
        page = r.json()
        events.extend(page["events"])
        after = page["next_after"]
        if page["closed"]:
            break
    assert [e["data"]["line"] for e in events if e["type"] == "stdout"] == ["hello world"]
    assert events[-1]["type"] == "end"


async def test_websocket_of_a_run_ends_with_the_final_status(api: Api) -> None:
    run = (await api.client.post("/v1/runs", json={"task": "hello"})).json()
    got = []
    async with connect(f"{api.live.ws_url}/v1/runs/{run['id']}/ws?after=0") as ws:
        async for message in ws:  # ends when the server closes the socket normally
            got.append(json.loads(message))
        assert ws.close_code == 1000
    assert got[-1]["type"] == "end"
    assert got[-1]["data"]["status"] == "succeeded"


async def test_cancel_over_http_stops_the_run(api: Api) -> None:
    run = (await api.client.post("/v1/runs", json={"task": "sleepy"})).json()
    async with open_sse(api.client, f"/v1/runs/{run['id']}/events") as sse:
        while (msg := await asyncio.wait_for(sse.next(), 30)) is not None:
            if msg.event == "stdout":
                break
        started = time.monotonic()
        r = await api.client.post(f"/v1/runs/{run['id']}/cancel")
        assert r.status_code == 202
        assert r.json()["cancel_requested"] is True
        rest = await sse_until_end(sse)
    assert time.monotonic() - started < 15
    assert rest[-1] == ("end", {"status": "cancelled", "reason": "cancelled by request"})
    assert (await api.client.get(f"/v1/runs/{run['id']}")).json()["status"] == "cancelled"


BAD_CREATES: list[tuple[object, int, str, str | None]] = [
    ({"task": "nope"}, 404, "task_not_found", None),
    ({"task": "hello", "params": {"name": "x" * 101}}, 422, "invalid_params", "name"),
    ({"task": "hello", "params": {"nick": "x"}}, 422, "invalid_params", "nick"),
    ({"task": "hello", "params": {"name": 5}}, 422, "invalid_params", "name"),
    ({"task": "hello", "timeout": 601}, 422, "invalid_params", "timeout"),
    ({"task": "hello", "params": [1]}, 422, "invalid_params", "params"),
    ({"params": {}}, 400, "invalid", "task"),
    ({"task": "hello", "colour": 1}, 400, "invalid", "colour"),
    ([1, 2], 400, "invalid", "body"),
]


async def test_bad_create_requests_are_refused(api: Api) -> None:
    for body, status, code, field in BAD_CREATES:
        r = await api.client.post("/v1/runs", json=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert (error["code"], error.get("field")) == (code, field), body
    json_type = {"Content-Type": "application/json"}
    r = await api.client.post("/v1/runs", content=b"{not json", headers=json_type)
    assert r.status_code == 400
    assert (await api.client.get("/v1/runs")).json()["runs"] == []


async def test_unknown_run_is_404_everywhere(api: Api) -> None:
    for method, path in [
        ("GET", "/v1/runs/run-nope"),
        ("POST", "/v1/runs/run-nope/cancel"),
        ("GET", "/v1/runs/run-nope/events"),
    ]:
        r = await api.client.request(method, path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "run_not_found"


async def test_list_filters_and_pages(api: Api) -> None:
    ids = [(await api.client.post("/v1/runs", json={"task": "hello"})).json()["id"]
           for _ in range(3)]  # fmt: skip
    for run_id in ids:
        await api.live.runtime.backend.info(run_id)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 2, "task": "hello"}
        if cursor:
            params["cursor"] = cursor
        body = (await api.client.get("/v1/runs", params=params)).json()
        seen.extend(r["id"] for r in body["runs"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    r = await api.client.get("/v1/runs", params={"status": "bogus"})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "status"
    r = await api.client.get("/v1/runs", params={"task": "sleepy"})
    assert r.json() == {"runs": [], "next_cursor": None}


async def test_sse_ends_from_state_when_the_close_was_never_written(api: Api) -> None:
    # A run whose executor died after recording the outcome but before closing the stream.
    service = api.service
    orphan = await service.create("sleepy")
    service_pool = api.runs.pool
    assert service_pool is not None
    await wait_status(service, orphan.id, "running")
    await service.store.transition(orphan.id, "failed", error="gone", finished_at=time.time() - 60)
    service.end_check_guard = 3600  # the reconciler leaves it alone while we connect
    async with open_sse(api.client, f"/v1/runs/{orphan.id}/events", after="now") as sse:
        assert sse.response.status_code == 200
        service.end_check_guard = 1  # now the reconciler (every 0.2 s) repairs it
        rest = await sse_until_end(sse)
    assert rest[-1] == ("end", {"status": "failed", "reason": "gone"})
    info = await api.live.runtime.backend.info(orphan.id)
    assert (info.closed, info.close_status) == (True, "failed")


async def test_connecting_to_a_finished_run_with_an_open_stream_closes_it(api: Api) -> None:
    service = api.service
    run = await service.create("sleepy")
    await wait_status(service, run.id, "running")
    await service.store.transition(run.id, "timed_out", finished_at=time.time() - 60)
    service.end_check_guard = 1
    async with open_sse(api.client, f"/v1/runs/{run.id}/events") as sse:
        messages = await sse_until_end(sse)
    assert messages[-1] == ("end", {"status": "timed_out", "reason": None})


async def wait_status(service: RunService, run_id: str, status: str) -> None:
    deadline = time.monotonic() + 20
    while (await service.get(run_id)).status != status:
        assert time.monotonic() < deadline, f"run {run_id} never became {status}"
        await asyncio.sleep(0.02)  # polling the run store; it has no change notification


async def test_scopes_are_enforced(start_server: StartServer) -> None:  # noqa: F811
    tokens = [
        Token("reader-token-1", frozenset({"read"})),
        Token("writer-token-1", frozenset({"read", "write"})),
    ]
    live, _ = await serve(start_server, "memory://", tokens=tokens)
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        assert (await client.get("/v1/tasks")).status_code == 401
        read = {"Authorization": "Bearer reader-token-1"}
        write = {"Authorization": "Bearer writer-token-1"}
        assert (await client.get("/v1/tasks", headers=read)).status_code == 200
        r = await client.post("/v1/runs", json={"task": "hello"}, headers=read)
        assert r.status_code == 403
        r = await client.post("/v1/runs", json={"task": "hello"}, headers=write)
        assert r.status_code == 201
        run_id = r.json()["id"]
        assert (await client.post(f"/v1/runs/{run_id}/cancel", headers=read)).status_code == 403
        r = await client.get(f"/v1/runs/{run_id}/events", params={"token": "reader-token-1"})
        assert r.status_code == 200


async def test_api_only_server_leaves_runs_queued(start_server: StartServer) -> None:  # noqa: F811
    live, runs = await serve(start_server, "memory://", workers=0)
    assert runs.pool is None
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        run = (await client.post("/v1/runs", json={"task": "hello"})).json()
        r = await client.post(f"/v1/runs/{run['id']}/cancel")
        assert (r.status_code, r.json()["status"]) == (202, "cancelled")
        page = (await client.get(f"/v1/runs/{run['id']}/events")).json()
        assert [e["type"] for e in page["events"]] == ["status", "status", "end"]


async def test_metrics_count_runs_by_status_and_duration(api: Api) -> None:
    ok = (await api.client.post("/v1/runs", json={"task": "hello"})).json()
    async with open_sse(api.client, f"/v1/runs/{ok['id']}/events") as sse:
        await sse_until_end(sse)
    assert api.runs.pool is not None
    await asyncio.wait_for(api.runs.pool.wait_idle(), 20)  # counted after the stream closes
    await api.client.post("/v1/runs/run-nope/cancel")
    text = (await api.client.get("/metrics")).text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("runstream_run")
    }
    assert samples['runstream_runs_created_total{task="hello"}'] == 1
    assert samples['runstream_runs_finished_total{status="succeeded"}'] == 1
    assert samples['runstream_runs_finished_total{status="failed"}'] == 0
    assert samples['runstream_run_duration_seconds_count{status="succeeded"}'] == 1
    assert samples["runstream_runs_running"] == 0
    assert samples["runstream_runs_queue_depth"] == 0
    assert samples["runstream_runs_lost_total"] == 0


@pytest.mark.redis
async def test_redis_server_with_workers_runs_and_cancels(
    start_server: StartServer,  # noqa: F811 - the fixture imported above
    redis_server: RedisServer,
) -> None:
    url = f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:12]}"
    live, runs = await serve(start_server, url, workers=1)
    assert runs.pool is None and runs.queue is not None and runs.queue.worker is not None
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        ok = (await client.post("/v1/runs", json={"task": "hello"})).json()
        async with open_sse(client, f"/v1/runs/{ok['id']}/events") as sse:
            messages = await sse_until_end(sse)
        assert ("stdout", {"line": "hello world"}) in messages
        assert messages[-1] == ("end", {"status": "succeeded", "reason": None})
        slow = (await client.post("/v1/runs", json={"task": "sleepy"})).json()
        async with open_sse(client, f"/v1/runs/{slow['id']}/events") as sse:
            while (msg := await asyncio.wait_for(sse.next(), 30)) is not None:
                if msg.event == "stdout":
                    break
            assert (await client.post(f"/v1/runs/{slow['id']}/cancel")).status_code == 202
            rest = await sse_until_end(sse)
        assert rest[-1][0] == "end"
        assert (await client.get(f"/v1/runs/{slow['id']}")).json()["status"] == "cancelled"


@pytest.mark.redis
async def test_redis_server_without_workers_only_queues(
    start_server: StartServer,  # noqa: F811 - the fixture imported above
    redis_server: RedisServer,
) -> None:
    url = f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:12]}"
    runs = RunsAPI(registry(), shutdown_grace=2)  # workers not given: API only on Redis
    live = await start_server(
        make_settings(), backend_url=url, routers=[runs.router], on_startup=[runs.startup]
    )
    assert runs.pool is None and runs.queue is not None and runs.queue.worker is None
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        run = (await client.post("/v1/runs", json={"task": "hello"})).json()
        assert (await client.get(f"/v1/runs/{run['id']}")).json()["status"] == "queued"
