"""RedisRunStore against a real, private redis-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from runstream.errors import (
    BackendUnavailable,
    ConfigError,
    IllegalTransition,
    RunNotFound,
    ValidationError,
)
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.store_redis import RedisRunStore
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


async def test_create_then_get_round_trips_every_field(store: RedisRunStore) -> None:
    record = _record(timeout=12.5, extra={"k": "v"})
    assert await store.create(record) == record
    assert await store.get(record.id) == record


async def test_get_unknown_run_raises_run_not_found(store: RedisRunStore) -> None:
    with pytest.raises(RunNotFound):
        await store.get("run-nope")
    with pytest.raises(RunNotFound):
        await store.transition("run-nope", "running")
    with pytest.raises(RunNotFound):
        await store.request_cancel("run-nope")


async def test_creating_an_existing_id_is_refused(store: RedisRunStore) -> None:
    record = _record()
    await store.create(record)
    with pytest.raises(ValidationError) as info:
        await store.create(record)
    assert info.value.field == "id"


async def test_transition_sets_fields_and_follows_the_table(store: RedisRunStore) -> None:
    record = await store.create(_record())
    running = await store.transition(record.id, "running", worker="w1", started_at=1.25)
    assert (running.status, running.worker, running.started_at) == ("running", "w1", 1.25)
    done = await store.transition(record.id, "failed", exit_code=3, error="boom", finished_at=2.5)
    assert (done.status, done.exit_code, done.error, done.worker) == ("failed", 3, "boom", "w1")
    with pytest.raises(IllegalTransition, match="from 'failed' to 'running'"):
        await store.transition(record.id, "running")
    assert await store.get(record.id) == done


async def test_transition_can_clear_a_field_with_none(store: RedisRunStore) -> None:
    record = await store.create(_record())
    await store.transition(record.id, "running", worker="w1")
    await store.transition(record.id, "lost", error="worker vanished")
    requeued = await store.transition(record.id, "queued", worker=None, attempt=2, error=None)
    assert (requeued.worker, requeued.attempt, requeued.error) == (None, 2, None)


async def test_transition_refuses_a_status_outside_expect(store: RedisRunStore) -> None:
    record = await store.create(_record())
    with pytest.raises(IllegalTransition, match="expected one of"):
        await store.transition(record.id, "cancelled", expect=["running"])
    assert (await store.get(record.id)).status == "queued"
    moved = await store.transition(record.id, "cancelled", expect=["queued", "running"])
    assert moved.status == "cancelled"


async def test_match_fences_out_a_worker_that_lost_the_run(store: RedisRunStore) -> None:
    record = await store.create(_record())
    await store.transition(record.id, "running", worker="w1")
    await store.transition(record.id, "lost")
    await store.transition(record.id, "queued", attempt=2, worker=None)
    await store.transition(record.id, "running", worker="w2")
    with pytest.raises(IllegalTransition, match="worker"):
        await store.transition(
            record.id, "succeeded", match={"worker": "w1", "attempt": 1}, exit_code=0
        )
    current = await store.get(record.id)
    assert (current.status, current.worker, current.exit_code) == ("running", "w2", None)
    ok = await store.transition(record.id, "succeeded", match={"worker": "w2", "attempt": 2})
    assert ok.status == "succeeded"


async def test_transition_rejects_unknown_or_immutable_fields(store: RedisRunStore) -> None:
    record = await store.create(_record())
    with pytest.raises(ValidationError):
        await store.transition(record.id, "running", colour="red")
    with pytest.raises(ValidationError):
        await store.transition(record.id, "running", id="run-other")
    assert (await store.get(record.id)).status == "queued"


async def test_concurrent_starts_from_many_clients_let_exactly_one_win(
    redis_server: RedisServer,
) -> None:
    url = _url(redis_server)
    stores = [RedisRunStore.from_url(url) for _ in range(4)]
    try:
        record = await stores[0].create(_record())

        async def claim(i: int) -> str | None:
            try:
                await stores[i % 4].transition(
                    record.id, "running", expect=["queued"], worker=f"w{i}"
                )
            except IllegalTransition:
                return None
            return f"w{i}"

        winners = [w for w in await asyncio.gather(*(claim(i) for i in range(40))) if w]
        assert len(winners) == 1
        assert (await stores[0].get(record.id)).worker == winners[0]
    finally:
        for s in stores:
            await s.aclose()


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


async def test_list_pages_newest_first_with_filters(store: RedisRunStore) -> None:
    records = [
        await store.create(_record(task="a" if i % 2 else "b", created_at=1000.0 + i))
        for i in range(7)
    ]
    await store.transition(records[1].id, "running", worker="w")
    await store.transition(records[4].id, "cancelled")

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list(limit=3, cursor=cursor)
        seen.extend(r.id for r in page)
        if cursor is None:
            break
    assert seen == [r.id for r in reversed(records)]

    only_a, _ = await store.list(task="a")
    assert [r.id for r in only_a] == [records[i].id for i in (5, 3, 1)]
    running, _ = await store.list(status="running")
    assert [r.id for r in running] == [records[1].id]
    queued_b, _ = await store.list(status="queued", task="b", limit=2)
    assert [r.id for r in queued_b] == [records[6].id, records[2].id]


async def test_list_pages_through_runs_created_at_the_same_time(store: RedisRunStore) -> None:
    records = [await store.create(_record(created_at=5.0)) for _ in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page, cursor = await store.list(limit=2, cursor=cursor)
        seen.extend(r.id for r in page)
        if cursor is None:
            break
    assert sorted(seen) == sorted(r.id for r in records)
    assert len(seen) == len(set(seen)) == 5


async def test_list_rejects_a_malformed_cursor(store: RedisRunStore) -> None:
    with pytest.raises(ValidationError) as info:
        await store.list(cursor="garbage")
    assert info.value.field == "cursor"


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
