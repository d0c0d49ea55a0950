"""run_forever: handlers on a bounded worker pool, filters, per-key order, backpressure, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import defaultdict
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, generate_latest

from runstream.client._async import AsyncClient
from runstream.client.handlers import Context
from runstream.client.metrics import Metrics, export_prometheus
from runstream.core.model import Event, Reset

from .conftest import LiveServer
from .faultproxy import Fault, FaultProxy


async def fill(server: LiveServer, stream: str, events: Sequence[tuple[str, object]]) -> None:
    async with AsyncClient(server.url) as c:
        await c.publish_many(stream, events)
        await c.close_stream(stream, status="succeeded")


async def test_handlers_get_their_types_filters_apply_and_the_end_is_returned(
    live_server: LiveServer,
) -> None:
    await fill(
        live_server,
        "h1",
        [("stdout", {"line": "a"}), ("stderr", {"line": "b"}), ("status", {"status": "running"})]
        + [("stdout", {"line": f"x{i}"}) for i in range(3)],
    )
    got: dict[str, list[int]] = defaultdict(list)
    async with AsyncClient(live_server.url) as client:

        @client.on("stdout")
        async def out(ev: Event, ctx: Context) -> None:
            got["stdout"].append(ev.id)

        @client.on("status", where=lambda ev: ev.data["status"] == "running")
        async def running(ev: Event, ctx: Context) -> None:
            got["running"].append(ev.id)

        @client.on("status", where=lambda ev: ev.data["status"] == "failed")
        async def failed(ev: Event, ctx: Context) -> None:
            got["failed"].append(ev.id)

        @client.on()
        def everything(ev: Event, ctx: Context) -> None:  # a plain function: runs in a thread
            assert threading.current_thread() is not threading.main_thread()
            got["all"].append(ev.id)

        end = await client.run_forever("h1")
    assert end is not None and end.is_end and end.data["status"] == "succeeded"
    assert got["stdout"] == [1, 4, 5, 6]
    assert got["running"] == [3] and got["failed"] == []
    assert sorted(got["all"]) == list(range(1, 8))


async def test_handler_exceptions_are_counted_and_the_loop_goes_on(
    live_server: LiveServer,
) -> None:
    await fill(live_server, "h2", [("tick", i) for i in range(10)])
    handled = []
    metrics = Metrics()
    async with AsyncClient(live_server.url) as client:

        @client.on("tick")
        async def flaky(ev: Event, ctx: Context) -> None:
            if ev.data % 3 == 0:
                raise RuntimeError(f"boom {ev.data}")
            handled.append(ev.data)

        @client.on("tick", where=lambda ev: 1 / 0 > 0)
        async def never(ev: Event, ctx: Context) -> None:
            raise AssertionError("filter raised; must not run")

        await client.run_forever("h2", metrics=metrics)
    assert sorted(handled) == [1, 2, 4, 5, 7, 8]
    assert metrics.handler_exceptions == 4 + 10  # 4 handler raises, 10 filter raises
    assert metrics.handled == 10


async def test_events_with_the_same_key_are_handled_in_order_others_in_parallel(
    live_server: LiveServer,
) -> None:
    events = [("job", {"k": k, "n": n}) for n in range(8) for k in "abcd"]
    await fill(live_server, "h3", events)
    seen: dict[str, list[int]] = defaultdict(list)
    running = 0
    peak = 0
    rng = random.Random(3)
    overlapped = asyncio.Event()
    async with AsyncClient(live_server.url) as client:

        @client.on("job", key=lambda ev: ev.data["k"])
        async def work(ev: Event, ctx: Context) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running > 1:
                overlapped.set()
            # Hold the first handler until another key's handler runs beside it (bounded: a
            # pool that runs handlers one at a time would stay at peak 1 and fail below).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(overlapped.wait(), 1.0)
            await asyncio.sleep(rng.uniform(0, 0.02))
            seen[ev.data["k"]].append(ev.data["n"])
            running -= 1

        await client.run_forever("h3", concurrency=4)
    assert all(seen[k] == list(range(8)) for k in "abcd"), seen
    assert peak > 1


async def test_a_full_handler_queue_pauses_reading_without_tripping_idle(
    live_server: LiveServer,
) -> None:
    await fill(live_server, "h4", [("tick", i) for i in range(6)])
    metrics = Metrics()
    depths = []
    async with AsyncClient(live_server.url) as client:

        @client.on("tick")
        async def slow(ev: Event, ctx: Context) -> None:
            depths.append(ctx.queue_depth)
            await asyncio.sleep(0.2)

        await client.run_forever(
            "h4", concurrency=1, queue_size=2, buffer=1, idle=0.3, stale=0.3, metrics=metrics
        )
    assert metrics.watchdog_kills == {} and metrics.reconnect_count == 0
    assert max(depths) <= 2
    assert metrics.latency.count == 6 and metrics.latency.max >= 0.2


async def test_context_reports_reconnects_and_prometheus_export_works(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    await fill(live_server, "h5", [("tick", i) for i in range(200)])
    first = True

    def plan(_head: bytes) -> Fault:
        nonlocal first
        fault, first = (Fault("truncate", at=2000) if first else Fault()), False
        return fault

    proxy.plan = plan
    seen_reconnects = []
    metrics = Metrics()
    registry = CollectorRegistry()
    export_prometheus(metrics, registry, labels={"stream": "h5"})
    async with AsyncClient(proxy.url) as client:

        @client.on("tick")
        async def record(ev: Event, ctx: Context) -> None:
            seen_reconnects.append(ctx.reconnect_count)

        await client.run_forever("h5", metrics=metrics)
    assert seen_reconnects[0] == 0 and seen_reconnects[-1] == 1
    assert len(seen_reconnects) == 200
    text = generate_latest(registry).decode()
    assert 'runstream_client_events_total{stream="h5"} 201.0' in text
    assert 'runstream_client_reconnects_total{reason="network",stream="h5"} 1.0' in text
    assert "runstream_client_event_latency_seconds_count" in text
    assert 'runstream_client_last_id{stream="h5"} 201.0' in text


async def test_reset_handlers_receive_resets(live_server: LiveServer) -> None:
    await fill(live_server, "h6", [("tick", 1)])
    resets: list[Reset] = []
    async with AsyncClient(live_server.url) as client:

        @client.on_reset
        async def on_reset(reset: Reset, ctx: Context) -> None:
            resets.append(reset)

        await client.run_forever("h6", after="0123456789ab:5")
    assert len(resets) == 1 and resets[0].reason == "epoch_changed"
