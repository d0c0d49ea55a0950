"""Retention: what is deleted on its own, and the pass that deletes it.

Policies (``[retention]`` in the settings; a task's ``retention`` table
overrides the run part for its runs):

* **runs** — only runs that ended (``succeeded``, ``failed``, ``cancelled``,
  ``timed_out``, and ``lost`` once no retry follows) are ever removed: those
  that finished more than ``max_age`` seconds ago, and those beyond the newest
  ``max_runs`` ended runs of their task. Deleting a run deletes its stream
  (:meth:`~runstream.runs.lifecycle.Lifecycle.delete`). ``queued`` and
  ``running`` runs are never touched.
* **plain streams** (not a run's, not ``runstream:*``) — deleted once no event
  was appended for ``stream_max_idle`` seconds, or ``stream_max_closed``
  seconds after they were closed.
* **the runs feed** (``runstream:runs``) — trimmed to its newest
  ``feed_max_len`` items and to ``feed_max_age`` seconds (default ``max_age``).
* **orphans** — a closed run stream whose run record is gone (a deletion that
  failed halfway) is deleted.

Most passes read only what they may delete: the ended runs past a cutoff, and the
plain streams outside the range run ids sort in (``run-000…`` to ``run-zzz…``), so their
cost follows the deletions, not the data kept. Orphans, and plain streams whose names
fall inside that range, need every stream listed: that *full scan* is made by the
first pass, by any pass ``scan_interval`` seconds after the last one, by the pass
after a stream's deletion failed, and when asked (``POST /v1/gc``, ``runstream gc``).

:class:`Retention` runs a pass (:meth:`Retention.sweep`) on the same
:class:`~runstream.runs.store.RunStore` and :class:`EventLog` contracts on
every engine, so the semantics are the same on memory, SQLite and Redis; a
server runs one every ``interval`` seconds and ``POST /v1/gc`` runs one now.
After deletions the engine is asked to return the space
(:meth:`EventLog.reclaim_space`: SQLite's incremental vacuum, in small steps).

The passes on the server's timer are *paced* (:mod:`runstream.core.pacing`): they
work at most ``duty_cycle`` of the time and pause between steps for the rest, so
appends made meanwhile rarely wait behind one; a pass still running half an
``interval`` after it started stops pausing. A pass an operator asks for runs at full
speed, and a paced pass it has to wait for stops pausing at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runstream.backends.base import EventLog
from runstream.core.model import SYSTEM_PREFIX, StreamInfo
from runstream.core.pacing import Pacer, pacing, pause
from runstream.errors import (
    ConfigError,
    HistoryLost,
    RunstreamError,
    StreamNotFound,
    ValidationError,
)
from runstream.runs.feed import RUN_FEED, is_final
from runstream.runs.lifecycle import FINISHED, Lifecycle
from runstream.runs.model import RUN_ID_FIRST, RUN_ID_LAST, RUN_ID_RE
from runstream.runs.store import EndedRun, RunStore

__all__ = [
    "DELETE_BATCH",
    "DUTY_CYCLE",
    "RUN_PAGE",
    "SCAN_INTERVAL",
    "Retention",
    "RetentionPolicy",
    "RunRetention",
    "StreamRetention",
    "SweepResult",
    "expired_runs",
    "parse_time",
]

log = logging.getLogger("runstream.runs")

_STREAM_PAGE = 500
SCAN_INTERVAL = 3600.0
"""Default seconds between two full scans (every stream listed; see the module doc)."""
RUN_PAGE = 100
"""Run records listed per store call (retention passes, bulk deletion).

Small: an engine builds the records on a thread holding the GIL, and the event loop
(appends, deliveries) waits meanwhile (soak bench: a page of 1,000 held the loop
2.4-4.8 ms at ~600 runs)."""
DELETE_BATCH = 10
"""Runs deleted together: one store call for their records, one ``EventLog.delete_many``
for their streams.

