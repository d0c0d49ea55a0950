"""The batching publisher against a real server (and a fault proxy that loses answers);
the sync publisher's test is in test_sync.py (it needs a server on its own thread)."""

from __future__ import annotations

import asyncio

import pytest

from runstream.client import AsyncClient, RetryPolicy
from runstream.errors import StreamClosed, UsageError, ValidationError

from .conftest import LiveServer
from .faultproxy import Fault, FaultProxy


async def test_events_are_batched_in_order_and_flushed_on_close(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as client:
        async with client.publisher("tokens", linger=0.05, max_events=100) as pub:
            for i in range(250):
                await pub.publish("token", {"i": i})
        page = await client.read("tokens", limit=1000)
    assert [e.data for e in page.events] == [{"i": i} for i in range(250)]
    # 250 events in batches of at most 100: a few appends, not 250.
    assert 3 <= pub.batches <= 5
    assert pub.last_result is not None and pub.last_result.last_id == 250


async def test_a_lone_event_goes_out_after_the_linger(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as client:
        pub = client.publisher("lone", linger=0.01)
        await pub.publish("line", "hello")
        # Not flushed by us: the linger timer sends it.
        for _ in range(500):
            if pub.batches:
                break
            await asyncio.sleep(0.01)
        assert pub.batches == 1
        page = await client.read("lone")
        assert [e.data for e in page.events] == ["hello"]
        await pub.aclose()
        with pytest.raises(UsageError):
            await pub.publish("line", "late")


async def test_a_batch_whose_answer_was_lost_is_stored_once(
    live_server: LiveServer, proxy: FaultProxy
) -> None:
    calls = 0

    def plan(_head: bytes) -> Fault:
        # The first batch reaches the server; its answer never reaches the client.
        nonlocal calls
        calls += 1
        return Fault("truncate", at=0) if calls == 1 else Fault()

    proxy.plan = plan
    retry = RetryPolicy(base_delay=0.001, max_delay=0.01)
    async with AsyncClient(proxy.url, retry=retry) as client:
        async with client.publisher("exact", linger=10, max_events=10) as pub:
            for i in range(35):
                await pub.publish("n", i)
        page = await client.read("exact", limit=100)
    assert proxy.injected["truncate"] == 1
    assert [e.data for e in page.events] == list(range(35))  # none stored twice, none lost


async def test_a_failed_batch_fails_the_publisher(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as client:
        await client.publish("shut", "a", 1)
        await client.close_stream("shut")
        pub = client.publisher("shut", linger=0)
        await pub.publish("b", 2)
        with pytest.raises(StreamClosed):
            await pub.flush()
        with pytest.raises(StreamClosed):
            await pub.publish("c", 3)
        with pytest.raises(ValidationError):
            client.publisher("x", max_events=0)
