"""What is particular to RedisRunStore, against a real, private redis-server: keys and
prefixes, the cancel notice, reconnects, read-only replicas (the shared contract is
test_store_contract.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from runstream.backends.redis.runstore import RedisRunStore
from runstream.errors import (
    BackendUnavailable,
    ConfigError,
    RunNotFound,
)
from runstream.runs.model import RunRecord, new_run_id
from tests.conftest import RedisServer, free_port

pytestmark = pytest.mark.redis


def _url(server: RedisServer, prefix: str | None = None) -> str:
    return f"{server.url}?prefix={prefix or 't' + uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisRunStore]:
    s = RedisRunStore.from_url(_url(redis_server))
    await s.start()
    yield s
    await s.aclose()


def _record(task: str = "hello", created_at: float = 1_700_000_000.0, **kw: object) -> RunRecord:
    return RunRecord(
        id=new_run_id(),
        task=task,
        params={"name": "wörld", "n": 3, "nested": [1, None, {"x": 1.5}]},
        status="queued",
        created_at=created_at,
        **kw,  # type: ignore[arg-type]
    )


async def test_request_cancel_sets_the_flag_and_publishes_a_notice(
    store: RedisRunStore,
) -> None:
    record = await store.create(_record())
    listener = aioredis.Redis(connection_pool=store.redis.connection_pool)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(store.keys.cancel_channel)
    try:
        flagged = await store.request_cancel(record.id)
        assert flagged.cancel_requested and flagged.status == "queued"
        message = None
        async with asyncio.timeout(5):
            while message is None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        assert message["data"] == record.id
        again = await store.request_cancel(record.id)
        assert again == flagged
        assert (await store.fence_state(record.id)) == ("queued", None, 1, True)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_prefixes_keep_stores_apart(redis_server: RedisServer) -> None:
    one = RedisRunStore.from_url(_url(redis_server))
    two = RedisRunStore.from_url(_url(redis_server))
    try:
        record = await one.create(_record())
        with pytest.raises(RunNotFound):
            await two.get(record.id)
        assert (await two.list())[0] == []
    finally:
        await one.aclose()
        await two.aclose()


async def test_unreachable_redis_raises_backend_unavailable() -> None:
    store = RedisRunStore.from_url(f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=1")
    try:
        with pytest.raises(BackendUnavailable):
            await store.get("run-x")
    finally:
        await store.aclose()


async def test_pooled_connections_survive_a_redis_restart(private_redis: RedisServer) -> None:
    store = RedisRunStore.from_url(f"{private_redis.url}?prefix=restart")
    try:
        records = await asyncio.gather(*(store.create(_record()) for _ in range(4)))
        assert len(store.redis.connection_pool._available_connections) > 1
        # In a thread, so this loop sees the server close the pooled connections.
        await asyncio.to_thread(private_redis.restart)
        # Every idle connection is stale now; each must be replaced, not fail a command.
        again = await asyncio.gather(*(store.get(r.id) for r in records))
        assert again == records  # AOF (fsync always) kept them
        moved = await store.transition(records[0].id, "running", worker="w")
        assert moved.status == "running"
    finally:
        await store.aclose()


def test_cluster_urls_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="not supported yet"):
        RedisRunStore.from_url("redis://127.0.0.1:7000/0?cluster=1")


async def test_a_read_only_replica_surfaces_as_backend_unavailable(
    private_redis: RedisServer,
) -> None:
    # A primary demoted during a failover refuses writes (READONLY): callers retry elsewhere.
    store = RedisRunStore.from_url(f"{private_redis.url}?prefix=ro")
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        record = await store.create(_record())
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        with pytest.raises(BackendUnavailable, match="read-only"):
            await store.create(_record())
        with pytest.raises(BackendUnavailable, match="read-only"):
            await store.transition(record.id, "running", worker="w")
        with pytest.raises(BackendUnavailable, match="read-only"):
            await store.request_cancel(record.id)
        # Reads are still served, and nothing was half-written.
        assert await store.get(record.id) == record
        assert (await store.list())[0] == [record]
    finally:
        await admin.aclose()
        await store.aclose()
