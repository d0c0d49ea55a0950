"""Listening to every run: ``follow_runs()`` and ``handle_runs()`` against a real server."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest

from runstream.client import Client, MemoryCheckpointStore
from runstream.client._async import AsyncClient
from runstream.core.model import Event

from .conftest import LiveServer, start_server, stop_server

PY = sys.executable
GATE = (
    "import os, sys, time\nprint('a')\n"
    "while not os.path.exists(sys.argv[1]): time.sleep(0.02)\nprint('b')"
)
COUNT = "import sys\nfor i in range(int(sys.argv[1])): print(i)"
TASKS: dict[str, dict[str, object]] = {
    "count": {
        "command": [PY, "-u", "-c", COUNT, "{n}"],
        "params": {"n": {"type": "integer", "default": 5}},
    },
    "gate": {
        # Prints, then waits for a file to appear before printing the rest.
        "command": [PY, "-u", "-c", GATE, "{path}"],
        "params": {"path": {"type": "string"}},
    },
}


@pytest.fixture
async def runs_server() -> AsyncIterator[LiveServer]:
    server, task, handle = await start_server(tasks=TASKS)
    try:
        yield server
    finally:
        await stop_server(task, handle)


@pytest.mark.parametrize("transport", ["sse", "ws", "poll"])
async def test_follow_runs_sees_runs_created_after_it_started(
    runs_server: LiveServer, transport: str
) -> None:
    async with AsyncClient(runs_server.url) as c:
        feed = c.follow_runs(transport=transport, poll_wait=0.3)  # type: ignore[arg-type]
        first = asyncio.create_task(anext(feed))
        await asyncio.sleep(0.2)
        run = await c.create_run("count", {"n": 2})
        items = [await first]
        while items[-1].type != "ended":  # type: ignore[union-attr]
            items.append(await anext(feed))
        position = feed.position
        await feed.aclose()
    events = [i for i in items if isinstance(i, Event)]
    assert [(e.type, e.data["status"]) for e in events] == [
        ("created", "queued"),
        ("status", "running"),
        ("ended", "succeeded"),
    ]
    assert {e.data["id"] for e in events} == {run["id"]}
    assert position == f"{events[-1].epoch}:{events[-1].id}"


async def test_handle_runs_hands_every_event_of_every_run_to_the_run_handlers(
    runs_server: LiveServer,
) -> None:
    lines: dict[str, list[str]] = defaultdict(list)
    tasks: dict[str, str] = {}
    ended: dict[str, str] = {}
    stop = asyncio.Event()
    async with AsyncClient(runs_server.url) as c:
        before = await c.create_run("count", {"n": 3})  # created before the listener

        @c.on_run("stdout")
        async def line(event: Event, ctx: Any) -> None:
            lines[ctx.stream].append(event.data["line"])
            tasks[ctx.stream] = ctx.extra["run"]["task"]

        @c.on_run("end")
        async def end(event: Event, ctx: Any) -> None:
            ended[ctx.stream] = event.data["status"]
            if len(ended) == 3:
                stop.set()

        listener = asyncio.create_task(c.handle_runs(stop_event=stop))
        after = [await c.create_run("count", {"n": n}) for n in (2, 4)]
        await asyncio.wait_for(listener, 30)
    expected = {before["id"]: 3, after[0]["id"]: 2, after[1]["id"]: 4}
    assert {k: len(v) for k, v in lines.items()} == expected
    assert all(v == [str(i) for i in range(len(v))] for v in lines.values())
    assert set(ended.values()) == {"succeeded"} and set(tasks.values()) == {"count"}


async def test_a_restarted_listener_resumes_unfinished_runs_and_skips_none(
    runs_server: LiveServer, tmp_path: Any
) -> None:
    store = MemoryCheckpointStore()
    gate = tmp_path / "open"
    handled: list[tuple[str, str]] = []
    got_a, done_handled = asyncio.Event(), asyncio.Event()
    async with AsyncClient(runs_server.url) as c:

        @c.on_run("stdout")
        async def line(event: Event, ctx: Any) -> None:
            handled.append((ctx.stream, event.data["line"]))
            if event.data["line"] == "a":
                got_a.set()
            if ctx.stream == done["id"] and event.data["line"] == "1":
                done_handled.set()

        done = await c.create_run("count", {"n": 2})
        waiting = await c.create_run("gate", {"path": str(gate)})
        stop = asyncio.Event()
        listener = asyncio.create_task(c.handle_runs(stop_event=stop, checkpoint=store))
        await asyncio.wait_for(got_a.wait(), 30)
        await asyncio.wait_for(done_handled.wait(), 30)
        stop.set()
        await asyncio.wait_for(listener, 30)
        # The unfinished run's own checkpoint is after 'a' (status queued, running, a).
        assert store.positions[f"runs:{waiting['id']}"].endswith(":3")
        first = list(handled)
        handled.clear()
        gate.write_text("go")
        stop2 = asyncio.Event()
        ended: list[str] = []

        @c.on_run("end")
        async def end(event: Event, ctx: Any) -> None:
            ended.append(ctx.stream)
            if ctx.stream == waiting["id"]:
                stop2.set()

        await asyncio.wait_for(c.handle_runs(stop_event=stop2, checkpoint=store), 30)
    assert (waiting["id"], "a") in first and (done["id"], "1") in first
    # After the restart: the rest of the unfinished run, nothing of the finished one again.
    assert handled == [(waiting["id"], "b")]
    assert ended == [waiting["id"]]


async def test_the_sync_client_handles_runs_with_plain_functions(
    runs_server: LiveServer,
) -> None:
    stop = threading.Event()
    lines: list[str] = []
    result: dict[str, Any] = {}

    def main() -> None:
        with Client(runs_server.url) as c:

            @c.on_run("stdout")
            def line(event: Event, ctx: Any) -> None:
                lines.append(event.data["line"])

            @c.on_run("end")
            def end(event: Event, ctx: Any) -> None:
                stop.set()

            run = c.create_run("count", {"n": 3})
            feed = c.follow_runs()
            first = next(iter(feed))
            feed.close()
            result["first"] = first
            result["run"] = run
            c.handle_runs(stop_event=stop)

    # In a thread: this loop serves the server meanwhile.
    await asyncio.wait_for(asyncio.to_thread(main), 60)
    assert lines == ["0", "1", "2"]
    assert result["first"].type == "created" and result["first"].data["id"] == result["run"]["id"]
