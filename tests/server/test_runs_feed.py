"""``GET /v1/runs/events`` and ``/v1/runs/ws``: every run's lifecycle, resumable, read-only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.server.conftest import start_server  # noqa: F401 - fixture
from tests.server.live import LiveServer, StartServer, open_sse
from tests.server.test_runs import serve


@pytest.fixture(params=["memory", "sqlite"])
async def feed_api(
    request: pytest.FixtureRequest,
    start_server: StartServer,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> AsyncIterator[tuple[LiveServer, httpx.AsyncClient]]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'feed.db'}"
    live, _ = await serve(start_server, url, keepalive=0.2)
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        yield live, client


async def test_the_feed_exists_before_the_first_run(
    feed_api: tuple[LiveServer, httpx.AsyncClient],
) -> None:
    _, http = feed_api
    r = await http.get("/v1/runs/events")
    assert r.status_code == 200
    assert r.json() == {
        "stream": "runstream:runs",
        "epoch": None,
        "events": [],
        "next_after": 0,
        "closed": False,
    }


async def test_sse_subscribed_first_sees_every_run_created_moved_and_ended_then_resumes(
    feed_api: tuple[LiveServer, httpx.AsyncClient],
) -> None:
    _, http = feed_api
    async with open_sse(http, "/v1/runs/events") as sse:
        ids = [
            (await http.post("/v1/runs", json={"task": "hello", "params": {"name": n}})).json()[
                "id"
            ]
            for n in ("a", "b")
        ]
        got = []
        while sum(1 for m in got if m.event == "ended") < 2:
            got.extend(await sse.take(1))
    items = [(m.event, json.loads(m.data)) for m in got]
    for run_id in ids:
        mine = [(kind, data["status"]) for kind, data in items if data["id"] == run_id]
        assert mine == [("created", "queued"), ("status", "running"), ("ended", "succeeded")]
    # Resume from the middle with the browser's Last-Event-ID: exactly the rest.
    middle = got[2].id
    async with open_sse(http, "/v1/runs/events", headers={"Last-Event-ID": middle}) as sse:
        rest = await sse.take(len(got) - 3)
    assert [m.id for m in rest] == [m.id for m in got[3:]]


async def test_websocket_follows_the_feed(feed_api: tuple[LiveServer, httpx.AsyncClient]) -> None:
    live, http = feed_api
    async with connect(f"{live.ws_url}/v1/runs/ws", ping_interval=None) as ws:
        run_id = (await http.post("/v1/runs", json={"task": "hello"})).json()["id"]
        kinds = []
        while "ended" not in kinds:
            message = json.loads(await ws.recv())
            if "id" in message:
                assert message["data"]["id"] == run_id and message["epoch"]
                kinds.append(message["type"])
    assert kinds == ["created", "status", "ended"]


async def test_nobody_can_write_the_feed_through_the_streams_api(
    feed_api: tuple[LiveServer, httpx.AsyncClient],
) -> None:
    _, http = feed_api
    await http.post("/v1/runs", json={"task": "hello"})
    for method, path, body in (
        ("POST", "/v1/streams/runstream:runs/events", {"type": "ended", "data": {}}),
        ("POST", "/v1/streams/runstream:runs/close", None),
        ("DELETE", "/v1/streams/runstream:runs", None),
        ("POST", "/v1/streams/runstream:other/events", {"type": "x"}),
    ):
        r = await http.request(method, path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert "reserved" in r.json()["error"]["message"]
    # Reading it as a stream is fine.
    assert (await http.get("/v1/streams/runstream:runs")).status_code == 200
