"""AsyncClient: safe publish retries, the runs and streams calls, and stopping promptly."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from runstream.client._async import AsyncClient
from runstream.client.handlers import Context
from runstream.client.policy import RetryPolicy
from runstream.core.model import Event
from runstream.errors import StreamClosed, StreamNotFound, TaskNotFound

from .conftest import LiveServer, start_server, stop_server
from .faultproxy import Fault, FaultProxy
from .rawserver import RawServer, http_response

STOP_WITHIN = 1.0


async def test_publish_retry_after_a_lost_response_stores_the_event_once(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    first = True

    def plan(_head: bytes) -> Fault:
        # The request reaches the server; the answer never reaches the client.
        nonlocal first
        fault, first = (Fault("truncate", at=0) if first else Fault()), False
        return fault

    proxy.plan = plan
    retry = RetryPolicy(base_delay=0.001, max_delay=0.01)
    async with AsyncClient(proxy.url, retry=retry) as client:
        result = await client.publish("once", "tick", {"n": 1})
        again = await client.publish("once", "tick", {"n": 2})
        page = await client.read("once")
    assert result.duplicate and result.first_id == result.last_id == 1
    assert not again.duplicate and again.first_id == 2
    assert [(e.id, e.data) for e in page.events] == [(1, {"n": 1}), (2, {"n": 2})]
    assert proxy.injected["truncate"] == 1


async def test_streams_calls_map_answers_and_errors(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as c:
        with pytest.raises(StreamNotFound):
            await c.info("nope")
        await c.publish_many("calls", [("a", 1), {"type": "b", "data": [2]}])
        info = await c.info("calls")
        assert info.name == "calls" and info.last_id == 2 and info.status == "open"
        await c.close_stream("calls", status="done")
        with pytest.raises(StreamClosed):
            await c.publish("calls", "late", None)
        page = await c.read("calls", after=1)
        assert [e.type for e in page.events] == ["b", "end"] and page.closed
        assert page.events[0].time > 1.7e9


async def test_runs_calls_send_the_documented_requests() -> None:
    run = {"id": "r1", "task": "hello", "status": "queued", "params": {"name": "x"}}

    def respond(head: bytes, _i: int) -> bytes:
        line = head.split(b"\r\n")[0].decode()
        if line.startswith("POST /v1/runs/r1/cancel"):
            return http_response(202, json.dumps({**run, "status": "cancelled"}).encode())
        if line.startswith("POST /v1/runs "):
            return http_response(201, json.dumps(run).encode())
        if line.startswith("GET /v1/runs/r1 "):
            return http_response(200, json.dumps(run).encode())
        if line.startswith("GET /v1/runs?"):
            return http_response(200, json.dumps({"runs": [run], "next_cursor": None}).encode())
        body = b'{"error": {"code": "task_not_found", "message": "no task"}}'
        return http_response(404, body)

    async with RawServer(respond) as srv, AsyncClient(srv.url) as c:
        assert (await c.create_run("hello", {"name": "x"}, timeout=5))["id"] == "r1"
        assert (await c.get_run("r1"))["status"] == "queued"
        assert (await c.list_runs(status="queued", limit=5))["runs"][0]["id"] == "r1"
        assert (await c.cancel_run("r1"))["status"] == "cancelled"
        with pytest.raises(TaskNotFound, match="no task"):
            await c.get_run("missing")
    lines = [h.split(b"\r\n")[0].decode() for h in srv.requests]
    assert lines[0] == "POST /v1/runs HTTP/1.1"
    assert lines[2].startswith("GET /v1/runs?status=queued&limit=5 ")


# -- stopping --------------------------------------------------------------------------


async def test_stop_event_ends_run_forever_within_a_second_while_reading(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    stop = asyncio.Event()
    async with AsyncClient(proxy.url) as client:
        await client.publish("open", "tick", 1)

        @client.on("tick")
        async def first(ev: Event, ctx: Context) -> None:
            stop.set()  # stop as soon as the first event is handled; the stream stays open

        loop = asyncio.get_running_loop()
        task = asyncio.create_task(client.run_forever("open", stop_event=stop))
        await stop.wait()
        t0 = loop.time()
        assert await asyncio.wait_for(task, 5) is None
        assert loop.time() - t0 < STOP_WITHIN
    await proxy.wait_for(lambda: all(c.client_closed is not None for c in proxy.log))


async def test_stop_cancels_the_backoff_sleep() -> None:
    reply = http_response(503, b"{}", headers={"Retry-After": "30"})
    stop = asyncio.Event()
    async with RawServer(lambda _h, _i: reply) as srv, AsyncClient(srv.url) as client:
        task = asyncio.create_task(client.run_forever("s", stop_event=stop))
        await srv.wait_requests(1)  # the first attempt failed: a 30 s backoff follows
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stop.set()
        await asyncio.wait_for(task, 5)
        assert loop.time() - t0 < STOP_WITHIN
    assert len(srv.requests) == 1


async def test_aclose_cancels_a_stalled_read(live_server: LiveServer, proxy: FaultProxy) -> None:
    proxy.plan = lambda _head: Fault("stall_first")
    client = AsyncClient(proxy.url)
    follower = client.follow("stalled", first_event=0, idle=0, stale=0)
    reading = asyncio.create_task(anext(follower))
    await proxy.stall_started.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await client.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reading, 5)
    assert loop.time() - t0 < STOP_WITHIN
    await proxy.wait_for(lambda: proxy.log[0].client_closed is not None)


async def test_stop_drains_running_handlers_with_a_timeout(live_server: LiveServer) -> None:
    stop = asyncio.Event()
    finished = []
    async with AsyncClient(live_server.url) as client:
        await client.publish_many("drain", [("quick", 1), ("stuck", 2)])

        @client.on("quick")
        async def quick(ev: Event, ctx: Context) -> None:
            await asyncio.sleep(0.1)
            finished.append(ev.id)

        @client.on("stuck")
        async def stuck(ev: Event, ctx: Context) -> None:
            stop.set()
            await asyncio.sleep(60)
            finished.append(ev.id)

        loop = asyncio.get_running_loop()
        task = asyncio.create_task(client.run_forever("drain", stop_event=stop, drain_timeout=0.3))
        await stop.wait()
        t0 = loop.time()
        await asyncio.wait_for(task, 5)
        took = loop.time() - t0
    assert finished == [1]  # the quick one finished during the drain, the stuck one was cut
    assert 0.25 <= took < STOP_WITHIN


async def test_a_run_is_created_followed_to_its_end_and_listed() -> None:
    script = "import sys; print('hello', sys.argv[1]); print('bye', file=sys.stderr)"
    tasks: dict[str, dict[str, object]] = {
        "hello": {
            "command": [sys.executable, "-u", "-c", script, "{name}"],
            "params": {"name": {"type": "string", "default": "world"}},
        }
    }
    server, task, handle = await start_server(tasks=tasks)
    try:
        async with AsyncClient(server.url) as client:
            assert "hello" in json.dumps(await client.list_tasks())
            run = await client.create_run("hello", {"name": "sdk"})
            lines: list[str] = []
            statuses: list[str] = []
            async with client.follow_run(run["id"]) as events:
                async for item in events:
                    assert isinstance(item, Event)
                    if item.type in ("stdout", "stderr"):
                        lines.append(item.data["line"])
                    elif item.type == "status":
                        statuses.append(item.data["status"])
                    last = item
            assert last.is_end and last.data["status"] == "succeeded"
            assert sorted(lines) == ["bye", "hello sdk"]  # two pipes: no order between them
            assert statuses[-1] == "succeeded" and "running" in statuses
            assert (await client.get_run(run["id"]))["status"] == "succeeded"
            listed = await client.list_runs(task="hello")
            assert run["id"] in json.dumps(listed)
            with pytest.raises(TaskNotFound):
                await client.create_run("no-such-task")
    finally:
        await stop_server(task, handle)
