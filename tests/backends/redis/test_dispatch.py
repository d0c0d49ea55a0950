"""The Redis queue, workers, leases and janitor, in-process, against a real private Redis.

Worker *processes* (kill -9, signals, several API servers) are in tests/cli/test_worker.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from runstream.backends.redis.dispatch import (
    GROUP,
    BackgroundJanitor,
    Janitor,
    RedisRunQueue,
    RedisWorker,
    WorkerOptions,
)
from runstream.backends.redis.log import RedisEventLog
from runstream.backends.redis.runstore import RedisRunStore
from runstream.core.model import END_TYPE, Event, NewEvent
from runstream.errors import ConfigError
from runstream.runs.context import RunContext
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.tasks import TaskRegistry
from tests.conftest import RedisServer, free_port

pytestmark = pytest.mark.redis

LEASE = 0.5


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(url: str) -> AsyncIterator[RedisRunStore]:
    s = RedisRunStore.from_url(url)
    await s.start()
    yield s
    await s.aclose()


@pytest.fixture
async def log(url: str) -> AsyncIterator[RedisEventLog]:
    async with RedisEventLog.from_url(url) as backend:
        yield backend


@pytest.fixture
def queue(store: RedisRunStore) -> RedisRunQueue:
    return RedisRunQueue(store)


async def submit(
    store: RedisRunStore,
    log: RedisEventLog,
    queue: RedisRunQueue | None,
    task: str,
    params: dict[str, Any] | None = None,
) -> RunRecord:
    record = RunRecord(
        id=new_run_id(), task=task, params=params or {}, status="queued", created_at=time.time()
    )
    await store.create(record)
    await log.append(record.id, NewEvent("status", {"status": "queued", "attempt": 1}))
    if queue is not None:
        await queue.enqueue(record.id)
    return record


async def until_end(log: RedisEventLog, run_id: str, within: float = 20) -> list[Event]:
    """Every event of the run's stream, once it is closed (event-driven, bounded)."""
    out: list[Event] = []
    async with asyncio.timeout(within):
        async for item in log.follow(run_id):
            assert isinstance(item, Event)
            out.append(item)
    assert out and out[-1].type == END_TYPE
    return out


