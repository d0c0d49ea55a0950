"""Following a real server, directly and through the fault proxy."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from runstream.client._async import AsyncClient
from runstream.client.follow import FollowOptions
from runstream.client.metrics import Metrics
from runstream.client.policy import RetryPolicy
from runstream.core.model import Event, Reset

from .conftest import LiveServer
from .faultproxy import FaultProxy, random_plan


async def test_follow_reads_history_then_end(live_server: LiveServer, proxy: FaultProxy) -> None:
    async with AsyncClient(live_server.url) as producer, AsyncClient(proxy.url) as consumer:
        for i in range(20):
            await producer.publish("s1", "tick", {"n": i})
        await producer.close_stream("s1", status="succeeded")
        items = [item async for item in consumer.follow("s1")]
    assert [i.id for i in items if isinstance(i, Event)] == list(range(1, 22))
    assert items[-1].type == "end"


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_ten_thousand_events_through_random_faults_arrive_exactly_once_in_order(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    total = 10_000
    proxy.plan = random_plan(random.Random(20261123), fault_rate=1.0, max_at=30_000)
    options = FollowOptions(
        first_event=0.5,
        idle=0.5,
        poll_wait=0.5,
        poll_limit=100,
        retry=RetryPolicy(
            base_delay=0.002, max_delay=0.05, max_attempts=40, max_elapsed=60, probe_interval=0.3
        ),
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