Small on purpose: an append made during a pass waits behind the batch's writes
(soak bench, 180 s A/B before SQLite's deletion steps became bulk writes: with 50,
appends during passes p50 2.8 ms / max 10.8 ms against 1.4 / 80 outside; with 10,
1.5 / 4.1 against 1.5 / 5.2)."""
DUTY_CYCLE = 0.01
"""Default share of its time a paced pass works (see :mod:`runstream.core.pacing`)."""
_RUN_KEYS = ("max_age", "max_runs")


@dataclass(frozen=True, slots=True)
class RunRetention:
    """How long ended runs are kept: ``max_age`` seconds since they finished, and/or the
    newest ``max_runs`` per task. ``None``: no limit of that kind."""

    max_age: float | None = None
    max_runs: int | None = None

    @property
    def empty(self) -> bool:
        return self.max_age is None and self.max_runs is None

    @classmethod
    def from_config(cls, where: str, table: Any) -> RunRetention:
        """Parse a task's ``retention = {max_age = ..., max_runs = ...}``; ConfigError if bad."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: retention must be a table (max_age, max_runs)")
        unknown = set(table) - set(_RUN_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown retention key(s) {sorted(unknown)}; known: {list(_RUN_KEYS)}"
            )
        age = table.get("max_age")
        if age is not None and (
            isinstance(age, bool) or not isinstance(age, int | float) or age <= 0
        ):
            raise ConfigError(f"{where}: retention.max_age must be a number of seconds > 0")
        runs = table.get("max_runs")
        if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 0):
            raise ConfigError(f"{where}: retention.max_runs must be an integer >= 0")
        return cls(None if age is None else float(age), runs)

    def to_json(self) -> dict[str, Any]:
        return {"max_age": self.max_age, "max_runs": self.max_runs}


