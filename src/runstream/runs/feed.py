"""The runs feed: one stream announcing every run's lifecycle, for listeners that discover runs.

Every move :class:`~runstream.runs.lifecycle.Lifecycle` makes is announced,
after the run's own ``status`` event (and close), as one item on the stream
:data:`RUN_FEED` (served as ``GET /v1/runs/events`` and ``/v1/runs/ws``):

* ``created`` — the run was queued (its stream exists by then);
* ``status`` — any later move that is not the last: ``running``, ``lost``
  before a retry, ``queued`` again for the retry;
* ``ended`` — the run is final (``succeeded``, ``failed``, ``cancelled``,
  ``timed_out``, or ``lost`` with no retry); its stream is closed by then.

Each item's data is the run object (as ``GET /v1/runs/{id}`` shows it) plus
``"previous"``: the status it moved from (``null`` for ``created``).

**Delivery.** The run record is the truth and is written first; the
announcement is an effect. Each one is appended as an idempotent producer
write: producer ``run:<id>``, sequence :func:`feed_seq` (rising along a run's
life). So announcing the same state twice stores it once, and announcing an
*older* state after a newer one stores nothing (the backend refuses the stale
sequence): per run, the feed never goes backwards. When an append fails
(backend unavailable, a crash between the record and the feed), the move
stands and :class:`FeedRepair` announces the run's current state later, so
every run's latest state reaches the feed at least once; an intermediate
status may then be skipped (its item carries the whole run, so the next one
says everything).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Literal, Protocol, TypeAlias

from runstream.backends.base import EventLog
from runstream.core.model import SYSTEM_PREFIX, NewEvent, Producer
from runstream.errors import RunstreamError, StaleProducerSeq
from runstream.runs.model import RunRecord, RunStatus

__all__ = [
    "FEED_REPAIR_INTERVAL",
    "RUN_FEED",
    "FeedKind",
    "FeedRepair",
    "announce",
    "feed_item",
    "feed_seq",
]

log = logging.getLogger("runstream.runs")

RUN_FEED = SYSTEM_PREFIX + "runs"
"""The stream of run lifecycle items."""

FEED_REPAIR_INTERVAL = 30.0
"""Seconds between two repair sweeps of a server (see :class:`FeedRepair`)."""

RECENT_FINISHED = 1000
"""How many of the newest runs each repair sweep looks at besides the unfinished ones."""

LOST_SETTLED = 60.0
"""Seconds after which a run still ``lost`` is taken as final (not about to be retried)."""

FeedKind: TypeAlias = Literal["created", "status", "ended"]

_STATUS_RANK: dict[RunStatus, int] = {"queued": 1, "running": 2, "lost": 3}


class _Ended(Protocol):
    """What :func:`is_final` reads: a :class:`RunRecord` or a store's ``EndedRun``."""

    @property
    def status(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def finished_at(self) -> float | None: ...


def is_final(record: _Ended, now: float) -> bool:
    """Whether nothing more will happen to ``record``, as far as its record tells.

    A ``lost`` run is final once it has stayed ``lost`` for :data:`LOST_SETTLED`
    seconds (a retry moves it to ``queued`` at once).
    """
    if record.status == "lost":
        return now - (record.finished_at or record.created_at) > LOST_SETTLED
    return record.status not in _STATUS_RANK


def feed_kind(record: RunRecord, *, final: bool) -> FeedKind:
    """What announcing ``record`` is: ``created`` (attempt 1, queued, not a retry), ``ended``
    (``final``: nothing more happens to the run) or ``status``."""
    if final:
        return "ended"
    if record.status == "queued" and record.attempt == 1:
        return "created"
    return "status"


def feed_seq(record: RunRecord, *, final: bool) -> int:
    """The producer sequence of the announcement of ``record``: rises along a run's life.

    Per attempt: queued 1, running 2, lost 3, ended 4 (lost without retry) or
    5 (terminal); the next attempt starts above the previous one's end.
    """
    if not final:
        return record.attempt * 8 + _STATUS_RANK.get(record.status, 5)
    return record.attempt * 8 + (4 if record.status == "lost" else 5)


def feed_item(record: RunRecord, previous: RunStatus | None, *, final: bool) -> NewEvent:
    """The feed item announcing ``record`` (moved from ``previous``)."""
    data: dict[str, Any] = {**record.to_json(), "previous": previous}
    return NewEvent(feed_kind(record, final=final), data)


async def announce(
    log_: EventLog, record: RunRecord, previous: RunStatus | None, *, final: bool
) -> bool:
    """Append the announcement of ``record`` to :data:`RUN_FEED`, idempotently.

    Returns whether it stored something: False if this state (a duplicate) or
    a later one (stale) was announced already. Raises what the event log raises.
    """
    producer = Producer(f"run:{record.id}", feed_seq(record, final=final))
    try:
        result = await log_.append(
            RUN_FEED, feed_item(record, previous, final=final), producer=producer
        )
    except StaleProducerSeq:
        return False
    return not result.duplicate


class RunSource(Protocol):
    """What :class:`FeedRepair` reads: a :class:`~runstream.runs.store.RunStore`'s listing."""

    async def list(
        self,
        *,
        status: RunStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]: ...


class FeedRepair:
    """Announces the current state of runs whose announcement may be missing.

    :meth:`sweep` looks at every unfinished run (``queued``, ``running``,
    ``lost``) and the :data:`RECENT_FINISHED` newest runs, and announces each
    one whose state this process has not announced yet (every run, on the
    first sweep after a start). Appends are idempotent (see
    :func:`announce`), so a state already in the feed is not stored again;
    what this process announced is remembered (bounded), so later sweeps
    append only for runs that moved. :meth:`run_forever` sweeps at start and
    every ``interval`` seconds.
    """

    def __init__(
        self,
        store: RunSource,
        log_: EventLog,
        *,
        interval: float = FEED_REPAIR_INTERVAL,
        recent: int = RECENT_FINISHED,
        remember: int = 20_000,
    ) -> None:
        self.store = store
        self.log = log_
        self.interval = interval
        self.recent = recent
        self.remember = remember
        self.repaired = 0
        """Announcements a sweep stored (each was missing from the feed)."""
        self._announced: OrderedDict[str, int] = OrderedDict()

    async def sweep(self) -> int:
        """One pass; returns how many announcements it stored. Raises backend errors."""
        stored = 0
        now = time.time()
        for record in await self._candidates():
            final = is_final(record, now)
            seq = feed_seq(record, final=final)
            if self._announced.get(record.id, -1) >= seq:
                continue
            if await announce(self.log, record, None, final=final):
                stored += 1
            self._remember(record.id, seq)
        self.repaired += stored
        return stored

    def _remember(self, run_id: str, seq: int) -> None:
        self._announced[run_id] = seq
        self._announced.move_to_end(run_id)
        while len(self._announced) > self.remember:
            self._announced.popitem(last=False)

    async def _candidates(self) -> Iterable[RunRecord]:
        found: dict[str, RunRecord] = {}
        for status in ("queued", "running", "lost"):
            cursor: str | None = None
            while True:
                page, cursor = await self.store.list(status=status, limit=500, cursor=cursor)
                found.update((r.id, r) for r in page)
                if cursor is None:
                    break
        cursor = None
        left = self.recent
        while left > 0:
            page, cursor = await self.store.list(limit=min(left, 500), cursor=cursor)
            found.update((r.id, r) for r in page)
            left -= len(page)
            if cursor is None:
                break
        # Oldest first: a listener discovering them sees them in creation order.
        return sorted(found.values(), key=lambda r: (r.created_at, r.id))

    async def run_forever(self) -> None:
        """Sweep now and every ``interval`` seconds until cancelled; failures are logged."""
        while True:
            try:
                stored = await self.sweep()
            except RunstreamError as exc:
                log.warning("runs feed repair: %s; trying again in %gs", exc, self.interval)
            else:
                if stored:
                    log.warning("runs feed repair: announced %d missing run state(s)", stored)
            await asyncio.sleep(self.interval)
