"""``follow(transport=...)``: SSE, WebSocket and long-poll give the same guarantees.

Each behaviour is checked on every transport against a real server (and, where
the network has to misbehave, through the fault proxy): resume, duplicates,
resets, the end, ``after="now"``, server time and epoch on events, watchdogs
fed by keepalives or heartbeats, backpressure, auth refresh, stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest

from runstream.client._async import AsyncClient
from runstream.client.follow import TRANSPORTS, Follower
from runstream.client.metrics import Metrics
from runstream.client.policy import RetryPolicy
from runstream.config import Token
from runstream.core.model import Event, Reset
from runstream.errors import StreamNotFound

from .conftest import LiveServer, start_server, stop_server
from .faultproxy import Fault, FaultProxy

STREAMING = ["sse", "ws"]
EVERY = ["sse", "ws", "poll"]
FAST = RetryPolicy(base_delay=0.001, max_delay=0.02, max_attempts=10, max_elapsed=20)


async def fill(server: LiveServer, stream: str, n: int, *, close: bool = True) -> None:
    async with AsyncClient(server.url) as c:
        await c.publish_many(stream, [("tick", {"n": i}) for i in range(n)])
        if close:
            await c.close_stream(stream, status="succeeded")


async def collect(follower: Follower) -> list[Event | Reset]:
    async with follower:
        return [item async for item in follower]


def ids(items: list[Event | Reset]) -> list[int]:
    return [i.id for i in items if isinstance(i, Event)]


def test_every_transport_is_accepted_and_auto_is_the_default() -> None:
    from runstream.client.follow import FollowOptions

    assert TRANSPORTS == ("auto", "sse", "ws", "poll")
    assert FollowOptions().transport == "auto"


@pytest.mark.parametrize("transport", EVERY)
async def test_resume_delivers_the_rest_once_with_server_time_and_epoch(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "r", 10)
    async with AsyncClient(live_server.url) as c:
        page = await c.read("r")
        items = await collect(c.follow("r", after=f"{page.epoch}:4", transport=transport))  # type: ignore[arg-type]
    assert ids(items) == list(range(5, 12))
    events = [i for i in items if isinstance(i, Event)]
    by_id = {e.id: e for e in page.events}
    # The server's timestamp, not the time the client received it.
    assert [e.time for e in events] == [by_id[e.id].time for e in events]
    assert {e.epoch for e in events} == {page.epoch}
    assert events[-1].is_end and events[-1].data["status"] == "succeeded"


@pytest.mark.parametrize("transport", EVERY)
async def test_a_position_from_another_epoch_yields_a_reset_first(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "re", 3)
    async with AsyncClient(live_server.url) as c:
        follower = c.follow("re", after="0123456789ab:2", transport=transport)  # type: ignore[arg-type]
        items = await collect(follower)
    assert isinstance(items[0], Reset)
    assert (items[0].reason, items[0].after, items[0].requested) == ("epoch_changed", 0, 2)
    assert ids(items) == [1, 2, 3, 4]
    assert follower.metrics.resets == 1


@pytest.mark.parametrize("transport", EVERY)
async def test_a_stream_already_read_to_its_end_ends_without_items(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "done", 2)
    async with AsyncClient(live_server.url) as c:
        epoch = (await c.info("done")).epoch
        follower = c.follow("done", after=f"{epoch}:3", transport=transport, retry=FAST)  # type: ignore[arg-type]
        assert await collect(follower) == []


@pytest.mark.parametrize("transport", EVERY)
async def test_after_now_sees_only_what_is_appended_later(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "now", 5, close=False)
    async with AsyncClient(live_server.url) as c:
        follower = c.follow("now", after="now", transport=transport, poll_wait=0.2)  # type: ignore[arg-type]
        first = asyncio.create_task(anext(follower))
        # Before the first new event the follower may (re)connect any number of times.
        await asyncio.sleep(0.3)
        await c.publish("now", "late", {"n": 5})
        await c.close_stream("now")
        items = [await first] + [i async for i in follower]
        await follower.aclose()
    assert ids(items) == [6, 7]


@pytest.mark.parametrize("transport", EVERY)
async def test_following_a_stream_before_it_exists_gets_every_event_from_id_1(
    live_server: LiveServer, transport: str
) -> None:
    async with AsyncClient(live_server.url) as c:
        follower = c.follow("later", transport=transport, poll_wait=0.2)  # type: ignore[arg-type]
        first = asyncio.create_task(anext(follower))
        # It connects (several times, on poll) and waits: nothing to deliver yet.
        await asyncio.sleep(0.4)
        assert not first.done()
        await fill(live_server, "later", 3)
        items = [await first] + [i async for i in follower]
        await follower.aclose()
        epoch = (await c.info("later")).epoch
    assert ids(items) == [1, 2, 3, 4]
    # The epoch is learned on every transport (WebSocket: in-band), so a resume checks it.
    assert {i.epoch for i in items if isinstance(i, Event)} == {epoch}
    assert follower.position == f"{epoch}:4"


@pytest.mark.parametrize("transport", EVERY)
async def test_after_now_on_a_stream_not_created_yet_gets_all_it_will_hold(
    live_server: LiveServer, transport: str
) -> None:
    async with AsyncClient(live_server.url) as c:
        follower = c.follow("nowlater", after="now", transport=transport, poll_wait=0.2)  # type: ignore[arg-type]
        first = asyncio.create_task(anext(follower))
        await asyncio.sleep(0.3)
        await fill(live_server, "nowlater", 2)
        items = [await first] + [i async for i in follower]
        await follower.aclose()
    assert ids(items) == [1, 2, 3]


@pytest.mark.parametrize("transport", EVERY)
async def test_an_unknown_stream_raises_stream_not_found_when_not_waiting(
    live_server: LiveServer, transport: str
) -> None:
    async with AsyncClient(live_server.url) as c:
        with pytest.raises(StreamNotFound):
            await collect(c.follow("missing", transport=transport, wait_for_create=False))  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", STREAMING)
async def test_keepalives_or_heartbeats_keep_the_idle_watchdog_quiet(
    live_server: LiveServer, transport: str
) -> None:
    # The server sends one every 0.1 s (SSE comment / WebSocket {"type": "ping"}).
    await fill(live_server, "idle", 1, close=False)
    metrics = Metrics()
    async with AsyncClient(live_server.url) as c:
        follower = c.follow("idle", transport=transport, idle=0.3, metrics=metrics)  # type: ignore[arg-type]
        first = await anext(follower)
        await asyncio.sleep(1.0)  # four idle periods without an event
        await c.close_stream("idle")
        rest = [i async for i in follower]
        await follower.aclose()
    assert ids([first, *rest]) == [1, 2]
    assert metrics.watchdog_kills == {} and metrics.reconnect_count == 0


@pytest.mark.parametrize("transport", STREAMING)
async def test_stale_fires_when_only_keepalives_or_heartbeats_arrive(
    live_server: LiveServer, proxy: FaultProxy, transport: str
) -> None:
    await fill(live_server, "stale", 1, close=False)
    marker = b"upgrade: websocket" if transport == "ws" else b"text/event-stream"

    def streams() -> list[Any]:
        return [conn for conn in proxy.log if marker in conn.request.lower()]

    metrics = Metrics()
    async with AsyncClient(proxy.url) as c:
        follower = c.follow(
            "stale",
            after=1,
            transport=transport,  # type: ignore[arg-type]
            idle=0.3,
            stale=0.6,
            metrics=metrics,
        )
        waiting = asyncio.create_task(anext(follower))
        await proxy.wait_for(lambda: len(streams()) >= 2)
        await follower.aclose()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await waiting
    first = streams()[0]
    assert first.client_closed is not None
    assert 0.5 <= first.client_closed - first.accepted <= 0.8
    # Keepalives every 0.1 s kept the idle timer (0.3 s) from ever firing.
    assert metrics.watchdog_kills == {"stale": 1}


@pytest.mark.parametrize("transport", EVERY)
async def test_a_slow_consumer_pauses_reading_without_tripping_a_watchdog(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "slow", 4)
    metrics = Metrics()
    got = []
    async with AsyncClient(live_server.url) as c:
        follower = c.follow(
            "slow",
            transport=transport,  # type: ignore[arg-type]
            idle=0.3,
            stale=0.3,
            buffer=1,
            poll_limit=2,
            metrics=metrics,
        )
        async with follower:
            async for item in follower:
                got.append(item)
                await asyncio.sleep(0.4)  # slower than both timers
    assert ids(got) == [1, 2, 3, 4, 5]
    assert metrics.watchdog_kills == {} and metrics.reconnect_count == 0


@pytest.mark.parametrize("transport", EVERY)
async def test_a_stop_event_ends_the_follow_promptly(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "stop", 1, close=False)
    stop = asyncio.Event()
    async with AsyncClient(live_server.url) as c:
        follower = c.follow("stop", transport=transport, stop_event=stop, poll_wait=30)  # type: ignore[arg-type]
        got = [await anext(follower)]
        loop = asyncio.get_running_loop()
        stop.set()
        started = loop.time()
        got += [i async for i in follower]
        took = loop.time() - started
    assert ids(got) == [1] and took < 1.0


@pytest.mark.parametrize("transport", EVERY)
async def test_401_calls_the_refresh_hook_then_follows_with_the_new_token(
    transport: str,
) -> None:
    server, task, handle = await start_server(
        tokens=(Token("fresh", frozenset({"read", "write"})),)
    )
    calls = 0

    async def refresh() -> str:
        nonlocal calls
        calls += 1
        return "fresh"

    try:
        async with AsyncClient(server.url, token="fresh") as producer:
            await producer.publish_many("auth", [("tick", 1), ("tick", 2)])
            await producer.close_stream("auth")
        async with AsyncClient(server.url, token="stale", token_refresh=refresh) as c:
            items = await collect(c.follow("auth", transport=transport))  # type: ignore[arg-type]
    finally:
        await stop_server(task, handle)
    assert ids(items) == [1, 2, 3] and calls == 1


async def test_websocket_reconnects_resume_exactly_through_connection_faults(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    faults = iter([Fault("reset", at=900), Fault("truncate", at=1500), Fault("garbage", at=300)])

    def plan(head: bytes) -> Fault:
        return next(faults, Fault()) if b"upgrade: websocket" in head.lower() else Fault()

    proxy.plan = plan
    await fill(live_server, "wsf", 200)
    metrics = Metrics()
    async with AsyncClient(proxy.url) as c:
        items = await collect(c.follow("wsf", transport="ws", retry=FAST, metrics=metrics))
    assert ids(items) == list(range(1, 202))
    assert proxy.injected["reset"] == proxy.injected["truncate"] == proxy.injected["garbage"] == 1
    assert metrics.reconnects["network"] >= 2 and metrics.malformed == 3


async def test_websocket_first_event_watchdog_trips_at_its_setting(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    stalled = False

    def plan(head: bytes) -> Fault:
        nonlocal stalled
        if b"upgrade: websocket" in head.lower() and not stalled:
            stalled = True
            return Fault("stall_first")
        return Fault()

    proxy.plan = plan
    await fill(live_server, "wsttfb", 3)
    metrics = Metrics()
    async with AsyncClient(proxy.url) as c:
        follower = c.follow("wsttfb", transport="ws", first_event=0.5, idle=5, metrics=metrics)
        items = await collect(follower)
    assert ids(items) == [1, 2, 3, 4]
    conn = next(conn for conn in proxy.log if conn.fault.kind == "stall_first")
    assert conn.client_closed is not None
    assert 0.4 <= conn.client_closed - conn.accepted <= 0.65
    assert metrics.watchdog_kills == {"first_event": 1}


async def test_follow_run_over_websocket_uses_the_runs_endpoint() -> None:
    tasks: dict[str, dict[str, object]] = {"hello": {"command": ["echo", "hi"]}}
    server, task, handle = await start_server(tasks=tasks)
    try:
        async with AsyncClient(server.url) as c:
            run = await c.create_run("hello")
            items: list[Any] = await collect(c.follow_run(run["id"], transport="ws"))
    finally:
        await stop_server(task, handle)
    lines = [i.data["line"] for i in items if isinstance(i, Event) and i.type == "stdout"]
    assert lines == ["hi"] and isinstance(items[-1], Event) and items[-1].is_end


@pytest.mark.parametrize("transport", EVERY)
async def test_a_stream_deleted_while_followed_is_waited_for_and_reported_as_a_reset(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "gone", 2, close=False)
    async with AsyncClient(live_server.url) as c:
        follower = c.follow("gone", transport=transport, retry=FAST, poll_wait=0.2)  # type: ignore[arg-type]
        got = [await anext(follower), await anext(follower)]
        old_epoch = follower.epoch
        await c.delete_stream("gone")
        nxt = asyncio.create_task(anext(follower))
        await asyncio.sleep(0.3)
        assert not nxt.done()  # waiting for the stream to come back, not failing
        await fill(live_server, "gone", 1)
        items = [await nxt] + [i async for i in follower]
        await follower.aclose()
    assert ids(got) == [1, 2]
    reset = items[0]
    assert isinstance(reset, Reset) and reset.reason == "epoch_changed"
    assert reset.epoch != old_epoch and (reset.after, reset.requested) == (0, 2)
    assert ids(items) == [1, 2]


@pytest.mark.parametrize("transport", EVERY)
async def test_deleting_the_stream_while_following_raises_stream_not_found_when_not_waiting(
    live_server: LiveServer, transport: str
) -> None:
    await fill(live_server, "gone2", 2, close=False)
    async with AsyncClient(live_server.url) as c:
        follower = c.follow(
            "gone2",
            transport=transport,  # type: ignore[arg-type]
            retry=FAST,
            poll_wait=0.2,
            wait_for_create=False,
        )
        got = [await anext(follower), await anext(follower)]
        await c.delete_stream("gone2")
        with pytest.raises(StreamNotFound):
            await collect(follower)
    assert ids(got) == [1, 2]


async def test_websocket_learns_the_epoch_in_band_without_another_request(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    # WebSocket events carry their epoch, and the follower resumes with it (no GET of
    # the stream's state, which would not exist yet for a stream not created).
    faults = iter([Fault("reset", at=400)])

    def plan(head: bytes) -> Fault:
        return next(faults, Fault()) if b"upgrade: websocket" in head.lower() else Fault()

    proxy.plan = plan
    await fill(live_server, "wsinfo", 30)
    async with AsyncClient(proxy.url, transport=no_reuse()) as c:
        follower = c.follow("wsinfo", transport="ws", retry=FAST)
        items = await collect(follower)
        epoch = (await c.info("wsinfo")).epoch
    assert ids(items) == list(range(1, 32))
    assert {e.epoch for e in items if isinstance(e, Event)} == {epoch}
    requests = [conn.request.decode() for conn in proxy.log]
    assert all("upgrade: websocket" in r.lower() for r in requests[:2])
    assert f"after={epoch}%3A" in requests[1]  # the resume after the reset carried the epoch
    assert proxy.injected["reset"] == 1


def no_reuse() -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