@dataclass(frozen=True, slots=True)
class StreamRetention:
    """Plain streams: deleted ``max_idle`` seconds after their last append, or
    ``max_closed`` seconds after they were closed."""

    max_idle: float | None = None
    max_closed: float | None = None

    @property
    def empty(self) -> bool:
        return self.max_idle is None and self.max_closed is None


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Everything one retention pass applies."""

    runs: RunRetention = RunRetention()
    streams: StreamRetention = StreamRetention()
    feed_max_age: float | None = None
    feed_max_len: int | None = None
    tasks: Mapping[str, RunRetention] = field(default_factory=dict)
    """Per-task overrides of :attr:`runs` (a task's ``retention`` table)."""

    def for_task(self, task: str) -> RunRetention:
        return self.tasks.get(task, self.runs)

    @property
    def empty(self) -> bool:
        return (
            self.runs.empty
            and self.streams.empty
            and self.feed_max_age is None
            and self.feed_max_len is None
            and all(r.empty for r in self.tasks.values())
        )

    @classmethod
    def from_settings(cls, settings: Any, tasks: Mapping[str, RunRetention]) -> RetentionPolicy:
        """From a :class:`~runstream.config.RetentionSettings` and the tasks' own tables."""
        return cls(
            runs=RunRetention(settings.max_age, settings.max_runs),
            streams=StreamRetention(settings.stream_max_idle, settings.stream_max_closed),
            feed_max_age=settings.feed_max_age
            if settings.feed_max_age is not None
            else settings.max_age,
            feed_max_len=settings.feed_max_len,
            tasks=dict(tasks),
        )


@dataclass(slots=True)
class SweepResult:
    """What one pass removed (``POST /v1/gc`` answers it)."""

    runs: int = 0
    streams: int = 0
    orphans: int = 0
    feed_events: int = 0
    pages_reclaimed: int = 0
    errors: int = 0
    duration: float = 0.0
    full_scan: bool = False
    """Every stream was listed (orphans looked for); else only plain streams outside
    the run-id range."""
    paused: float = 0.0
    """Seconds of ``duration`` the pass spent pausing (paced passes)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "runs_deleted": self.runs,
            "streams_deleted": self.streams,
            "orphan_streams_deleted": self.orphans,
            "feed_events_trimmed": self.feed_events,
            "pages_reclaimed": self.pages_reclaimed,
            "errors": self.errors,
            "full_scan": self.full_scan,
            "duration": round(self.duration, 6),
            "paused": round(self.paused, 6),
        }


def parse_time(value: str | float, *, field: str = "before") -> float:
    """Unix seconds from a number or an RFC 3339 time (``Z`` or an offset; none means UTC).

    Raises :class:`ValidationError` naming ``field``.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        try:
            number = float(value)
        except ValueError:
            try:
                parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                raise ValidationError(
                    f"{field}={value!r}: give unix seconds or an RFC 3339 time", field=field
                ) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            return parsed.timestamp()
    if not math.isfinite(number):
        raise ValidationError(f"{field} must be a finite time", field=field)
    return number


def expired_runs(records: list[EndedRun], policy: RetentionPolicy, now: float) -> list[EndedRun]:
    """The runs of ``records`` (newest first) that ``policy`` removes at ``now``. Pure.

    ``max_runs`` counts every ended run of a task that ``records`` holds: give it all of
    them when a count rule applies (:meth:`Retention.candidates` does)."""
    kept: Counter[str] = Counter()
    out: list[EndedRun] = []
    for record in records:
        if record.status not in FINISHED or not is_final(record, now):
            continue
        rule = policy.for_task(record.task)
        if rule.empty:
            continue
        kept[record.task] += 1
        too_old = rule.max_age is not None and now - record.ended_at > rule.max_age
        too_many = rule.max_runs is not None and kept[record.task] > rule.max_runs
        if too_old or too_many:
            out.append(record)
    return out


class Retention:
    """Applies a :class:`RetentionPolicy` to one run store and event log.

    ``sweep()`` runs one pass; ``run_forever()`` one every ``interval`` seconds
    (a server's background task). One pass at a time: a sweep asked for while
    one runs waits for it and then runs its own. A pass is a full scan (see the
    module doc) when asked, or when none was made in the last ``scan_interval``
    seconds of ``clock``, or when the previous pass had errors.
    """

    def __init__(
        self,
        policy: RetentionPolicy,
        store: RunStore,
        log: EventLog,
        *,
        interval: float = 300.0,
        scan_interval: float = SCAN_INTERVAL,
        duty_cycle: float = DUTY_CYCLE,
        clock: Callable[[], float] = time.time,
        on_sweep: Callable[[SweepResult], None] | None = None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.log = log
        self.lifecycle = Lifecycle(store, log)
        self.interval = interval
        self.scan_interval = scan_interval
        if not 0 < duty_cycle <= 1:
            raise ConfigError("retention duty_cycle must be in (0, 1]")
        self.duty_cycle = duty_cycle
        self.clock = clock
        self._scanned_at: float | None = None
        """``clock`` time the last full scan started; ``None``: the next pass makes one."""
        self.on_sweep = on_sweep
        self.sweeping = False
        """True while a pass runs (the soak bench splits append latency by it)."""
        self.passes = 0
        self._lock = asyncio.Lock()
        self._pacer: Pacer | None = None
        """The pacer of the paced pass running now, if any."""

    async def sweep(self, *, full: bool | None = None, paced: bool = False) -> SweepResult:
        """Apply the policy once; return what was removed. Errors are counted, not raised
        (each item is independent), except an unreachable backend while listing.

        ``full``: list every stream (orphans, plain streams named like runs) or not;
        ``None`` makes a full scan when one is due (see the class doc). ``paced``:
        work at most ``duty_cycle`` of the time until half an ``interval`` has gone by
        (the passes of :meth:`run_forever`); else at full speed, and a paced pass
        running now, which this one waits for, stops pausing.
        """
        if not paced and self._pacer is not None:
            self._pacer.hurry()
        async with self._lock:
            pacer = None
            if paced and self.duty_cycle < 1:
                pacer = self._pacer = Pacer(self.duty_cycle, budget=self.interval / 2)
            self.sweeping = True
            started = time.perf_counter()
            result = SweepResult()
            try:
                now = self.clock()
                if full is None:
                    last = self._scanned_at
                    full = last is None or not 0 <= now - last < self.scan_interval
                if full:
                    self._scanned_at = now
                result.full_scan = full
                with pacing(pacer):
                    await self._pass(now, full, result)
            except BaseException:
                self._scanned_at = None  # a pass that stopped early may have left orphans
                raise
            finally:
                if result.errors:
                    self._scanned_at = None  # look for what the failures left behind
                self.sweeping = False
                result.duration = time.perf_counter() - started
                result.paused = 0.0 if pacer is None else pacer.paused
                self._pacer = None
                self.passes += 1
            if self.on_sweep is not None:
                self.on_sweep(result)
            if result.runs or result.streams or result.orphans:
                log.info("retention: %s", result.to_json())
            return result

    async def _pass(self, now: float, full: bool, result: SweepResult) -> None:
        await self._runs(await self.candidates(now), result)
        await self._streams(now, result, full=full)
        await self._feed(result)
        if result.runs or result.streams or result.orphans or result.feed_events:
            await pause()
            result.pages_reclaimed = await self.log.reclaim_space()

    async def candidates(self, now: float) -> list[EndedRun]:
        """The runs the policy removes at ``now``, read with :meth:`RunStore.ended`.

        With age limits only, each rule asks for its task's runs (every task's, for the
        global rule) that ended before its cutoff: a pass reads about what it deletes,
        however many runs are kept. A count limit needs every ended run of the task
        counted, so then every ended run is read (a few fields each).
        """
        policy = self.policy
        rules = [(None, policy.runs), *policy.tasks.items()]
        queries: list[tuple[str | None, float | None]]
        if any(rule.max_runs is not None for _, rule in rules):
            queries = [(None, None)]
        else:
            queries = [(task, now - r.max_age) for task, r in rules if r.max_age is not None]
        found: dict[str, EndedRun] = {}
        for task, before in queries:
            cursor: str | None = None
            while True:
                page, cursor = await self.store.ended(
                    task=task, finished_before=before, limit=RUN_PAGE, cursor=cursor
                )
                found.update((run.id, run) for run in page)
                if cursor is None:
                    break
                await pause()
        newest_first = sorted(found.values(), key=lambda r: (r.created_at, r.id), reverse=True)
        return expired_runs(newest_first, policy, now)

    async def _runs(self, runs: list[EndedRun], result: SweepResult) -> None:
        expired = [r.id for r in runs]
        for start in range(0, len(expired), DELETE_BATCH):
            try:
                removed, failed = await self.lifecycle.delete_many(
                    expired[start : start + DELETE_BATCH]
                )
            except RunstreamError as exc:
                result.errors += 1
                log.warning("retention: could not delete a batch of runs: %s", exc)
                continue
            result.runs += len(removed)
            result.errors += failed
            await pause()

    async def _streams(self, now: float, result: SweepResult, *, full: bool) -> None:
        """Plain-stream rules and (``full``) orphans; not ``full``: only the names before
        and after the run-id range are listed."""
        rule = self.policy.streams
        if full:
            await self._stream_range(now, result, "", "")
        elif not rule.empty:
            await self._stream_range(now, result, "", RUN_ID_FIRST)
            await self._stream_range(now, result, RUN_ID_LAST, "")

    async def _stream_range(
        self, now: float, result: SweepResult, start_after: str, end_before: str
    ) -> None:
        """:meth:`_streams` for the names after ``start_after`` and before ``end_before``."""
        rule = self.policy.streams
        while True:
            page = await self.log.list_streams(
                start_after=start_after, end_before=end_before, limit=_STREAM_PAGE
            )
            if not page:
                return
            start_after = page[-1].name
            # A closed run stream whose record is gone is an orphan (a deletion that
            # stopped halfway); asked of the store once per page.
            closed_runs = [i.name for i in page if i.closed and RUN_ID_RE.fullmatch(i.name)]
            try:
                orphans = await self.store.missing(closed_runs) if closed_runs else set()
            except RunstreamError as exc:
                result.errors += 1
                log.warning("retention: could not look for orphan run streams: %s", exc)
                orphans = set()
            deleted = result.streams + result.orphans
            for info in page:
                if info.name.startswith(SYSTEM_PREFIX):
                    continue
                try:
                    if RUN_ID_RE.fullmatch(info.name):
                        if info.name in orphans:
                            await self.log.delete(info.name)
                            result.orphans += 1
                    elif not rule.empty and await self._stream_expired(info, rule, now):
                        await self.log.delete(info.name)
                        result.streams += 1
                except StreamNotFound:
                    pass
                except RunstreamError as exc:
                    result.errors += 1
                    log.warning("retention: could not delete stream %r: %s", info.name, exc)
            if result.streams + result.orphans > deleted:
                await pause()  # listing alone does not hold the writer

    async def _stream_expired(self, info: StreamInfo, rule: StreamRetention, now: float) -> bool:
        closed_at = info.closed_at
        if (
            rule.max_closed is not None
            and closed_at is not None
            and now - closed_at > rule.max_closed
        ):
            return True
        if rule.max_idle is not None:
            last = await self._last_activity(info)
            return now - last > rule.max_idle
        return False

    async def _last_activity(self, info: StreamInfo) -> float:
        """Time of the stream's last event (its creation if it holds none)."""
        if info.last_id >= info.first_id and info.last_id > 0:
            with contextlib.suppress(HistoryLost, StreamNotFound):
                page = await self.log.read(info.name, after=info.last_id - 1, limit=1)
                if page.events:
                    return page.events[-1].time
        return max(info.created_at, info.closed_at or 0.0)

    async def _feed(self, result: SweepResult) -> None:
        policy = self.policy
        if policy.feed_max_age is None and policy.feed_max_len is None:
            return
        try:
            result.feed_events = await self.log.trim(
                RUN_FEED, max_len=policy.feed_max_len, max_age=policy.feed_max_age
            )
        except StreamNotFound:
            pass
        except RunstreamError as exc:
            result.errors += 1
            log.warning("retention: could not trim the runs feed: %s", exc)

    async def run_forever(self) -> None:
        """A pass every ``interval`` seconds until cancelled; failures are logged."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep(paced=True)
            except RunstreamError as exc:
                log.warning("retention pass failed: %s", exc)