async def wait_until(condition: Callable[[], Awaitable[bool]], within: float = 10) -> None:
    """Poll Redis-side state (queue entries have no wake-up to await) until it holds."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def queue_empty(queue: RedisRunQueue) -> bool:
    stats = await queue.stats()
    return stats.waiting == 0 and stats.pending == 0


def statuses(events: list[Event]) -> list[tuple[str, int | None]]:
    return [(e.data["status"], e.data.get("attempt")) for e in events if e.type == "status"]


@asynccontextmanager
async def running_worker(
    store: RedisRunStore,
    log: RedisEventLog,
    registry: TaskRegistry,
    **options: Any,
) -> AsyncIterator[RedisWorker]:
    options.setdefault("lease", LEASE)
    options.setdefault("name", f"w-{uuid.uuid4().hex[:6]}")
    worker = RedisWorker(store, log, registry, options=WorkerOptions(**options))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(10):
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    try:
        yield worker
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


async def claim_as_ghost(
    store: RedisRunStore, record: RunRecord, ghost: str, *, start: bool = True
) -> str:
    """Deliver the run's entry to consumer ``ghost`` and (optionally) mark it running by it.

    This is exactly what a worker leaves behind when it is killed mid-run: a pending
    entry, a ``running`` record, and a lease that is not renewed.
    """
    redis = store.redis
    reply: Any = await redis.xreadgroup(GROUP, ghost, {store.keys.queue: ">"}, count=1)
    entry_id = str(reply[0][1][0][0])
    if start:
        await store.transition(
            record.id, "running", expect=["queued"], worker=ghost, started_at=time.time()
        )
    return entry_id


def python_registry(**tasks: Callable[[RunContext], Awaitable[Any]]) -> TaskRegistry:
    registry = TaskRegistry()
    for name, fn in tasks.items():
        registry.python(name, fn)
    return registry


async def test_queued_run_is_executed_and_acknowledged(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def greet(ctx: RunContext) -> str:
        return f"hello {ctx.params['name']}"

    async with running_worker(store, log, python_registry(greet=greet)) as worker:
        record = await submit(store, log, queue, "greet", {"name": "redis"})
        events = await until_end(log, record.id)
    assert [e.data for e in events if e.type == "result"] == ["hello redis"]
    assert statuses(events) == [("queued", 1), ("running", 1), ("succeeded", 1)]
    final = await store.get(record.id)
    assert (final.status, final.worker, final.attempt) == ("succeeded", worker.name, 1)
    stats = await queue.stats()
    assert (stats.waiting, stats.pending) == (0, 0)
    assert await store.redis.exists(store.keys.lease(record.id)) == 0


@pytest.mark.slow
async def test_two_workers_never_run_the_same_run(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    executions: list[str] = []

    async def record_me(ctx: RunContext) -> None:
        executions.append(ctx.run_id)
        await asyncio.sleep(0.01)  # overlap runs so both workers are busy at once

    registry = python_registry(record_me=record_me)
    async with (
        running_worker(store, log, registry, concurrency=3),
        running_worker(store, log, registry, concurrency=3),
    ):
        records = [await submit(store, log, queue, "record_me") for _ in range(20)]
        for record in records:
            await queue.enqueue(record.id)  # every run queued twice
        for record in records:
            await until_end(log, record.id)
        workers = {(await store.get(r.id)).worker for r in records}
        # Duplicate entries are settled without running anything; let them drain.
        await wait_until(lambda: queue_empty(queue))
    assert sorted(executions) == sorted(r.id for r in records)
    assert len(workers) == 2


@pytest.mark.slow
async def test_a_long_healthy_run_is_never_stolen(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def slow(ctx: RunContext) -> str:
        await asyncio.sleep(LEASE * 6)
        return "done"

    registry = python_registry(slow=slow)
    async with running_worker(store, log, registry, name="runner"):
        record = await submit(store, log, queue, "slow")
        # Only now start a second worker (whose janitor sweeps every lease/4): it must not
        # take the run over from the first, which is alive and heartbeating.
        async with running_worker(store, log, registry, name="thief"):
            events = await until_end(log, record.id)
    assert statuses(events) == [("queued", 1), ("running", 1), ("succeeded", 1)]
    final = await store.get(record.id)
    assert (final.worker, final.attempt, final.status) == ("runner", 1, "succeeded")
    assert (await queue.stats()).counters["lost"] == 0


async def test_a_dead_workers_run_is_declared_lost_and_its_stream_closed(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def never(ctx: RunContext) -> None:
        raise AssertionError("a lost run without retries must not run again")

    record = await submit(store, log, queue, "never")
    entry = await claim_as_ghost(store, record, "ghost")
    died = time.monotonic()
    async with running_worker(store, log, python_registry(never=never)):
        events = await until_end(log, record.id)
    detected = time.monotonic() - died
    final = await store.get(record.id)
    assert final.status == "lost" and final.worker == "ghost"
    assert "ghost" in (final.error or "")
    assert events[-1].data["status"] == "lost"
    assert statuses(events)[-1] == ("lost", 1)
    # Lease (0.5 s) + janitor idle margin + one sweep interval; generous for a busy machine.
    assert detected < LEASE * 2 + 2
    pending = await store.redis.xpending_range(
        store.keys.queue, GROUP, min=entry, max=entry, count=1
    )
    assert pending == []
    assert (await queue.stats()).counters["lost"] == 1


async def test_a_lost_run_is_retried_when_its_task_allows(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def flaky(ctx: RunContext) -> int:
        return ctx.attempt

    registry = TaskRegistry()
    registry.python("flaky", flaky, retries=1)
    record = await submit(store, log, queue, "flaky")
    await claim_as_ghost(store, record, "ghost")
    async with running_worker(store, log, registry) as worker:
        events = await until_end(log, record.id)
    assert statuses(events) == [
        ("queued", 1),
        ("lost", 1),
        ("queued", 2),
        ("running", 2),
        ("succeeded", 2),
    ]
    assert [e.data for e in events if e.type == "result"] == [2]
    final = await store.get(record.id)
    assert (final.status, final.attempt, final.worker) == ("succeeded", 2, worker.name)
    counters = (await queue.stats()).counters
    assert (counters["lost"], counters["retried"]) == (1, 1)


async def test_an_entry_delivered_too_often_is_dead_lettered(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def never(ctx: RunContext) -> None:
        raise AssertionError("dead-lettered runs are not retried")

    registry = TaskRegistry()
    registry.python("never", never, retries=5)
    record = await submit(store, log, queue, "never")
    entry = await claim_as_ghost(store, record, "ghost")
    # As if it had been reclaimed and crashed its claimers many times already.
    await store.redis.xclaim(store.keys.queue, GROUP, "ghost", 0, [entry], retrycount=9)
    async with running_worker(store, log, registry, max_deliveries=3):
        events = await until_end(log, record.id)
    assert events[-1].data["status"] == "lost"
    assert "dead-lettered" in ((await store.get(record.id)).error or "")
    counters = (await queue.stats()).counters
    assert (counters["dead_lettered"], counters["retried"]) == (1, 0)


async def test_restart_under_the_same_name_settles_its_own_pending_entries(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def again(ctx: RunContext) -> int:
        return ctx.attempt

    registry = TaskRegistry()
    registry.python("again", again, retries=1)
    record = await submit(store, log, queue, "again")
    await claim_as_ghost(store, record, "fixed-name")
    # The previous incarnation's lease is still alive: a restart knows better.
    await store.redis.set(store.keys.lease(record.id), "fixed-name", px=60_000)
    started = time.monotonic()
    async with running_worker(store, log, registry, name="fixed-name", lease=30):
        events = await until_end(log, record.id)
    assert time.monotonic() - started < 10  # not after the 30 s lease
    assert statuses(events)[-3:] == [("queued", 2), ("running", 2), ("succeeded", 2)]


async def test_an_outcome_stored_but_not_acknowledged_is_not_run_again(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def never(ctx: RunContext) -> None:
        raise AssertionError("the run already finished")

    record = await submit(store, log, queue, "never")
    entry = await claim_as_ghost(store, record, "ghost")
    await store.transition(record.id, "succeeded", exit_code=0, finished_at=time.time())
    await log.append(record.id, NewEvent("status", {"status": "succeeded", "attempt": 1}))
    await log.close(record.id, "succeeded")
    async with running_worker(store, log, python_registry(never=never)) as worker:

        async def acked() -> bool:
            rows = await store.redis.xpending_range(
                store.keys.queue, GROUP, min=entry, max=entry, count=1
            )
            return not rows

        await wait_until(acked)
        assert worker.completed == 0
    events = await until_end(log, record.id)
    assert [e.type for e in events].count(END_TYPE) == 1
    assert statuses(events) == [("queued", 1), ("succeeded", 1)]
    assert (await store.get(record.id)).status == "succeeded"


async def test_cancel_reaches_the_worker_running_the_run_within_a_second(
    url: str, store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    started = asyncio.Event()

    async def wait_for_cancel(ctx: RunContext) -> None:
        started.set()
        await ctx.cancelled.wait()

    async with running_worker(store, log, python_registry(wait=wait_for_cancel)):
        record = await submit(store, log, queue, "wait")
        async with asyncio.timeout(10):
            await started.wait()
        other_server = RedisRunStore.from_url(url)  # as if on another API server
        try:
            asked = time.monotonic()
            await other_server.request_cancel(record.id)
            events = await until_end(log, record.id)
            took = time.monotonic() - asked
        finally:
            await other_server.aclose()
    assert events[-1].data["status"] == "cancelled"
    assert (await store.get(record.id)).status == "cancelled"
    assert took < 2.0  # target: well under a second (pub/sub wake-up); generous here


async def test_stopping_lets_running_runs_finish_within_the_grace(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    started = asyncio.Event()

    async def short(ctx: RunContext) -> str:
        started.set()
        await asyncio.sleep(0.5)
        return "finished"

    registry = python_registry(short=short)
    worker = RedisWorker(
        store, log, registry, options=WorkerOptions(lease=LEASE, shutdown_grace=10)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    record = await submit(store, log, queue, "short")
    async with asyncio.timeout(10):
        await started.wait()
    stop.set()
    async with asyncio.timeout(10):
        await task
    assert (await store.get(record.id)).status == "succeeded"
    assert (await queue.stats()).pending == 0
    # A second run queued after the stop waits for another worker.
    later = await submit(store, log, queue, "short")
    assert (await store.get(later.id)).status == "queued"


async def test_stopping_cancels_runs_that_outlive_the_grace(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    started = asyncio.Event()

    async def stubborn(ctx: RunContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    registry = TaskRegistry()
    registry.python("stubborn", stubborn, grace=0.2)
    worker = RedisWorker(
        store, log, registry, options=WorkerOptions(lease=LEASE, shutdown_grace=0.3)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    record = await submit(store, log, queue, "stubborn")
    async with asyncio.timeout(10):
        await started.wait()
    stop.set()
    async with asyncio.timeout(10):
        await task
    final = await store.get(record.id)
    assert final.status == "cancelled"
    assert "shut down" in (final.error or "")
    assert (await queue.stats()).pending == 0
    events = await until_end(log, record.id)
    assert events[-1].data["status"] == "cancelled"


async def test_a_run_of_an_undeclared_task_fails_with_a_clear_error(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async with running_worker(store, log, TaskRegistry()) as worker:
        record = await submit(store, log, queue, "nowhere")
        events = await until_end(log, record.id)
    final = await store.get(record.id)
    assert final.status == "failed"
    assert final.error == f"task 'nowhere' is not declared on worker {worker.name}"
    assert events[-1].data["status"] == "failed"


async def test_a_run_cancelled_while_queued_is_skipped(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    async def never(ctx: RunContext) -> None:
        raise AssertionError("cancelled before it started")

    record = await submit(store, log, queue, "never")
    await store.transition(record.id, "cancelled", expect=["queued"])
    async with running_worker(store, log, python_registry(never=never)) as worker:
        await wait_until(lambda: queue_empty(queue))
        assert worker.completed == 0
    assert (await store.get(record.id)).status == "cancelled"


async def test_an_ack_waits_out_a_failover_instead_of_giving_up(
    private_redis: RedisServer,
) -> None:
    url = f"{private_redis.url}?prefix=t{uuid.uuid4().hex[:8]}"
    store = RedisRunStore.from_url(url)
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        async with RedisEventLog.from_url(url) as log:
            entry = await RedisRunQueue(store).enqueue("run-x")
            await store.redis.xreadgroup(GROUP, "w", {store.keys.queue: ">"}, count=1)
            janitor = Janitor(store, log, consumer="w", lease=10)
            # The primary is demoted (READONLY) while the worker acknowledges its entry.
            await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            ack = asyncio.create_task(janitor.ack(entry))
            await asyncio.sleep(0.5)  # time for several refused attempts; nothing to await
            assert not ack.done()
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await asyncio.wait_for(ack, 10)
            assert (await store.redis.xpending(store.keys.queue, GROUP))["pending"] == 0
    finally:
        await admin.aclose()
        await store.aclose()


async def test_janitor_alone_settles_stale_entries(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    """The janitor as ``serve`` runs it, without a worker: one sweep after the lease."""
    finished = await submit(store, log, queue, "t")
    await claim_as_ghost(store, finished, "ghost")
    await store.transition(finished.id, "failed", error="x", finished_at=time.time())
    waiting = await submit(store, log, queue, "t")
    await claim_as_ghost(store, waiting, "ghost", start=False)
    alive = await submit(store, log, queue, "t")
    await claim_as_ghost(store, alive, "ghost")
    await store.redis.set(store.keys.lease(alive.id), "ghost", px=60_000)
    patient = Janitor(store, log, consumer="janitor", lease=10)
    assert await patient.sweep() == 0  # nothing has been idle for 1.2 leases yet
    janitor = Janitor(store, log, consumer="janitor", lease=0.2)
    await asyncio.sleep(0.3)  # let the entries age past lease × 1.2 (Redis idle time)
    assert await janitor.sweep() == 2
    assert (await store.get(finished.id)).status == "failed"
    assert (await log.info(finished.id)).closed  # the missed close is made up for
    assert (await store.get(waiting.id)).status == "queued"
    assert (await queue.stats()).waiting == 1  # put back in line
    assert (await store.get(alive.id)).status == "running"  # live lease: left alone


@pytest.mark.slow
async def test_a_tasks_concurrency_limit_holds_on_one_worker(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    running = 0
    most = 0

    async def single(ctx: RunContext) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.8)
        running -= 1

    async def other(ctx: RunContext) -> str:
        return "not held up"

    registry = TaskRegistry()
    registry.python("single", single, concurrency=1)
    registry.python("other", other)
    singles = [await submit(store, log, queue, "single") for _ in range(2)]
    quick = await submit(store, log, queue, "other")
    async with running_worker(store, log, registry, concurrency=2):
        quick_events = await until_end(log, quick.id)
        for record in singles:
            await until_end(log, record.id)
    assert most == 1
    assert [e.data for e in quick_events if e.type == "result"] == ["not held up"]
    # Queued behind two runs of a task limited to one at a time, on a worker with two
    # slots: the quick run still finished before the first of them.
    first_done = min([(await store.get(r.id)).finished_at or 0.0 for r in singles])
    assert quick_events[-1].time < first_done


@pytest.mark.slow
async def test_a_worker_carries_on_after_redis_restarts(private_redis: RedisServer) -> None:
    url = f"{private_redis.url}?prefix=restart"
    store = RedisRunStore.from_url(url)

    async def hello(ctx: RunContext) -> str:
        return "hi"

    try:
        async with RedisEventLog.from_url(url) as log:
            queue = RedisRunQueue(store)
            async with running_worker(store, log, python_registry(hello=hello)):
                before = await submit(store, log, queue, "hello")
                await until_end(log, before.id)
                # In a thread, so this loop sees the old connections close meanwhile
                # (as it would in production, where nothing blocks the loop).
                await asyncio.to_thread(private_redis.restart)
                after = await submit(store, log, queue, "hello")
                events = await until_end(log, after.id)
            assert events[-1].data["status"] == "succeeded"
            assert (await store.get(before.id)).status == "succeeded"
    finally:
        await store.aclose()


async def test_a_worker_presumed_dead_cannot_overwrite_the_next_attempt(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    """A network partition: A's heartbeats stop, B takes over; A comes back and must yield."""
    first_started = asyncio.Event()
    first_stopped = asyncio.Event()

    async def work(ctx: RunContext) -> str:
        if ctx.attempt == 1:
            first_started.set()
            try:
                await ctx.cancelled.wait()
            finally:
                first_stopped.set()
            return "attempt 1 must not be recorded"
        return "attempt 2"

    registry = TaskRegistry()
    registry.python("work", work, retries=1)
    async with running_worker(store, log, registry, name="a", janitor=False, concurrency=1) as a:
        partitioned = True
        real_beat = a._beat

        async def beat_unless_partitioned(held: Any) -> None:
            if not partitioned:
                await real_beat(held)

        a._beat = beat_unless_partitioned  # type: ignore[method-assign]
        record = await submit(store, log, queue, "work")
        async with asyncio.timeout(10):
            await first_started.wait()
        async with running_worker(store, log, registry, name="b"):
            events = await until_end(log, record.id)
            partitioned = False  # A's link is back: its next heartbeat sees the truth
            async with asyncio.timeout(10):
                await first_stopped.wait()
    final = await store.get(record.id)
    assert (final.status, final.attempt, final.worker) == ("succeeded", 2, "b")
    assert [e.data for e in events if e.type == "result"] == ["attempt 2"]
    assert [e.type for e in events].count(END_TYPE) == 1
    assert (await queue.stats()).pending == 0


