"""Distributed dispatch on Redis Streams: a queue of runs, workers, leases and a janitor.

Keys (``P`` = prefix; see also :mod:`runstream.backends.redis.runstore`)::

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
import logging
from dataclasses import dataclass, field

from runstream.backends.base import EventLog
from runstream.backends.engine import DispatchContext, WorkerSpec
from runstream.backends.redis.janitor import BackgroundJanitor, Janitor, settle_entry
from runstream.backends.redis.queue import (
    DEFAULT_LEASE,
    DEFAULT_MAX_DELIVERIES,
    GROUP,
    QueueStats,
    RedisRunQueue,
    default_worker_name,
)
from runstream.backends.redis.runstore import RedisRunStore
from runstream.backends.redis.worker import RedisWorker, WorkerOptions
from runstream.errors import ConfigError
from runstream.runs.store import RunStore
from runstream.runs.tasks import TaskRegistry

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_DELIVERIES",
    "GROUP",
    "BackgroundJanitor",
    "Janitor",
    "QueueStats",
    "RedisDispatch",
    "RedisRunQueue",
    "RedisWorker",
    "WorkerOptions",
    "default_worker_name",
    "new_worker",
    "settle_entry",
    "start_dispatch",
]

log = logging.getLogger("runstream.backends.redis")


def new_worker(
    store: RunStore, log_: EventLog, registry: TaskRegistry, spec: WorkerSpec
) -> RedisWorker:
    """A worker taking runs from the queue of ``store`` (``runstream worker``)."""
    options = WorkerOptions(
        concurrency=spec.concurrency,
        lease=DEFAULT_LEASE if spec.lease is None else spec.lease,
        shutdown_grace=spec.shutdown_grace,
        name=spec.name or default_worker_name(),
    )
    return RedisWorker(_redis_store(store), log_, registry, options=options, gates=spec.gates)


@dataclass(eq=False)
class RedisDispatch:
    """A server's side of the queue: new runs are queued; a janitor backstops dead workers.

    With ``workers`` in the context, the server also takes runs from the queue,
    as one ``runstream worker --concurrency N`` would.
    """

    dispatcher: RedisRunQueue
    janitor: BackgroundJanitor
    worker: RedisWorker | None = None
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def aclose(self) -> None:
        """Stop taking runs (running ones get their grace), then stop the janitor."""
        try:
            if self._task is not None:
                self._stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            await self.janitor.aclose()


async def start_dispatch(ctx: DispatchContext) -> RedisDispatch:
    """Start the server's side of the queue (see :class:`RedisDispatch`)."""
    store = _redis_store(ctx.store)
    # A backstop: reclaims runs of dead workers even when no worker is left alive.
    dispatch = RedisDispatch(
        RedisRunQueue(store), BackgroundJanitor(store, ctx.log, registry=ctx.registry)
    )
    if ctx.workers:
        dispatch.worker = RedisWorker(
            store,
            ctx.log,
            ctx.registry,
            options=WorkerOptions(concurrency=ctx.workers, shutdown_grace=ctx.shutdown_grace),
            gates=ctx.gates,
        )
        dispatch._task = asyncio.get_running_loop().create_task(
            dispatch.worker.run(dispatch._stop), name="runstream-serve-redis-worker"
        )
    else:
        log.info(
            "redis backend: this server queues runs; start `runstream worker` "
            "processes (or serve --workers N) to execute them"
        )
    return dispatch


def _redis_store(store: RunStore) -> RedisRunStore:
    if not isinstance(store, RedisRunStore):
        raise ConfigError(f"a redis backend needs the redis run store, not {store!r}")
    return store
