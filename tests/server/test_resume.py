"""Exact resume over SSE, WebSocket and long-poll, on every backend, over real HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.server.live import LiveServer, SSEReader, StartServer, open_sse, publish


@pytest.fixture
async def server(start_server: StartServer, backend_url: str) -> LiveServer:
    return await start_server(backend_url=backend_url)


@pytest.fixture
async def http(server: LiveServer) -> Any:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        yield c


def ints(messages: list[Any]) -> list[int]:
    return [json.loads(m.data)["i"] for m in messages if m.event == "tick"]


async def test_sse_resume_after_disconnect_is_exact(http: httpx.AsyncClient) -> None:
    await publish(http, "r", 10)
    async with open_sse(http, "/v1/streams/r/events") as sse:
        first = await sse.take(4)
        last_id = first[-1].id
    # Disconnected; more is written while the client is away.
    await publish(http, "r", 10, start=10)
    async with open_sse(http, "/v1/streams/r/events", {"Last-Event-ID": last_id}) as sse:
        more = await sse.take(10)
        await http.post("/v1/streams/r/close", json={"status": "ok"})
        rest = await sse.rest()
    assert ints(first + more + rest) == list(range(20))
    assert rest[-1].event == "end" and sse.eof


async def test_browser_style_reconnect_uses_last_event_id_over_the_url(
    http: httpx.AsyncClient,
) -> None:
    """An EventSource reconnects to its original URL (here ``after=now``) plus the header."""
    await publish(http, "b", 3)
    url = "/v1/streams/b/events?after=now"
    async with open_sse(http, url) as sse:
        await publish(http, "b", 5, start=3)
        first = await sse.take(2)
    await publish(http, "b", 2, start=8)
    async with http.stream(
        "GET", url, headers={"Accept": "text/event-stream", "Last-Event-ID": first[-1].id}
    ) as response:
        sse2 = SSEReader(response)
        more = await sse2.take(5)
    assert ints(first + more) == list(range(3, 10))


async def test_ws_resume_after_disconnect_is_exact(
    http: httpx.AsyncClient, server: LiveServer
) -> None:
    await publish(http, "w", 6)
    got: list[dict[str, Any]] = []
    async with connect(f"{server.ws_url}/v1/streams/w/ws?after=0") as ws:
        for _ in range(3):
            got.append(json.loads(await ws.recv()))
    await publish(http, "w", 4, start=6)
    async with connect(f"{server.ws_url}/v1/streams/w/ws?after={got[-1]['id']}") as ws:
        for _ in range(7):
            got.append(json.loads(await ws.recv()))
        await http.post("/v1/streams/w/close", json={"status": "done"})
        end = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert [m["data"]["i"] for m in got] == list(range(10))
    assert [m["id"] for m in got] == list(range(1, 11))
    # The SPEC's fields, plus the epoch (WebSocket has no SSE id to carry it).
    epoch = (await http.get("/v1/streams/w")).json()["epoch"]
    assert set(got[0]) == {"id", "type", "data", "time", "epoch"}
    assert {m["epoch"] for m in got} == {epoch}
    assert end["type"] == "end" and end["id"] == 11 and end["data"]["status"] == "done"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


async def test_long_poll_resume_is_exact_and_waits_for_news(http: httpx.AsyncClient) -> None:
    await publish(http, "lp", 5)
    got: list[int] = []
    after: Any = 0

    async def later() -> None:
        await asyncio.sleep(0.2)
        await publish(http, "lp", 3, start=5)

    writer = asyncio.ensure_future(later())
    while len(got) < 8:
        r = await http.get("/v1/streams/lp/events", params={"after": after, "limit": 2, "wait": 10})
        assert r.status_code == 200
        page = r.json()
        assert page["events"], "a long-poll with wait must not return empty before news"
        got.extend(e["data"]["i"] for e in page["events"])
        after = f"{page['epoch']}:{page['next_after']}"
    await writer
    assert got == list(range(8))


async def test_long_poll_wait_returns_empty_after_the_wait(http: httpx.AsyncClient) -> None:
    await publish(http, "idle", 1)
    r = await http.get("/v1/streams/idle/events", params={"after": 1, "wait": 0.2})
    assert r.status_code == 200 and r.json()["events"] == [] and r.json()["next_after"] == 1


async def test_delete_and_recreate_gives_reset_on_sse_resume(http: httpx.AsyncClient) -> None:
    await publish(http, "dr", 3)
    async with open_sse(http, "/v1/streams/dr/events") as sse:
        old = await sse.take(3)
    assert (await http.delete("/v1/streams/dr")).status_code == 204
    await publish(http, "dr", 2, start=100)
    new_epoch = (await http.get("/v1/streams/dr")).json()["epoch"]
    async with open_sse(http, "/v1/streams/dr/events", {"Last-Event-ID": old[-1].id}) as sse:
        got = await sse.take(3)
    assert got[0].event == "reset" and got[0].id == f"{new_epoch}:0"
    assert json.loads(got[0].data) == {
        "epoch": new_epoch,
        "after": 0,
        "reason": "epoch_changed",
        "requested": 3,
    }
    assert ints(got[1:]) == [100, 101]
    assert got[2].id == f"{new_epoch}:2"


async def test_delete_ends_open_sse_and_ws_responses(
    http: httpx.AsyncClient, server: LiveServer
) -> None:
    await publish(http, "gone", 1)
    async with (
        open_sse(http, "/v1/streams/gone/events") as sse,
        connect(f"{server.ws_url}/v1/streams/gone/ws") as ws,
    ):
        assert len(await sse.take(1)) == 1
        assert json.loads(await ws.recv())["id"] == 1
        await http.delete("/v1/streams/gone")
        assert await sse.rest() == []
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_json_read_from_another_epoch_is_410(http: httpx.AsyncClient) -> None:
    await publish(http, "e", 2)
    r = await http.get("/v1/streams/e/events", params={"after": "feedfacecafe:1"})
    assert r.status_code == 410
    err = r.json()["error"]
    assert err["code"] == "history_lost" and err["reason"] == "epoch_changed"
    assert (
        err["first_id"] == 1 and err["epoch"] == (await http.get("/v1/streams/e")).json()["epoch"]
    )
