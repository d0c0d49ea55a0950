"""Distributed dispatch on Redis Streams: a queue of runs, workers, leases and a janitor.

Keys (``P`` = prefix; see also :mod:`runstream.runs.store_redis`)::

    P:runq          stream, consumer group ``workers``; entry fields run=<id> attempt=<n>
    P:{id}:lease    string "<worker>" with a TTL of one lease; alive = the run is being run
    P:runs:stats    hash of cluster-wide counters: lost, retried, dead_lettered, reclaimed
    P:worker:{name} string "<host>:<pid>:<token>" with a TTL of one lease: the live worker
                    using this consumer name (names must be unique; see below)
    P:cancel        pub/sub: run ids whose cancellation was requested (wake-up only)

How a run travels:

1. The API server creates the record (``queued``) and :meth:`RedisRunQueue.enqueue`
   adds an entry. The group is created with ``XGROUP CREATE ... 0 MKSTREAM`` so
   nothing added before it existed is skipped.
2. A worker takes entries with ``XREADGROUP ... >`` (only as many as it has free
   slots), sets the lease (``SET ... NX PX``) and hands the run to
   :func:`~runstream.runs.executor.execute_run`, which moves it ``queued →
   running`` with a compare-and-set: of two workers holding entries for one
   run, exactly one runs it; its final transition is fenced on (worker, attempt).
3. While it runs, the worker's heartbeat (every ``lease/3``) renews the lease,
   resets the entry's idle time with ``XCLAIM <self> 0 ... JUSTID`` (which
   does not count as a delivery) and re-reads the run's state: the
   ``cancel_requested`` flag (the truth behind the pub/sub notice) and whether
   the run is still its own.
4. Only after the outcome is stored (record final, stream closed) does the
   worker ``XACK`` (and ``XDEL``) the entry. A crash in between leaves the entry
   pending; whoever reclaims it finds the run final and only acknowledges it.
5. The janitor (in every worker, optionally in ``serve``) ``XAUTOCLAIM``\\ s
   entries idle for longer than ``lease × JANITOR_IDLE_FACTOR``. A healthy
   run's entry never gets that old (its heartbeat resets the idle time), and
   the lease is checked as well: a live lease means "leave it alone". A run
   whose lease is gone is marked ``lost``; if its task allows retries and
   attempts are left, it is queued again (``attempt + 1``, a fresh entry),
   else its stream is closed with ``lost``. An entry delivered more than
   ``max_deliveries`` times is dead-lettered: ``lost``, no more retries.

Restarting a worker under the same ``--name`` first re-reads its own pending
entries from ``0`` and settles them the same way; a run it finds still marked
running by that name is known to be dead, without waiting for the lease. That
is only true if no other live process uses the name, so a worker holds its
name like a lease: a second one refuses to start (a dead holder on the same
host is replaced at once, elsewhere its claim expires after one lease).

Time to detect a dead worker: at most ``lease × JANITOR_IDLE_FACTOR`` after its
last heartbeat plus one janitor interval (``lease × JANITOR_INTERVAL_FACTOR``),
i.e. under ``1.5 × lease``. All timing is Redis server time (``PX`` and
stream idle times), so clocks of worker hosts do not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from runstream.backends.base import EventLog
from runstream.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    IllegalTransition,
    RunNotFound,
    RunstreamError,
    ValidationError,
)
from runstream.runs.executor import RunControl, execute_run
from runstream.runs.lifecycle import TERMINAL, Lifecycle
from runstream.runs.model import RunRecord
from runstream.runs.store_redis import (
    NO_MAINT_NOTIFICATIONS,
    RedisRunKeys,
    RedisRunStore,
    redis_errors_translated,
)
from runstream.runs.tasks import TaskRegistry

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_DELIVERIES",
    "BackgroundJanitor",
    "Janitor",
    "QueueStats",
    "RedisRunQueue",
    "RedisWorker",
    "WorkerOptions",
    "default_worker_name",
]

log = logging.getLogger(__name__)

GROUP = "workers"
DEFAULT_LEASE = 30.0
"""Seconds a worker's claim on a run survives without a heartbeat."""
HEARTBEAT_FACTOR = 1 / 3
"""Heartbeat every ``lease/3``: two heartbeats may be missed before the lease expires."""
JANITOR_IDLE_FACTOR = 1.2
"""XAUTOCLAIM min-idle = ``lease × 1.2``: above the lease, so a claimable entry's lease is gone."""
JANITOR_INTERVAL_FACTOR = 0.25
DEFAULT_MAX_DELIVERIES = 5
"""An entry delivered more often than this is dead-lettered (the run ends ``lost``)."""
READ_BLOCK_SECONDS = 0.5
"""How long one XREADGROUP waits; also bounds how late a stop request is noticed."""
CLAIM_BATCH = 50
DRAIN_MARGIN = 10.0
"""Seconds beyond the longest task grace that a stopping worker waits for cancelled runs."""
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
STATS_FIELDS = ("lost", "retried", "dead_lettered", "reclaimed")


