"""Following a real server, directly and through the fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections.abc import Callable

import pytest

from runstream.client._async import AsyncClient
from runstream.client.follow import FollowOptions
from runstream.client.metrics import Metrics
from runstream.client.policy import RetryPolicy
from runstream.core.model import Event, Reset

from .conftest import LiveServer
from .faultproxy import Fault, FaultProxy, random_plan


async def test_follow_reads_history_then_end(live_server: LiveServer, proxy: FaultProxy) -> None:
    async with AsyncClient(live_server.url) as producer, AsyncClient(proxy.url) as consumer:
        for i in range(20):
            await producer.publish("s1", "tick", {"n": i})
        await producer.close_stream("s1", status="succeeded")
        items = [item async for item in consumer.follow("s1")]
    assert [i.id for i in items if isinstance(i, Event)] == list(range(1, 22))
    assert isinstance(items[-1], Event) and items[-1].is_end


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["auto", "sse", "ws", "poll"])
async def test_ten_thousand_events_through_random_faults_arrive_exactly_once_in_order(
    live_server: LiveServer, proxy: FaultProxy, transport: str
) -> None:
    total = 10_000
    seed = int(os.environ.get("RUNSTREAM_CHAOS_SEED", "20261123"))
    # Stalls cost a watchdog period each; the cheaper faults come more often.
    weights = (
        3,
        3,
        1,
        1,
        2,
        2,
        3,
    )  # reset truncate stall_first stall accept_close garbage fragment
    proxy.plan = random_plan(random.Random(seed), fault_rate=1.0, weights=weights, max_at=15_000)
    options = FollowOptions(
        first_event=0.5,
        idle=0.5,
        poll_wait=0.5,
        poll_limit=100,
        retry=RetryPolicy(
            base_delay=0.002, max_delay=0.05, max_attempts=40, max_elapsed=60, probe_interval=0.3
        ),
        transport=transport,  # type: ignore[arg-type]
    )

    async def produce(client: AsyncClient) -> None:
        for start in range(0, total, 100):
            await client.publish_many(
                "chaos", [("tick", {"n": n}) for n in range(start, start + 100)]
            )
        await client.close_stream("chaos", status="succeeded")

    async with AsyncClient(live_server.url) as producer, AsyncClient(proxy.url) as consumer:
        metrics = Metrics()
        follower = consumer.follow("chaos", options=options, metrics=metrics)
        producing = asyncio.create_task(produce(producer))
        items = [item async for item in follower]
        await producing
    events = [i for i in items if isinstance(i, Event)]
    ids = [e.id for e in events]
    assert not [i for i in items if isinstance(i, Reset)]
    assert ids == list(range(1, total + 2)), "lost or duplicated ids"
    assert [e.data["n"] for e in events[:-1]] == list(range(total))
    assert events[-1].is_end and events[-1].data["status"] == "succeeded"
    lost = total + 1 - len(set(ids))
    dup = len(ids) - len(set(ids))
    report = {
        "transport": transport,
        "events": len(events),
        "faults_injected": dict(proxy.injected),
        "faults_total": proxy.faults_injected,
        "connections": proxy.connections,
        "lost": lost,
        "duplicated": dup,
        "reconnects": metrics.reconnect_count,
        "reconnects_by_reason": dict(metrics.reconnects),
        "watchdog_kills": dict(metrics.watchdog_kills),
        "malformed_skipped": metrics.malformed,
        "duplicates_dropped": metrics.duplicates_dropped,
    }
    print("CHAOS", json.dumps(report, sort_keys=True))
    assert proxy.faults_injected >= 20 and metrics.reconnect_count >= 20


# -- watchdogs on a real connection ---------------------------------------------------


def only_first(fault: Fault) -> Callable[[bytes], Fault]:
    """A plan that breaks the first connection only."""
    count = 0

    def plan(_request: bytes) -> Fault:
        nonlocal count
        count += 1
        return fault if count == 1 else Fault()

    return plan


async def closed_stream(server: LiveServer, name: str, n: int) -> None:
    async with AsyncClient(server.url) as client:
        await client.publish_many(name, [("tick", {"n": i}) for i in range(n)])
        await client.close_stream(name, status="succeeded")


def within(took: float, setting: float) -> bool:
    # ±20 %, plus a little scheduling slack on a loaded machine.
    return setting * 0.8 <= took <= setting * 1.2 + 0.05


async def test_first_event_watchdog_trips_at_its_setting_and_resumes(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    await closed_stream(live_server, "ttfb", 5)
    proxy.plan = only_first(Fault("stall_first"))
    metrics = Metrics()
    async with AsyncClient(proxy.url) as client:
        items = [i async for i in client.follow("ttfb", first_event=0.6, idle=5, metrics=metrics)]
    assert [i.id for i in items if isinstance(i, Event)] == list(range(1, 7))
    stalled = proxy.log[0]
    assert stalled.client_closed is not None
    took = stalled.client_closed - stalled.accepted
    assert within(took, 0.6), took
    assert metrics.watchdog_kills == {"first_event": 1}
    assert metrics.reconnects == {"first_event": 1}


async def test_idle_watchdog_trips_at_its_setting_after_bytes_stop(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    await closed_stream(live_server, "idle", 50)
    proxy.plan = only_first(Fault("stall", at=400))
    metrics = Metrics()
    async with AsyncClient(proxy.url) as client:
        follower = client.follow("idle", first_event=5, idle=0.6, metrics=metrics)
        items = [i async for i in follower]
    assert [i.id for i in items if isinstance(i, Event)] == list(range(1, 52))
    stalled = proxy.log[0]
    assert stalled.client_closed is not None and stalled.last_forward
    took = stalled.client_closed - stalled.last_forward
    assert within(took, 0.6), took
    assert metrics.watchdog_kills == {"idle": 1}


async def test_stale_watchdog_trips_when_only_keepalives_arrive(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    async with AsyncClient(live_server.url) as producer:
        await producer.publish("quiet", "hello", None)
    metrics = Metrics()
    async with AsyncClient(proxy.url) as client:
        follower = client.follow("quiet", after=1, idle=0.3, stale=0.6, metrics=metrics)
        consuming = asyncio.create_task(anext(follower))
        await proxy.wait_for(lambda: len(proxy.log) >= 2)
        await follower.aclose()
        consuming.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await consuming
    first = proxy.log[0]
    assert first.client_closed is not None
    assert within(first.client_closed - first.accepted, 0.6)
    # Keepalives every 0.1 s kept the idle timer (0.3 s) from ever firing.
    assert metrics.watchdog_kills == {"stale": 1}


async def test_healthy_slow_stream_with_keepalives_never_trips(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    async def produce() -> None:
        async with AsyncClient(live_server.url) as producer:
            for i in range(6):
                await producer.publish("slow", "tick", {"n": i})
                await asyncio.sleep(0.3)
            await producer.close_stream("slow")

    metrics = Metrics()
    async with AsyncClient(proxy.url) as client:
        producing = asyncio.create_task(produce())
        follower = client.follow("slow", first_event=0.5, idle=0.25, stale=0.45, metrics=metrics)
        items = [i async for i in follower]
        await producing
    assert [i.id for i in items if isinstance(i, Event)] == list(range(1, 8))
    assert metrics.watchdog_kills == {} and metrics.reconnect_count == 0
    assert proxy.connections == 1


async def test_a_slow_consumer_pauses_reading_without_tripping_idle(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    await closed_stream(live_server, "backpressure", 4)
    metrics = Metrics()
    got = []
    async with AsyncClient(proxy.url) as client:
        follower = client.follow("backpressure", idle=0.3, stale=0.3, buffer=1, metrics=metrics)
        async for item in follower:
            got.append(item)
            await asyncio.sleep(0.5)  # the consumer is slower than both timers
    assert [i.id for i in got if isinstance(i, Event)] == list(range(1, 6))
    assert metrics.watchdog_kills == {} and proxy.connections == 1
