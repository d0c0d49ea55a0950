"""How a follower treats answers it must not retry, must retry, or must correct."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import httpx
import pytest

from runstream.client._async import AsyncClient
from runstream.client.follow import FollowOptions
from runstream.client.metrics import Metrics
from runstream.client.policy import RetryPolicy
from runstream.core.model import Event, Reset
from runstream.errors import HistoryLost, HTTPStatusError, ProtocolError, RetriesExhausted

from .conftest import LiveServer
from .faultproxy import Fault, FaultProxy
from .rawserver import RawServer, http_response

FAST = RetryPolicy(base_delay=0.001, max_delay=0.01, max_attempts=4, max_elapsed=10)


def sse(*frames: str) -> bytes:
    return http_response(200, "".join(frames).encode(), content_type="text/event-stream")


def frame(id: str, data: object, event: str = "tick") -> str:
    return f"id: {id}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


def end(id: str) -> str:
    return frame(id, {"status": "succeeded", "reason": None}, "end")


def header(head: bytes, name: str) -> str | None:
    for line in head.decode().split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


async def collect(client: AsyncClient, stream: str = "s", **kw: Any) -> list[Event | Reset]:
    return [item async for item in client.follow(stream, **kw)]


async def test_204_ends_the_follow_cleanly_without_items() -> None:
    async with RawServer(lambda _h, _i: http_response(204)) as srv, AsyncClient(srv.url) as c:
        assert await collect(c) == []
    assert len(srv.requests) == 1


async def test_wrong_content_type_raises_protocol_error_with_the_body() -> None:
    page = http_response(200, b"<html>please log in</html>", content_type="text/html")
    async with RawServer(lambda _h, _i: page) as srv, AsyncClient(srv.url) as c:
        with pytest.raises(ProtocolError, match="please log in"):
            await collect(c)
    assert len(srv.requests) == 1  # never reconnects blindly


async def test_other_4xx_raises_with_the_body_and_does_not_reconnect() -> None:
    body = b'{"error": {"code": "forbidden", "message": "token lacks read scope"}}'
    async with RawServer(lambda _h, _i: http_response(403, body)) as srv, AsyncClient(srv.url) as c:
        with pytest.raises(HTTPStatusError, match="token lacks read scope") as info:
            await collect(c)
    assert info.value.status == 403 and info.value.error_code == "forbidden"
    assert len(srv.requests) == 1


async def test_401_calls_the_refresh_hook_then_retries_with_the_new_token() -> None:
    def respond(head: bytes, i: int) -> bytes:
        if header(head, "authorization") != "Bearer fresh":
            return http_response(401, b'{"error": {"code": "unauthorized", "message": "expired"}}')
        return sse("retry: 1\n\n", frame("ep:1", 1), end("ep:2"))

    calls = 0

    async def refresh() -> str:
        nonlocal calls
        calls += 1
        return "fresh"

    async with (
        RawServer(respond) as srv,
        AsyncClient(srv.url, token="stale", token_refresh=refresh) as c,
    ):
        items = await collect(c)
    assert calls == 1 and [i.id for i in items if isinstance(i, Event)] == [1, 2]
    assert [header(h, "authorization") for h in srv.requests] == ["Bearer stale", "Bearer fresh"]


async def test_401_after_a_refresh_raises() -> None:
    async def refresh() -> str:
        return "also-bad"

    reply = http_response(401, b'{"error": {"code": "unauthorized", "message": "nope"}}')
    async with (
        RawServer(lambda _h, _i: reply) as srv,
        AsyncClient(srv.url, token="x", token_refresh=refresh) as c,
    ):
        with pytest.raises(HTTPStatusError, match="nope") as info:
            await collect(c)
    assert info.value.status == 401 and len(srv.requests) == 2


async def test_5xx_is_retried_until_the_outage_budget_is_spent() -> None:
    reply = http_response(503, b'{"error": {"code": "unavailable", "message": "busy"}}')
    async with RawServer(lambda _h, _i: reply) as srv, AsyncClient(srv.url) as c:
        with pytest.raises(RetriesExhausted, match="4 failed attempts"):
            await collect(c, retry=FAST, transport="sse")
    assert len(srv.requests) == 5


async def test_accept_then_close_does_not_reset_attempts_and_respects_the_retry_floor() -> None:
    # Every connection "succeeds" (200, retry: 80) and ends at once without an event.
    reply = sse("retry: 80\n\n")
    stamps: list[float] = []

    def respond(_head: bytes, _i: int) -> bytes:
        stamps.append(asyncio.get_running_loop().time())
        return reply

    async with RawServer(respond) as srv, AsyncClient(srv.url) as c:
        with pytest.raises(RetriesExhausted):
            await collect(c, retry=FAST, transport="sse")
    assert len(srv.requests) == 5  # the budget ran out although every connect succeeded
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 0.08 * 0.95  # the server's retry: is the floor of every wait


async def test_last_event_id_is_sent_on_reconnect_only_when_known() -> None:
    def respond(head: bytes, i: int) -> bytes:
        return sse(frame("ep:1", 1)) if i == 0 else sse(frame("ep:2", 2), end("ep:3"))

    async with RawServer(respond) as srv, AsyncClient(srv.url) as c:
        items = await collect(c, retry=FAST)
    assert [i.id for i in items if isinstance(i, Event)] == [1, 2, 3]
    assert header(srv.requests[0], "last-event-id") is None
    assert header(srv.requests[1], "last-event-id") == "ep:1"


async def test_a_gap_in_ids_drops_the_connection_and_resumes_from_the_last_delivered() -> None:
    def respond(head: bytes, i: int) -> bytes:
        if i == 0:
            return sse(frame("ep:1", 1), frame("ep:3", 3))
        return sse(frame("ep:1", 1), frame("ep:2", 2), frame("ep:3", 3), end("ep:4"))

    metrics = Metrics()
    async with RawServer(respond) as srv, AsyncClient(srv.url) as c:
        items = await collect(c, retry=FAST, metrics=metrics)
    assert [i.id for i in items if isinstance(i, Event)] == [1, 2, 3, 4]
    assert metrics.reconnects == {"gap": 1} and metrics.duplicates_dropped == 1
    assert header(srv.requests[1], "last-event-id") == "ep:1"


async def test_bad_json_is_asked_for_again_then_skipped_and_counted() -> None:
    def respond(head: bytes, i: int) -> bytes:
        bad = "id: ep:1\nevent: tick\ndata: {broken\n\n"
        return sse(bad, frame("ep:2", 2), end("ep:3"))

    metrics = Metrics()
    async with RawServer(respond) as srv, AsyncClient(srv.url) as c:
        items = await collect(c, retry=FAST, metrics=metrics)
    assert [i.id for i in items if isinstance(i, Event)] == [2, 3]
    assert metrics.malformed == 2 and len(srv.requests) == 2


async def test_406_switches_to_long_polling_from_the_same_position() -> None:
    page = {
        "stream": "s",
        "epoch": "ep",
        "events": [
            {"id": 3, "type": "tick", "data": 3, "time": "2026-11-23T13:00:00.000Z"},
            {"id": 4, "type": "end", "data": {"status": "ok"}, "time": "2026-11-23T13:00:01Z"},
        ],
        "next_after": 4,
        "closed": True,
    }

    def respond(head: bytes, i: int) -> bytes:
        if header(head, "accept") == "text/event-stream":
            return http_response(406, b'{"error": {"code": "not_acceptable", "message": "no"}}')
        return http_response(200, json.dumps(page).encode())

    async with RawServer(respond) as srv, AsyncClient(srv.url) as c:
        items = await collect(c, after="ep:2")
    assert [(i.id, i.type) for i in items if isinstance(i, Event)] == [(3, "tick"), (4, "end")]
    assert isinstance(items[0], Event) and items[0].time == pytest.approx(1795438800.0)
    assert b"after=ep%3A2" in srv.requests[1]


# -- against the real server ----------------------------------------------------------


async def test_reset_is_yielded_when_the_epoch_changed(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as c:
        await c.publish_many("r", [("tick", i) for i in range(3)])
        await c.close_stream("r")
        items = await collect(c, "r", after="0123456789ab:2")
    assert isinstance(items[0], Reset) and items[0].reason == "epoch_changed"
    assert items[0].requested == 2 and items[0].after == 0
    assert [i.id for i in items[1:] if isinstance(i, Event)] == [1, 2, 3, 4]


async def test_reset_raise_mode_raises_history_lost(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as c:
        await c.publish("r2", "tick", 1)
        with pytest.raises(HistoryLost) as info:
            await collect(c, "r2", after="0123456789ab:1", reset="raise")
    info_ = await_info = info.value
    assert await_info.reason == "epoch_changed" and info_.first_id == 1


@pytest.mark.timeout(30)
async def test_falls_back_to_polling_while_sse_fails_then_returns_to_streaming(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    sse_broken = True

    def plan(head: bytes) -> Fault:
        is_sse = b"text/event-stream" in head.lower()
        return Fault("accept_close") if is_sse and sse_broken else Fault()

    proxy.plan = plan
    options = FollowOptions(
        poll_wait=0.2,
        retry=RetryPolicy(base_delay=0.001, max_delay=0.01, fallback_after=3, probe_interval=0.3),
    )
    metrics = Metrics()
    received: list[Event | Reset] = []
    # One request per connection, so the proxy sees (and can break) each one.
    no_reuse = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
    async with (
        AsyncClient(live_server.url) as producer,
        AsyncClient(proxy.url, transport=no_reuse) as consumer,
    ):
        await producer.publish_many("fb", [("tick", i) for i in range(20)])
        follower = consumer.follow("fb", options=options, metrics=metrics)

        async def consume() -> None:
            async for item in follower:
                received.append(item)

        consuming = asyncio.create_task(consume())
        await proxy.wait_for(lambda: sum(b"application/json" in c.request for c in proxy.log) >= 2)
        assert metrics.mode == "poll"
        sse_broken = False
        await producer.publish_many("fb", [("tick", i) for i in range(20, 30)])
        await proxy.wait_for(lambda: proxy.log[-1].fault.kind is None and is_sse(proxy.log[-1]))
        await producer.close_stream("fb")
        await asyncio.wait_for(consuming, 10)
    assert [i.id for i in received if isinstance(i, Event)] == list(range(1, 32))
    assert metrics.mode == "stream"
    assert metrics.reconnects["network"] >= 3


def is_sse(conn: object) -> bool:
    return b"text/event-stream" in getattr(conn, "request", b"").lower()


async def test_poll_only_transport_delivers_everything_and_reports_a_410_as_reset(
    live_server: LiveServer,
) -> None:
    async with AsyncClient(live_server.url) as c:
        await c.publish_many("po", [("tick", i) for i in range(250)])

        async def finish() -> None:
            await c.publish_many("po", [("tick", i) for i in range(250, 300)])
            await c.close_stream("po", status="done")

        closing = asyncio.create_task(finish())
        items = await collect(
            c, "po", after="0123456789ab:3", transport="poll", poll_limit=100, poll_wait=0.2
        )
        await closing
    assert isinstance(items[0], Reset) and items[0].reason == "epoch_changed"
    events = [i for i in items if isinstance(i, Event)]
    assert [e.id for e in events] == list(range(1, 302))
    assert events[0].time > 1.7e9 and events[-1].is_end and events[-1].data["status"] == "done"