_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_CLAIM_NAME = """
-- KEYS[1] name key. ARGV[1] our token, ARGV[2] ttl ms, ARGV[3] holder we may replace ('' = none).
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] or (ARGV[3] ~= '' and v == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ''
end
return v
"""


def _pid_gone(holder: str) -> bool:
    """Whether ``holder`` (``host:pid:token``) names a process on this host that has exited."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def default_worker_name() -> str:
    """``<host>-<pid>``: unique per process, so a restart starts with no pending entries."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _stats_key(keys: RedisRunKeys) -> str:
    return f"{keys.prefix}:runs:stats"


@dataclass(frozen=True, slots=True)
class QueueStats:
    """``waiting``: not yet delivered; ``pending``: delivered, not acknowledged (running)."""

    waiting: int
    pending: int
    counters: Mapping[str, int] = field(default_factory=dict)


class RedisRunQueue:
    """The producer side of the queue, used by API servers (``RunService``).

    Shares the store's connection pool; needs no start or close of its own.
    """

    def __init__(self, store: RedisRunStore) -> None:
        self.store = store
        self.keys = store.keys
        self._group_ready = False

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (idempotent)."""
        if self._group_ready:
            return
        await ensure_group(self.store.redis, self.keys)
        self._group_ready = True

    async def enqueue(self, run_id: str, attempt: int = 1) -> str:
        """Queue ``run_id`` (already stored as ``queued``); returns the entry id.

        Queueing the same run twice is harmless: the worker that moves it to
        ``running`` first runs it, the other entry is only acknowledged.
        """
        await self.ensure_group()
        with redis_errors_translated("enqueue run"):
            entry = await self.store.redis.xadd(
                self.keys.queue, {"run": run_id, "attempt": str(attempt)}
            )
        return str(entry)

    async def submit(self, record: RunRecord) -> None:
        """:class:`~runstream.runs.service.Dispatcher`: queue a newly created run."""
        await self.enqueue(record.id, record.attempt)

    async def cancel(self, record: RunRecord) -> None:
        """:class:`~runstream.runs.service.Dispatcher`: nothing to do here.

        ``RunStore.request_cancel`` already set the flag and published the
        notice that the worker running the run listens to.
        """
        return None

    async def stats(self) -> QueueStats:
        """Queue depth and the cluster-wide janitor counters (for ``/metrics``)."""
        redis = self.store.redis
        with redis_errors_translated("queue stats"):
            async with redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.keys.queue)
                pipe.xpending(self.keys.queue, GROUP)
                pipe.hgetall(_stats_key(self.keys))
                length, pending, counters = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception) or isinstance(counters, Exception):
            raise BackendError(f"redis failed during queue stats: {length or counters}")
        # No group yet means nothing was ever delivered.
        pending_count = 0 if isinstance(pending, Exception) else int(pending["pending"])
        return QueueStats(
            waiting=max(int(length) - pending_count, 0),
            pending=pending_count,
            counters={k: int(counters.get(k, 0)) for k in STATS_FIELDS},
        )


async def ensure_group(redis: aioredis.Redis, keys: RedisRunKeys) -> None:
    with redis_errors_translated("create consumer group"):
        try:
            await redis.xgroup_create(keys.queue, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Tuning of one worker process. ``lease`` is in seconds; see the module docstring."""

    name: str = field(default_factory=default_worker_name)
    concurrency: int = 4
    lease: float = DEFAULT_LEASE
    shutdown_grace: float = 30.0
    """On stop: how long running tasks may take to finish before they are cancelled."""
    janitor: bool = True
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValidationError("worker concurrency must be >= 1", field="concurrency")
        if self.lease < 0.1:
            raise ValidationError("lease must be at least 0.1 s", field="lease")
        if self.shutdown_grace < 0:
            raise ValidationError("shutdown grace must be >= 0", field="grace")
        if self.max_deliveries < 1:
            raise ValidationError("max_deliveries must be >= 1", field="max_deliveries")
        if not self.name or any(c.isspace() for c in self.name):
            raise ValidationError("worker name must be non-empty without spaces", field="name")

    @property
    def lease_ms(self) -> int:
        return max(round(self.lease * 1000), 100)


