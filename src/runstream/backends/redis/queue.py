"""The queue of runs on Redis Streams: its keys, the producer side and its statistics.

See :mod:`runstream.backends.redis.dispatch` for how a run travels.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from runstream.backends.redis.errors import translated
from runstream.backends.redis.runstore import (
    RedisRunKeys,
    RedisRunStore,
)
from runstream.errors import (
    BackendError,
)
from runstream.runs.model import RunRecord

__all__ = [
    "CLAIM_BATCH",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_DELIVERIES",
    "GROUP",
    "QueueStats",
    "RedisRunQueue",
    "default_worker_name",
    "ensure_group",
    "stats_key",
]

GROUP = "workers"
DEFAULT_LEASE = 30.0
"""Seconds a worker's claim on a run survives without a heartbeat."""
DEFAULT_MAX_DELIVERIES = 5
"""An entry delivered more often than this is dead-lettered (the run ends ``lost``)."""
CLAIM_BATCH = 50
STATS_FIELDS = ("lost", "retried", "dead_lettered", "reclaimed")


def default_worker_name() -> str:
    """``<host>-<pid>``: unique per process, so a restart starts with no pending entries."""
    return f"{socket.gethostname()}-{os.getpid()}"


def stats_key(keys: RedisRunKeys) -> str:
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

    async def recreate_group(self) -> None:
        """Create the group again after Redis lost it (``NOGROUP``: e.g. restarted empty)."""
        self._group_ready = False
        await self.ensure_group()

    async def enqueue(self, run_id: str, attempt: int = 1) -> str:
        """Queue ``run_id`` (already stored as ``queued``); returns the entry id.

        Queueing the same run twice is harmless: the worker that moves it to
        ``running`` first runs it, the other entry is only acknowledged.
        """
        await self.ensure_group()
        with translated("enqueue run"):
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
        with translated("queue stats"):
            async with redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.keys.queue)
                pipe.xpending(self.keys.queue, GROUP)
                pipe.hgetall(stats_key(self.keys))
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
    with translated("create consumer group"):
        try:
            await redis.xgroup_create(keys.queue, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
