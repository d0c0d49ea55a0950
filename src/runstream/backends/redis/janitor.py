"""The janitor: settles queue entries whose worker stopped heartbeating.

See :mod:`runstream.backends.redis.dispatch` for how a run travels.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import cast

from runstream.backends.base import EventLog
from runstream.backends.redis.errors import translated
from runstream.backends.redis.queue import (
    CLAIM_BATCH,
    DEFAULT_LEASE,
    DEFAULT_MAX_DELIVERIES,
    GROUP,
    RedisRunQueue,
    default_worker_name,
    stats_key,
)
from runstream.backends.redis.runstore import (
    RedisRunStore,
)
from runstream.core.backoff import RECONNECT, BackoffState, GiveUp
from runstream.errors import (
    BackendError,
    BackendUnavailable,
    IllegalTransition,
    RunNotFound,
    RunstreamError,
)
from runstream.runs.lifecycle import TERMINAL, Lifecycle
from runstream.runs.model import RunRecord
from runstream.runs.tasks import TaskRegistry

__all__ = ["BackgroundJanitor", "Janitor", "settle_entry"]

log = logging.getLogger("runstream.backends.redis")

JANITOR_IDLE_FACTOR = 1.2
"""XAUTOCLAIM min-idle = ``lease × 1.2``: above the lease, so a claimable entry's lease is gone."""
JANITOR_INTERVAL_FACTOR = 0.25


_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
            with translated("janitor XAUTOCLAIM"):
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
                deliveries = await self.deliveries(entry_id)
                await self._count("reclaimed")
                if await settle_entry(
                    self, entry_id, fields, deliveries=deliveries, owner_is_me=False
                ):
                    settled += 1
            if start in ("0-0", "0"):
                return settled

    async def deliveries(self, entry_id: str) -> int:
        """How many times the entry was delivered (its dead-letter signal)."""
        with translated("janitor XPENDING"):
            rows = await self.store.redis.xpending_range(
                self.keys.queue, GROUP, min=entry_id, max=entry_id, count=1
            )
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _count(self, name: str, n: int = 1) -> None:
        with contextlib.suppress(BackendError), translated("stats"):
            await self.store.redis.hincrby(stats_key(self.keys), name, n)

    async def ack(self, entry_id: str) -> None:
        """Acknowledge and delete a settled entry (so the stream only holds live work).

        Both commands are idempotent, so a connection lost on the way is retried
        for up to one lease; if Redis stays away longer the entry remains pending
        and a janitor acknowledges it later (the run is already settled).
        """
        backoff = BackoffState(dataclasses.replace(RECONNECT, max_elapsed=self.lease))
        while True:
            try:
                with translated("XACK"):
                    async with self.store.redis.pipeline(transaction=True) as pipe:
                        pipe.xack(self.keys.queue, GROUP, entry_id)
                        pipe.xdel(self.keys.queue, entry_id)
                        await pipe.execute()
                return
            except BackendUnavailable as exc:
                decision = backoff.on_failure(str(exc), time.monotonic())
                if isinstance(decision, GiveUp):
                    raise
            await asyncio.sleep(decision.delay)  # backoff while Redis is unreachable

    async def release_lease(self, run_id: str, holder: str) -> None:
        """Delete the run's lease if (and only if) ``holder`` holds it."""
        await self.release_lease_key(self.keys.lease(run_id), holder)

    async def release_lease_key(self, key: str, holder: str) -> None:
        with translated("release lease"):
            await self._release(keys=[key], args=[holder])

    async def lease_holder(self, run_id: str) -> str | None:
        with translated("read lease"):
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