class Janitor:
    """Settles queue entries whose worker stopped heartbeating.

    Safe to run in any number of processes at once: ``XAUTOCLAIM`` hands each
    stale entry to one of them, and every status change is a compare-and-set.
    ``consumer`` is the group consumer name claimed entries move to (a
    worker's own name, so its restart re-reads them).
    """

    def __init__(
        self,
        store: RedisRunStore,
        log: EventLog,
        *,
        consumer: str,
        lease: float = DEFAULT_LEASE,
        registry: TaskRegistry | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        queue: RedisRunQueue | None = None,
    ) -> None:
        self.store = store
        self.log = log
        self.lifecycle = Lifecycle(store, log)
        self.keys = store.keys
        self.consumer = consumer
        self.lease = lease
        self.registry = registry
        self.max_deliveries = max_deliveries
        self.queue = queue or RedisRunQueue(store)
        self.min_idle_ms = round(lease * JANITOR_IDLE_FACTOR * 1000)
        self._release = store.redis.register_script(_RELEASE_LEASE)
        self.interval = lease * JANITOR_INTERVAL_FACTOR

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``lease/4`` until ``stop`` is set; Redis errors are logged and retried."""
        while not stop.is_set():
            try:
                await self.sweep()
            except RunstreamError as exc:
                log.warning("janitor sweep failed (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def sweep(self) -> int:
        """One pass over stale entries; returns how many entries it settled (acked)."""
        await self.queue.ensure_group()
        settled = 0
        start = "0-0"
        while True:
            with redis_errors_translated("janitor XAUTOCLAIM"):
                reply = await self.store.redis.xautoclaim(
                    self.keys.queue,
                    GROUP,
                    self.consumer,
                    self.min_idle_ms,
                    start_id=start,
                    count=CLAIM_BATCH,
                )
            start, claimed = str(reply[0]), cast(list[tuple[str, dict[str, str]]], reply[1])
            for entry_id, fields in claimed:
                deliveries = await self._deliveries(entry_id)
                await self._count("reclaimed")
                if await settle_entry(
                    self, entry_id, fields, deliveries=deliveries, owner_is_me=False
                ):
                    settled += 1
            if start in ("0-0", "0"):
                return settled

    async def _deliveries(self, entry_id: str) -> int:
        with redis_errors_translated("janitor XPENDING"):
            rows = await self.store.redis.xpending_range(
                self.keys.queue, GROUP, min=entry_id, max=entry_id, count=1
            )
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _count(self, name: str, n: int = 1) -> None:
        with contextlib.suppress(BackendError), redis_errors_translated("stats"):
            await self.store.redis.hincrby(_stats_key(self.keys), name, n)

    async def ack(self, entry_id: str) -> None:
        """Acknowledge and delete a settled entry (so the stream only holds live work).

        Both commands are idempotent, so a connection lost on the way is retried
        for up to one lease; if Redis stays away longer the entry remains pending
        and a janitor acknowledges it later (the run is already settled).
        """
        delay = RECONNECT_MIN
        deadline = time.monotonic() + self.lease
        while True:
            try:
                with redis_errors_translated("XACK"):
                    async with self.store.redis.pipeline(transaction=True) as pipe:
                        pipe.xack(self.keys.queue, GROUP, entry_id)
                        pipe.xdel(self.keys.queue, entry_id)
                        await pipe.execute()
                return
            except BackendUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)  # backoff while Redis is unreachable
            delay = min(delay * 2, RECONNECT_MAX)

    async def release_lease(self, run_id: str, holder: str) -> None:
        """Delete the run's lease if (and only if) ``holder`` holds it."""
        await self.release_lease_key(self.keys.lease(run_id), holder)

    async def release_lease_key(self, key: str, holder: str) -> None:
        with redis_errors_translated("release lease"):
            await self._release(keys=[key], args=[holder])

    async def lease_holder(self, run_id: str) -> str | None:
        with redis_errors_translated("read lease"):
            holder = await self.store.redis.get(self.keys.lease(run_id))
        return None if holder is None else str(holder)

    async def declare_lost(self, record: RunRecord, reason: str, *, dead_letter: bool) -> None:
        """``running → lost`` (fenced to the worker that had it), then retry or close."""
        try:
            lost = await self.lifecycle.advance(
                record.id,
                "running",
                "lost",
                match={"worker": record.worker, "attempt": record.attempt},
                error=reason,
                finished_at=time.time(),
            )
        except IllegalTransition:
            return  # it finished or moved on meanwhile: nothing is lost
        await self._count("lost")
        await self.resolve_lost(lost, dead_letter=dead_letter)

    async def resolve_lost(
        self, record: RunRecord, *, dead_letter: bool, announce: bool = False
    ) -> None:
        """A ``lost`` run: queue it again if its task allows, else close its stream as lost.

        The same rule (and the same status events) as the local pool, through
        :meth:`~runstream.runs.lifecycle.Lifecycle.settle_lost`; a dead-lettered
        run is never retried. ``announce``: see ``settle_lost``.
        """
        retries = 0
        if not dead_letter and self.registry is not None and record.task in self.registry:
            retries = self.registry.get(record.task).retries
        settled = await self.lifecycle.settle_lost(record, retries=retries, announce=announce)
        if settled.status == "queued" and settled.attempt == record.attempt + 1:
            await self.queue.enqueue(record.id, settled.attempt)
            await self._count("retried")
        elif dead_letter:
            await self._count("dead_lettered")