async def test_a_second_live_worker_with_the_same_name_refuses_to_start(
    store: RedisRunStore, log: RedisEventLog
) -> None:
    async with running_worker(store, log, TaskRegistry(), name="unique", lease=2):
        # The twin gives up after two of its own (short) leases.
        twin = RedisWorker(
            store, log, TaskRegistry(), options=WorkerOptions(name="unique", lease=0.1)
        )
        with pytest.raises(ConfigError, match="another worker named 'unique'"):
            await twin.run(asyncio.Event())
    # Once the first one stopped (and released the name), the name is free again.
    async with running_worker(store, log, TaskRegistry(), name="unique", lease=2):
        pass


async def test_a_background_janitor_settles_a_dead_workers_run_without_any_worker(
    store: RedisRunStore, log: RedisEventLog, queue: RedisRunQueue
) -> None:
    """What an API server runs as a backstop when no worker is left alive."""
    record = await submit(store, log, queue, "t")
    await claim_as_ghost(store, record, "ghost")
    janitor = BackgroundJanitor(store, log, lease=0.3)
    try:
        events = await until_end(log, record.id)
    finally:
        await janitor.aclose()
        await janitor.aclose()  # idempotent
    assert events[-1].data["status"] == "lost"
    assert (await queue.stats()).pending == 0
