"""One pub/sub listener per process and Redis server, shared by wake-ups and cancel notices."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from runstream.backends.redis.log import RedisEventLog
from runstream.backends.redis.pubsub import RedisListener, Subscription, target
from runstream.backends.redis.runstore import RedisRunStore
from tests.conftest import RedisServer

pytestmark = pytest.mark.redis


@dataclass
class Subscriber:
    """Records what a subscription's handlers were told."""

    messages: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    readies: int = 0

    def on_ready(self) -> None:
        self.readies += 1
        self.ready.set()

    def subscribe(self, listener: RedisListener, channel: str) -> Subscription:
        return listener.subscribe(
            channel,
            on_message=self.messages.put_nowait,
            on_ready=self.on_ready,
            on_lost=self.lost.set,
        )


@pytest.fixture
async def admin(private_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    yield client
    await client.aclose()


async def pubsub_clients(admin: aioredis.Redis) -> int:
    return len(await admin.client_list(_type="pubsub"))


def listener_of(server: RedisServer) -> RedisListener:
    return RedisListener.shared(target(server.url), lambda: aioredis.Redis.from_url(server.url))


async def test_channels_of_one_server_share_one_connection(
    private_redis: RedisServer, admin: aioredis.Redis
) -> None:
    a, b = (f"t{uuid.uuid4().hex[:8]}" for _ in range(2))
    store = RedisRunStore.from_url(f"{private_redis.url}?prefix={a}")
    async with (
        RedisEventLog.from_url(f"{private_redis.url}?prefix={a}"),
        RedisEventLog.from_url(f"{private_redis.url}?prefix={b}"),
    ):
        # The event logs made the listener of this server; the run store's URL finds it.
        listener = RedisListener.shared(target(store.url), lambda: aioredis.Redis())
        cancels = Subscriber()
        sub = cancels.subscribe(listener, store.keys.cancel_channel)
        await asyncio.wait_for(cancels.ready.wait(), 5)
        assert await pubsub_clients(admin) == 1
        channels = [f"{a}:wake", f"{b}:wake", store.keys.cancel_channel]
        assert await admin.pubsub_numsub(*channels) == [(name, 1) for name in channels]
        await admin.publish(store.keys.cancel_channel, "run-1")
        assert await asyncio.wait_for(cancels.messages.get(), 5) == "run-1"
        await sub.aclose()
        assert await pubsub_clients(admin) == 1  # the event logs still listen
    assert await pubsub_clients(admin) == 0  # the last subscription closed it
    await store.aclose()


async def test_every_subscriber_of_a_channel_gets_its_messages(
    private_redis: RedisServer, admin: aioredis.Redis
) -> None:
    listener = listener_of(private_redis)
    first, second, other = Subscriber(), Subscriber(), Subscriber()
    subs = [first.subscribe(listener, "c"), other.subscribe(listener, "d")]
    await asyncio.wait_for(first.ready.wait(), 5)
    # A late subscriber of a subscribed channel is ready at once.
    subs.append(second.subscribe(listener, "c"))
    assert second.ready.is_set()
    await asyncio.wait_for(other.ready.wait(), 5)
    await admin.publish("c", "hello")
    await admin.publish("d", "there")
    assert await asyncio.wait_for(first.messages.get(), 5) == "hello"
    assert await asyncio.wait_for(second.messages.get(), 5) == "hello"
    assert await asyncio.wait_for(other.messages.get(), 5) == "there"
    assert first.messages.empty() and other.messages.empty()
    for sub in subs:
        await sub.aclose()


async def test_a_lost_connection_is_reported_then_every_channel_is_subscribed_again(
    private_redis: RedisServer, admin: aioredis.Redis
) -> None:
    listener = listener_of(private_redis)
    subscriber = Subscriber()
    sub = subscriber.subscribe(listener, "c")
    await asyncio.wait_for(subscriber.ready.wait(), 5)
    subscriber.ready.clear()
    await admin.client_kill_filter(_type="pubsub")
    await asyncio.wait_for(subscriber.lost.wait(), 10)
    # Back with the shared backoff; on_ready again, because notices sent meanwhile were lost.
    await asyncio.wait_for(subscriber.ready.wait(), 10)
    assert subscriber.readies == 2
    assert sub.ready
    await admin.publish("c", "after")
    assert await asyncio.wait_for(subscriber.messages.get(), 5) == "after"
    await sub.aclose()


async def test_a_stopped_listener_is_replaced_by_a_new_one(private_redis: RedisServer) -> None:
    listener = listener_of(private_redis)
    subscriber = Subscriber()
    sub = subscriber.subscribe(listener, "c")
    assert listener_of(private_redis) is listener
    await sub.aclose()
    await sub.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        listener.subscribe("c", on_message=print)
    fresh = listener_of(private_redis)
    assert fresh is not listener
    again = Subscriber()
    sub = again.subscribe(fresh, "c")
    await asyncio.wait_for(again.ready.wait(), 5)
    await sub.aclose()