class BackgroundJanitor:
    """A :class:`Janitor` sweeping in a task of its own, for API servers (``runstream serve``).

    Every worker already runs one; a server's is a backstop for when no worker
    is left alive. Start it inside the running loop and ``await aclose()`` on
    shutdown. Its default lease (30 s) only makes it act later than workers
    with shorter leases, never earlier: a claim is also checked against the
    run's lease key, so a healthy run is left alone whatever the setting.
    """

    def __init__(
        self,
        store: RedisRunStore,
        log: EventLog,
        *,
        registry: TaskRegistry | None = None,
        lease: float = DEFAULT_LEASE,
        consumer: str | None = None,
    ) -> None:
        self.janitor = Janitor(
            store,
            log,
            consumer=consumer or f"janitor-{default_worker_name()}",
            lease=lease,
            registry=registry,
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self.janitor.run(self._stop), name="runstream-janitor"
        )

    async def aclose(self) -> None:
        """Stop sweeping (a sweep in progress finishes first). Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        await task


async def settle_entry(
    janitor: Janitor,
    entry_id: str,
    fields: Mapping[str, str],
    *,
    deliveries: int,
    owner_is_me: bool,
) -> bool:
    """Decide what a reclaimed (or own, re-read) entry means, act, and ack if settled.

    ``owner_is_me``: the entry was this worker's before a restart, so a run
    still marked running by this worker is known to be dead, lease or not.
    Returns True if the entry was acknowledged.
    """
    run_id = fields.get("run", "")
    try:
        record = await janitor.store.get(run_id)
    except RunNotFound:
        await janitor.ack(entry_id)
        return True
    dead_letter = deliveries > janitor.max_deliveries
    status = record.status
    if status == "running":
        mine = owner_is_me and record.worker == janitor.consumer
        if not mine and await janitor.lease_holder(run_id) is not None:
            # A live lease: the run is healthy, only its heartbeat was late. Its owner's
            # next heartbeat takes the entry back; a healthy run is never stolen.
            return False
        if mine:
            # Our previous incarnation's lease may still be alive; it would block the retry.
            await janitor.release_lease(run_id, janitor.consumer)
            why = f"worker {record.worker} restarted while running it"
        elif dead_letter:
            why = f"dead-lettered after {deliveries} deliveries"
        else:
            why = f"worker {record.worker} stopped (no heartbeat for {janitor.lease:g}s)"
        await janitor.declare_lost(record, why, dead_letter=dead_letter)
    elif status == "queued":
        if dead_letter:
            log.warning("run %s: queue entry delivered %d times; re-queued", run_id, deliveries)
        # Delivered but never started (its worker died first): put it back in line.
        await janitor.queue.enqueue(run_id, record.attempt)
    elif status == "lost":
        # A janitor died between marking it lost and re-queueing or closing it.
        await janitor.resolve_lost(record, dead_letter=dead_letter, announce=True)
    elif status in TERMINAL:
        # The outcome is stored but the ack was missed: make sure the stream is closed too.
        await janitor.lifecycle.close_finished(record)
    await janitor.ack(entry_id)
    return True


def _entries(reply: Any) -> list[tuple[str, dict[str, str] | None]]:
    """The entries of a one-stream XREADGROUP reply (RESP2 list or RESP3 map form)."""
    if not reply:
        return []
    per_stream = list(reply.values()) if isinstance(reply, dict) else [s[1] for s in reply]
    out: list[tuple[str, dict[str, str] | None]] = []
    for entries in per_stream:
        for entry_id, fields in entries:
            out.append((str(entry_id), cast(dict[str, str] | None, fields)))
    return out


@dataclass
class _Active:
    """A queue entry this worker holds (waiting for a task slot, or running)."""

    entry_id: str
    run_id: str
    attempt: int = 1
    running: bool = False
    waiting: bool = False
    """Waiting for its task's concurrency slot: does not occupy a worker slot."""
    control: RunControl = field(default_factory=RunControl)


