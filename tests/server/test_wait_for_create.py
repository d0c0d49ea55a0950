"""Reading a stream before it exists (SPEC §3): SSE, WebSocket and long-poll wait for it.

The response opens at once (``retry:`` and keepalives flow, so a browser
``EventSource`` fires ``open``); events arrive from id 1 once the stream is
created, here by another backend instance on the same storage (another process,
as far as the server can tell: only the backend's wake-ups tell it). Opting out
(``wait_for_create=0`` or the setting) gets the old ``404``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from runstream.backends import open_backend
from runstream.core.model import HEARTBEAT_TYPE, NewEvent

from .conftest import StartServer
from .live import LiveServer, make_settings, open_sse, publish

SSE = {"Accept": "text/event-stream"}


async def append_elsewhere(
    live: LiveServer, url: str, stream: str, n: int, *, close: bool = False
) -> str:
    """Append from a second backend instance on the same storage (memory: the server's own,
    there is no other); returns the epoch."""
    events = [NewEvent("tick", {"i": i}) for i in range(n)]
    if url.startswith("memory:"):
        log = live.runtime.backend
        result = await log.append(stream, events)
        if close:
            await log.close(stream, "done")
        return result.epoch
    async with open_backend(url) as other:
        result = await other.append(stream, events)
        if close:
            await other.close(stream, "done")
    return result.epoch


async def until(condition: Callable[[], bool], seconds: float = 20) -> None:
    """Wait for a condition on the server's state, observed from outside (no event to await)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_sse_opens_at_once_keeps_alive_and_delivers_from_id_1(
    start_server: StartServer, backend_url: str
) -> None:
    live = await start_server(make_settings(keepalive=0.1, retry_ms=1500), backend_url=backend_url)
    async with (
        httpx.AsyncClient(base_url=live.url, timeout=30) as http,
        http.stream("GET", "/v1/streams/later/events", headers=SSE) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.aiter_bytes()
        head = await anext(chunks)
        assert head.startswith(b"retry: 1500\n")
        pings = 0
        started = time.monotonic()
        while pings < 3:
            pings += (await anext(chunks)).count(b": ping")
        assert time.monotonic() - started < 3
        epoch = await append_elsewhere(live, backend_url, "later", 3, close=True)
        body = b""
        async for chunk in chunks:
            body += chunk
    frames = [f for f in body.decode().split("\n\n") if f.startswith("id:")]
    assert [f.split("\n")[0] for f in frames] == [f"id: {epoch}:{i}" for i in range(1, 5)]
    assert "event: end" in frames[-1]


async def test_websocket_accepts_at_once_heartbeats_and_delivers_from_id_1(
    start_server: StartServer, backend_url: str
) -> None:
    live = await start_server(make_settings(keepalive=0.1), backend_url=backend_url)
    async with connect(f"{live.ws_url}/v1/streams/wlater/ws", ping_interval=None) as ws:
        beats = [json.loads(await ws.recv()) for _ in range(2)]
        assert [b["type"] for b in beats] == [HEARTBEAT_TYPE] * 2
        epoch = await append_elsewhere(live, backend_url, "wlater", 2, close=True)
        messages = []
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] != HEARTBEAT_TYPE:
                messages.append(message)
    assert [m["id"] for m in messages] == [1, 2, 3]
    assert {m["epoch"] for m in messages} == {epoch}
    assert messages[-1]["type"] == "end"


async def test_long_poll_waits_up_to_wait_then_answers_an_empty_page_without_epoch(
    start_server: StartServer, backend_url: str
) -> None:
    live = await start_server(backend_url=backend_url)
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        started = time.monotonic()
        r = await http.get("/v1/streams/plater/events", params={"wait": 0.3, "after": 7})
        took = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json() == {
            "stream": "plater",
            "epoch": None,
            "events": [],
            "next_after": 7,
            "closed": False,
        }
        assert 0.25 <= took < 3
        # A catch-up read (no wait) of a stream that does not exist is 404.
        r = await http.get("/v1/streams/plater/events")
        assert r.status_code == 404 and r.json()["error"]["code"] == "stream_not_found"
        # Created while the poll waits: it answers at once, from id 1.
        poll = asyncio.ensure_future(http.get("/v1/streams/plater/events", params={"wait": 20}))
        await asyncio.sleep(0.2)
        assert not poll.done()
        epoch = await append_elsewhere(live, backend_url, "plater", 2)
        started = time.monotonic()
        r = await poll
        assert time.monotonic() - started < 5
    page = r.json()
    assert page["epoch"] == epoch and [e["id"] for e in page["events"]] == [1, 2]


@pytest.mark.parametrize("value", ["0", "false", "no", "off"])
async def test_the_opt_out_parameter_answers_404_on_every_transport(
    start_server: StartServer, value: str
) -> None:
    live = await start_server()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        for headers, params in (
            (SSE, {}),
            ({}, {"wait": "5"}),
        ):
            r = await http.get(
                "/v1/streams/none/events",
                headers=headers,
                params={**params, "wait_for_create": value},
            )
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "stream_not_found"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{live.ws_url}/v1/streams/none/ws?wait_for_create={value}"):
            pass
    assert refused.value.response.status_code == 404


async def test_the_setting_turns_waiting_off_and_the_parameter_back_on(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(wait_for_create=False, keepalive=0.1))
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        r = await http.get("/v1/streams/s/events", headers=SSE)
        assert r.status_code == 404
        async with open_sse(http, "/v1/streams/s/events", wait_for_create="1") as sse:
            await publish(http, "s", 1)
            assert [m.id.split(":")[1] for m in await sse.take(1)] == ["1"]


async def test_an_invalid_opt_out_value_is_400(start_server: StartServer) -> None:
    live = await start_server()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        for headers in (SSE, {}):
            r = await http.get(
                "/v1/streams/s/events", headers=headers, params={"wait_for_create": "maybe"}
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "invalid"


async def test_waiting_clients_count_against_the_subscriber_limits(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(limit_max_subscribers_per_stream=2))
    async with (
        httpx.AsyncClient(base_url=live.url, timeout=30) as http,
        open_sse(http, "/v1/streams/full/events"),
        open_sse(http, "/v1/streams/full/events"),
    ):
        await until(lambda: live.runtime.hub.subscriber_count == 2)
        r = await http.get("/v1/streams/full/events", headers=SSE)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "too_many_subscribers"


async def test_shutdown_ends_waiting_responses_promptly(start_server: StartServer) -> None:
    live = await start_server(make_settings(keepalive=60, shutdown_grace=0.2))
    async with (
        httpx.AsyncClient(base_url=live.url, timeout=30) as http,
        open_sse(http, "/v1/streams/w/events") as sse,
    ):
        await until(lambda: live.runtime.hub.subscriber_count == 1)
        took = await live.stop()
        assert await sse.rest() == []
    assert took < 5