class RedisWorker:
    """Takes runs from the queue and executes them, with leases, heartbeats and a janitor.

    Usage: ``await RedisWorker(...).run(stop)``; set ``stop`` (e.g. on SIGTERM)
    to stop taking work: running tasks get ``options.shutdown_grace`` seconds
    to finish, then they are cancelled; ``run`` returns when every held entry
    is settled. The caller owns ``store`` and ``log`` (start and close them).
    """

    def __init__(
        self,
        store: RedisRunStore,
        log: EventLog,
        registry: TaskRegistry,
        *,
        options: WorkerOptions | None = None,
    ) -> None:
        self.store = store
        self.log = log
        self.registry = registry
        self.options = options or WorkerOptions()
        self.name = self.options.name
        self.keys = store.keys
        self.queue = RedisRunQueue(store)
        self.janitor = Janitor(
            store,
            log,
            consumer=self.name,
            lease=self.options.lease,
            registry=registry,
            max_deliveries=self.options.max_deliveries,
            queue=self.queue,
        )
        self.active: dict[str, _Active] = {}
        self.ready = asyncio.Event()
        """Set once the worker has settled its own pending entries and listens for work."""
        self.completed = 0
        self._task_slots: dict[str, asyncio.Semaphore] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slots_changed = asyncio.Event()
        self._token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._claim_name_script = store.redis.register_script(_CLAIM_NAME)
        self._reader = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool(
                connection_class=store.redis.connection_pool.connection_class,
                max_connections=2,
                maint_notifications_config=NO_MAINT_NOTIFICATIONS,
                **{
                    **store.redis.connection_pool.connection_kwargs,
                    # A blocking XREADGROUP must not hit the socket timeout.
                    "socket_timeout": max(
                        READ_BLOCK_SECONDS * 3,
                        store.redis.connection_pool.connection_kwargs.get("socket_timeout") or 0,
                    ),
                },
            )
        )

    # -- main loop -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then shut down gracefully (see the class docstring).

        Redis being unreachable is waited out (with backoff) at any point, also
        at start. Raises :class:`ConfigError` if another live worker uses this name.
        """
        try:
            await self._retry_until(stop, lambda: self._claim_name(stop))
        except BaseException:
            await self._reader.aclose()
            await self._reader.connection_pool.aclose()
            raise
        if stop.is_set():
            await self._reader.aclose()
            await self._reader.connection_pool.aclose()
            return
        inner_stop = asyncio.Event()
        helpers = [
            asyncio.create_task(self._heartbeat(inner_stop), name="runstream-heartbeat"),
            asyncio.create_task(self._listen_cancels(inner_stop), name="runstream-cancels"),
        ]
        if self.options.janitor:
            helpers.append(asyncio.create_task(self.janitor.run(inner_stop), name="janitor"))
        try:
            await self._retry_until(stop, self._recover_own_pending)
            self.ready.set()
            await self._read_loop(stop)
            self._stopping.set()
            await self._drain()
        finally:
            inner_stop.set()
            # A sweep in progress is let finish (it may be between closing a lost run's
            # stream and acknowledging its entry); the other helpers just stop.
            if len(helpers) > 2:
                await asyncio.wait({helpers[2]}, timeout=self.options.lease)
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in list(self._handlers):
                task.cancel()
            await self._forget_self()
            with contextlib.suppress(BackendError):
                await self.janitor.release_lease_key(self._name_key, self._token)
            await self._reader.aclose()
            await self._reader.connection_pool.aclose()

    async def _read_loop(self, stop: asyncio.Event) -> None:
        delay = RECONNECT_MIN
        await self._retry_until(stop, self.queue.ensure_group)
        while not stop.is_set():
            # Cleared before counting, so a change made after the count wakes the wait.
            self._slots_changed.clear()
            # Runs waiting for their task's limit do not hold up runs of other tasks,
            # but at most ``concurrency`` of them are held, so a worker never hoards.
            busy = sum(1 for held in self.active.values() if not held.waiting)
            free = min(
                self.options.concurrency - busy,
                2 * self.options.concurrency - len(self.active),
            )
            if free <= 0:
                await self._wait_for_slot(stop)
                continue
            try:
                with redis_errors_translated("XREADGROUP"):
                    reply = await self._reader.xreadgroup(
                        GROUP,
                        self.name,
                        {self.keys.queue: ">"},
                        count=free,
                        block=round(READ_BLOCK_SECONDS * 1000),
                    )
            except BackendError as exc:
                if "NOGROUP" in str(exc):
                    self.queue._group_ready = False
                    await self._retry_until(stop, self.queue.ensure_group)
                    continue
                log.warning("worker %s: cannot read the queue (%s); retrying", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            for entry_id, fields in _entries(reply):
                self._spawn(entry_id, fields or {})

    async def _retry_until(self, stop: asyncio.Event, op: Callable[[], Awaitable[None]]) -> None:
        delay = RECONNECT_MIN
        while not stop.is_set():
            try:
                await op()
                return
            except BackendError as exc:
                log.warning("worker %s: redis not ready (%s); retrying", self.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _wait_for_slot(self, stop: asyncio.Event) -> None:
        """Until a held entry finishes or starts waiting for its task's slot, or ``stop``."""
        stopper = asyncio.create_task(stop.wait())
        changed = asyncio.create_task(self._slots_changed.wait())
        try:
            await asyncio.wait({stopper, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            changed.cancel()

    def _spawn(self, entry_id: str, fields: dict[str, str]) -> None:
        run_id = fields.get("run", "")
        try:
            attempt = int(fields.get("attempt", "1"))
        except ValueError:
            attempt = 1
        held = _Active(entry_id, run_id, attempt)
        self.active[entry_id] = held
        task = asyncio.create_task(self._handle(held), name=f"run-{run_id}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def cancel_all(self, reason: str) -> None:
        """Cancel every run this worker is executing now (e.g. on a second SIGTERM)."""
        for held in self.active.values():
            held.control.cancel(reason)

    async def _drain(self) -> None:
        """Stop: let running tasks finish within the grace period, then cancel them."""
        if not self._handlers:
            return
        log.info(
            "worker %s stopping: waiting up to %gs for %d run(s)",
            self.name,
            self.options.shutdown_grace,
            len(self._handlers),
        )
        _done, pending = await asyncio.wait(
            set(self._handlers), timeout=self.options.shutdown_grace
        )
        if pending:
            self.cancel_all(f"worker {self.name} shut down before the run finished")
            # Each child gets SIGTERM, then SIGKILL after its task's grace; then the
            # outcome is stored. Past that bound, cancel the handlers themselves (the
            # executor still records ``cancelled``, best effort).
            longest = max((t.grace for t in self.registry), default=0.0)
            _done, pending = await asyncio.wait(pending, timeout=longest + DRAIN_MARGIN)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- one entry -------------------------------------------------------------

    async def _handle(self, held: _Active) -> None:
        try:
            await self._handle_entry(held)
        except RunstreamError as exc:
            # The entry stays pending: the janitor (or our restart) settles it later.
            log.error("worker %s: run %s: %s", self.name, held.run_id, exc)
        except Exception:
            log.exception("worker %s: run %s failed unexpectedly", self.name, held.run_id)
        finally:
            self.active.pop(held.entry_id, None)
            self._slots_changed.set()

    async def _handle_entry(self, held: _Active) -> None:
        try:
            record = await self.store.get(held.run_id)
        except RunNotFound:
            await self.janitor.ack(held.entry_id)
            return
        if record.status != "queued":
            # A duplicate entry (the run was taken through another one), or a run that
            # was cancelled before it started: nothing to do here. (Not closing the
            # stream: its owner may be between storing the outcome and closing it.)
            await self.janitor.ack(held.entry_id)
            return
        limit = self.registry.get(record.task).concurrency if record.task in self.registry else None
        if limit is None:
            await self._claim_and_run(held, record)
            return
        slot = self._task_slots.get(record.task)
        if slot is None:
            slot = self._task_slots[record.task] = asyncio.Semaphore(limit)
        if not slot.locked():
            await slot.acquire()  # free: returns at once, no other handler runs in between
        else:
            held.waiting = True
            self._slots_changed.set()
            try:
                acquired = await self._acquire_unless_stopping(slot)
            finally:
                held.waiting = False
            if not acquired:
                await self._hand_back(held)
                return
        try:
            await self._claim_and_run(held, record)
        finally:
            slot.release()

    async def _acquire_unless_stopping(self, slot: asyncio.Semaphore) -> bool:
        acquire = asyncio.create_task(slot.acquire())
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if acquire.done() and not acquire.cancelled():
            return True
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
        if acquire.done() and not acquire.cancelled():
            slot.release()  # acquired in the same instant as the stop; give it back
        return False

    async def _hand_back(self, held: _Active) -> None:
        """Stopping before this run started: queue it again for another worker."""
        await self.queue.enqueue(held.run_id, held.attempt)
        await self.janitor.ack(held.entry_id)

    async def _claim_and_run(self, held: _Active, record: RunRecord) -> None:
        if self._stopping.is_set():
            await self._hand_back(held)
            return
        lease_key = self.keys.lease(record.id)
        with redis_errors_translated("take lease"):
            got = await self.store.redis.set(
                lease_key, self.name, nx=True, px=self.options.lease_ms
            )
        if not got:
            # Another worker holds this run right now (through another entry), or a
            # claimant died between taking the lease and starting. Leave the entry
            # pending: the janitor looks at it again once it is stale, and by then the
            # run is running (left alone), finished (acked) or queued (re-queued).
            return
        held.attempt = record.attempt
        held.running = True
        try:
            if record.task not in self.registry:
                final = await self._refuse_unknown_task(record)
            else:
                # The executor moves queued → running (compare-and-set) and fences its
                # final transition on (worker, attempt).
                final = await execute_run(
                    record,
                    self.registry.get(record.task),
                    self.log,
                    self.store,
                    worker=self.name,
                    control=held.control,
                )
        finally:
            held.running = False
        ours = final.worker == self.name and final.attempt == held.attempt
        if ours and final.status in TERMINAL:
            # Outcome stored (record final, stream closed): only now may the entry go.
            await self._ack_outcome(held)
            self.completed += 1
            log.info(
                "worker %s: run %s (%s, attempt %d) %s%s",
                self.name,
                final.id,
                final.task,
                final.attempt,
                final.status,
                f": {final.error}" if final.error else "",
            )
        elif not ours and final.attempt == held.attempt and final.status != "lost":
            # Never started by us: a duplicate entry, or cancelled before it started.
            await self.janitor.ack(held.entry_id)
        else:
            # Fenced out: declared lost while we ran it. The janitor that did so settles
            # the entry; acking here could strand a run whose re-queue is not done yet.
            log.warning(
                "worker %s: run %s attempt %d was taken over (now %s, attempt %d)",
                self.name,
                record.id,
                held.attempt,
                final.status,
                final.attempt,
            )
        await self._release_lease(record.id)

    async def _ack_outcome(self, held: _Active) -> None:
        await self.janitor.ack(held.entry_id)

    async def _refuse_unknown_task(self, record: RunRecord) -> RunRecord:
        """A run of a task this worker does not declare: fail it loudly (a config mismatch)."""
        lifecycle = self.janitor.lifecycle
        try:
            await lifecycle.advance(
                record.id, "queued", "running", worker=self.name, started_at=time.time()
            )
            # Strict: if the stream is not closed, the entry stays pending and the
            # janitor closes it when it settles the entry.
            return await lifecycle.advance(
                record.id,
                "running",
                "failed",
                match={"worker": self.name, "attempt": record.attempt},
                strict=True,
                error=f"task {record.task!r} is not declared on worker {self.name}",
                finished_at=time.time(),
            )
        except IllegalTransition:
            return await self.store.get(record.id)

    async def _release_lease(self, run_id: str) -> None:
        with contextlib.suppress(BackendError):
            await self.janitor.release_lease(run_id, self.name)

    # -- the worker's name -----------------------------------------------------------

    @property
    def _name_key(self) -> str:
        return f"{self.keys.prefix}:worker:{{{self.name}}}"

    async def _refresh_name(self, replace: str = "") -> str:
        """Hold the name for one more lease; returns "" or the other holder's token."""
        with redis_errors_translated("claim worker name"):
            holder = await self._claim_name_script(
                keys=[self._name_key], args=[self._token, self.options.lease_ms, replace]
            )
        return str(holder)

    async def _claim_name(self, stop: asyncio.Event) -> None:
        """Make sure no other live worker uses this name (restart recovery relies on it).

        A holder that is a dead process on this host is replaced at once; any
        other holder must let its claim expire (one lease) first. Raises
        :class:`ConfigError` if the name stays taken: names must be unique.
        """
        deadline = time.monotonic() + 2 * self.options.lease + 1
        while True:
            holder = await self._refresh_name()
            if not holder:
                return
            if _pid_gone(holder) and not await self._refresh_name(replace=holder):
                return
            if time.monotonic() > deadline or stop.is_set():
                raise ConfigError(
                    f"another worker named {self.name!r} is running ({holder}); "
                    "worker names must be unique"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.lease * HEARTBEAT_FACTOR)

    # -- restart recovery --------------------------------------------------------

    async def _recover_own_pending(self) -> None:
        """Settle entries delivered to this consumer name before a restart (read from ``0``)."""
        await self.queue.ensure_group()
        start = "0"
        while True:
            with redis_errors_translated("XREADGROUP own pending"):
                reply = await self._reader.xreadgroup(
                    GROUP, self.name, {self.keys.queue: start}, count=CLAIM_BATCH
                )
            entries = _entries(reply)
            if not entries:
                return
            for entry_id, fields in entries:
                if fields:
                    deliveries = await self.janitor._deliveries(entry_id)
                    await settle_entry(
                        self.janitor, entry_id, fields, deliveries=deliveries, owner_is_me=True
                    )
                else:  # deleted from the stream while pending: nothing left to do
                    await self.janitor.ack(entry_id)
                start = entry_id

    async def _forget_self(self) -> None:
        """On a clean stop, remove this consumer from the group if it holds nothing."""
        with contextlib.suppress(BackendError), redis_errors_translated("delete consumer"):
            rows = await self.store.redis.xpending_range(
                self.keys.queue, GROUP, min="-", max="+", count=1, consumername=self.name
            )
            if not rows:
                await self.store.redis.xgroup_delconsumer(self.keys.queue, GROUP, self.name)

    # -- heartbeat and cancellation ----------------------------------------------

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        interval = self.options.lease * HEARTBEAT_FACTOR
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                continue
            try:
                holder = await self._refresh_name()
                if holder:
                    log.error(
                        "worker %s: another process (%s) holds this worker name", self.name, holder
                    )
                held = list(self.active.values())
                if held:
                    await self._beat(held)
            except BackendError as exc:
                log.warning("worker %s: heartbeat failed (%s)", self.name, exc)

    async def _beat(self, held: list[_Active]) -> None:
        """Renew leases, keep entries fresh, and re-check each run's cancel flag and owner."""
        redis = self.store.redis
        state_at: list[int] = []
        with redis_errors_translated("heartbeat"):
            async with redis.pipeline(transaction=False) as pipe:
                for item in held:
                    if item.running:
                        pipe.set(self.keys.lease(item.run_id), self.name, px=self.options.lease_ms)
                    # Resets the entry's idle time without counting a delivery, and takes
                    # it back if a janitor claimed it while our heartbeat was late.
                    pipe.xclaim(self.keys.queue, GROUP, self.name, 0, [item.entry_id], justid=True)
                    state_at.append(len(pipe))
                    pipe.hmget(
                        self.keys.run(item.run_id),
                        ["status", "worker", "attempt", "cancel_requested"],
                    )
                results = await pipe.execute(raise_on_error=False)
        for item, index in zip(held, state_at, strict=True):
            state = results[index]
            if isinstance(state, list):
                self._apply_state(item, state)

    def _apply_state(self, item: _Active, state: list[str | None]) -> None:
        status, worker, attempt, cancel = state
        if cancel is not None and json.loads(cancel) is True:
            item.control.cancel()
        if not item.running:
            return
        same_attempt = attempt is not None and json.loads(attempt) == item.attempt
        mine = worker is not None and json.loads(worker) == self.name
        # "queued" with our attempt: the executor has not moved it to running yet.
        if same_attempt and (status == "queued" or (status == "running" and mine)):
            return
        log.warning(
            "worker %s: run %s is no longer ours (%s); stopping it", self.name, item.run_id, status
        )
        item.control.cancel(f"worker {self.name} lost its claim on the run")

    async def _listen_cancels(self, stop: asyncio.Event) -> None:
        """Turn cancel notices into cancellations, after checking the flag (the truth)."""
        delay = RECONNECT_MIN
        while not stop.is_set():
            pubsub = self._reader.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
                delay = RECONNECT_MIN
                # Notices sent while we were not subscribed are lost: re-check every flag.
                await self._check_flags(list(self.active.values()))
                while not stop.is_set():
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=READ_BLOCK_SECONDS
                    )
                    conn = pubsub.connection
                    if conn is None or not conn.is_connected:
                        # redis-py reports a closed link as "no message": reconnect.
                        raise redis_errors.ConnectionError("pub/sub connection closed")
                    if message is None or message.get("type") != "message":
                        continue
                    run_id = str(message["data"])
                    targets = [a for a in self.active.values() if a.run_id == run_id]
                    await self._check_flags(targets)
            except (redis_errors.RedisError, OSError, BackendError) as exc:
                log.warning("worker %s: cancel notices unavailable (%s)", self.name, exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _check_flags(self, held: list[_Active]) -> None:
        for item in held:
            _status, _worker, _attempt, cancel = await self.store.fence_state(item.run_id)
            if cancel:
                item.control.cancel()
