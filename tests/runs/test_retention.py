"""Retention and deletion, one contract on every engine (memory, SQLite, Redis).

Each test builds runs and streams through the real Lifecycle and EventLog of
one engine, then runs a retention pass with a clock moved forward: what the
policy says goes is gone (record and stream), everything else is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runstream.backends import EventLog, open_backend, open_run_store
from runstream.core.model import NewEvent
from runstream.core.pacing import MAX_PAUSE, Pacer
from runstream.errors import (
    BackendUnavailable,
    ConfigError,
    IllegalTransition,
    RunNotFound,
    StreamNotFound,
)
from runstream.runs import retention
from runstream.runs.feed import RUN_FEED
from runstream.runs.lifecycle import Lifecycle
from runstream.runs.model import RUN_ID_FIRST, RUN_ID_LAST, RUN_ID_RE, RunRecord, new_run_id
from runstream.runs.retention import (
    Retention,
    RetentionPolicy,
    RunRetention,
    StreamRetention,
)
from runstream.runs.store import EndedRun, RunStore

ENGINES = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]
HOUR = 3600.0


@dataclass
class Engine:
    name: str
    store: RunStore
    log: EventLog
    lifecycle: Lifecycle

    async def run(
        self, task: str = "t", *, end: str | None = "succeeded", ago: float = 0.0
    ) -> RunRecord:
        """A run through the lifecycle: queued, then running and ``end`` (None: running),
        finished ``ago`` seconds ago."""
        record = RunRecord(
            id=new_run_id(), task=task, params={}, status="queued", created_at=time.time()
        )
        await self.lifecycle.create(record)
        if end == "queued":
            return record
        record = await self.lifecycle.advance(
            record.id, "queued", "running", worker="w", started_at=time.time()
        )
        if end is None:
            return record
        return await self.lifecycle.advance(
            record.id,
            "running",
            end,
            finished_at=time.time() - ago,
            exit_code=0,  # type: ignore[arg-type]
        )

    async def exists(self, run_id: str) -> bool:
        try:
            await self.store.get(run_id)
        except RunNotFound:
            return False
        try:
            await self.log.info(run_id)
        except StreamNotFound:
            raise AssertionError(f"run {run_id} exists without its stream") from None
        return True

    async def stream_exists(self, name: str) -> bool:
        try:
            await self.log.info(name)
        except StreamNotFound:
            return False
        return True

    def retention(self, policy: RetentionPolicy, *, later: float) -> Retention:
        """A retention pass whose clock is ``later`` seconds ahead of now."""
        return Retention(policy, self.store, self.log, clock=lambda: time.time() + later)


@pytest.fixture(params=ENGINES)
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    kind = request.param
    if kind == "memory":
        url = "memory://"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'ret.db'}"
    else:
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}"
    log = open_backend(url)
    store = open_run_store(url)
    async with log:
        await store.start()
        try:
            yield Engine(kind, store, log, Lifecycle(store, log))
        finally:
            await store.aclose()


# -- deletion ------------------------------------------------------------------------


async def test_deleting_an_ended_run_removes_its_record_and_its_stream(engine: Engine) -> None:
    record = await engine.run(end="failed")
    deleted = await engine.lifecycle.delete(record.id)
    assert deleted.id == record.id and deleted.status == "failed"
    assert not await engine.stream_exists(record.id)
    with pytest.raises(RunNotFound):
        await engine.store.get(record.id)
    with pytest.raises(RunNotFound):
        await engine.lifecycle.delete(record.id)


@pytest.mark.parametrize("end", ["queued", None], ids=["queued", "running"])
async def test_a_run_that_has_not_ended_is_not_deleted(engine: Engine, end: str | None) -> None:
    record = await engine.run(end=end)
    with pytest.raises(IllegalTransition):
        await engine.lifecycle.delete(record.id)
    assert await engine.exists(record.id)


# -- runs ----------------------------------------------------------------------------


async def test_ended_runs_older_than_max_age_go_and_unended_ones_stay(engine: Engine) -> None:
    old = [await engine.run(end=end) for end in ("succeeded", "failed", "cancelled", "timed_out")]
    queued = await engine.run(end="queued")
    running = await engine.run(end=None)
    policy = RetentionPolicy(runs=RunRetention(max_age=HOUR))

    assert (await engine.retention(policy, later=HOUR / 2).sweep()).runs == 0
    result = await engine.retention(policy, later=2 * HOUR).sweep()

    assert result.runs == len(old)
    for record in old:
        assert not await engine.exists(record.id)
    assert await engine.exists(queued.id)
    assert await engine.exists(running.id)


async def test_max_runs_keeps_the_newest_ended_runs_of_each_task(engine: Engine) -> None:
    a = [await engine.run("a") for _ in range(4)]
    b = [await engine.run("b") for _ in range(2)]
    a_running = await engine.run("a", end=None)
    policy = RetentionPolicy(runs=RunRetention(max_runs=2))

    result = await engine.retention(policy, later=0).sweep()

    assert result.runs == 2
    assert [await engine.exists(r.id) for r in a] == [False, False, True, True]
    assert [await engine.exists(r.id) for r in b] == [True, True]
    assert await engine.exists(a_running.id)


async def test_runs_listed_over_several_pages_are_counted_newest_first(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pass lists runs a small page at a time (the event loop runs between pages);
    # max_runs must still count each task's ended runs across the pages, newest first.
    monkeypatch.setattr(retention, "RUN_PAGE", 2)
    runs = [await engine.run("a") for _ in range(5)]
    running = await engine.run("a", end=None)
    policy = RetentionPolicy(runs=RunRetention(max_runs=2))

    result = await engine.retention(policy, later=0).sweep()

    assert result.runs == 3
    assert [await engine.exists(r.id) for r in runs] == [False, False, False, True, True]
    assert await engine.exists(running.id)


async def test_a_task_override_replaces_the_global_rule_for_its_runs(engine: Engine) -> None:
    keep = [await engine.run("keep") for _ in range(3)]
    short = [await engine.run("short") for _ in range(3)]
    policy = RetentionPolicy(
        runs=RunRetention(max_runs=1), tasks={"keep": RunRetention(max_age=10 * HOUR)}
    )

    await engine.retention(policy, later=HOUR).sweep()

    assert [await engine.exists(r.id) for r in keep] == [True, True, True]
    assert [await engine.exists(r.id) for r in short] == [False, False, True]


async def test_age_overrides_shorter_and_longer_than_the_global_rule(engine: Engine) -> None:
    plain = await engine.run("plain")
    short = await engine.run("short")
    long = await engine.run("long")
    policy = RetentionPolicy(
        runs=RunRetention(max_age=HOUR),
        tasks={"short": RunRetention(max_age=HOUR / 4), "long": RunRetention(max_age=10 * HOUR)},
    )

    assert (await engine.retention(policy, later=HOUR / 2).sweep()).runs == 1
    assert [await engine.exists(r.id) for r in (plain, short, long)] == [True, False, True]
    assert (await engine.retention(policy, later=2 * HOUR).sweep()).runs == 1
    assert [await engine.exists(r.id) for r in (plain, long)] == [False, True]


async def test_with_age_limits_only_a_pass_reads_just_the_runs_it_deletes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # However many runs are kept, a pass's work follows what it deletes.
    old = [await engine.run(ago=2 * HOUR) for _ in range(3)]
    kept = [await engine.run() for _ in range(5)]
    read: list[str] = []
    ended = engine.store.ended

    async def spy(**kw: Any) -> tuple[list[EndedRun], str | None]:
        page, cursor = await ended(**kw)
        read.extend(r.id for r in page)
        return page, cursor

    monkeypatch.setattr(engine.store, "ended", spy)
    result = await engine.retention(
        RetentionPolicy(runs=RunRetention(max_age=HOUR)), later=0
    ).sweep()

    assert result.runs == 3
    assert sorted(read) == sorted(r.id for r in old)
    assert [await engine.exists(r.id) for r in kept] == [True] * 5


# -- streams -------------------------------------------------------------------------


async def test_plain_streams_go_after_max_idle_and_max_closed(engine: Engine) -> None:
    await engine.log.append("idle", NewEvent("x", 1))
    await engine.log.append("closed", NewEvent("x", 1))
    await engine.log.close("closed")
    run = await engine.run()
    policy = RetentionPolicy(streams=StreamRetention(max_closed=HOUR))

    result = await engine.retention(policy, later=2 * HOUR).sweep()

    assert result.streams == 1
    assert not await engine.stream_exists("closed")
    assert await engine.stream_exists("idle")
    assert await engine.exists(run.id), "a run's stream goes with its run, not as a stream"

    policy = RetentionPolicy(streams=StreamRetention(max_idle=HOUR))
    assert (await engine.retention(policy, later=HOUR / 2).sweep()).streams == 0
    assert (await engine.retention(policy, later=2 * HOUR).sweep()).streams == 1
    assert not await engine.stream_exists("idle")
    assert await engine.stream_exists(RUN_FEED), "runstream:* streams are never deleted"


async def test_a_stream_appended_to_recently_is_not_idle(engine: Engine) -> None:
    await engine.log.append("busy", NewEvent("x", 1))
    policy = RetentionPolicy(streams=StreamRetention(max_idle=HOUR))
    retention = Retention(policy, engine.store, engine.log, clock=lambda: time.time() + 10)
    assert (await retention.sweep()).streams == 0
    assert await engine.stream_exists("busy")


async def test_the_runs_feed_is_trimmed_to_its_newest_items(engine: Engine) -> None:
    for _ in range(5):
        await engine.run()  # created, running, ended: 3 items each
    before = await engine.log.info(RUN_FEED)
    policy = RetentionPolicy(feed_max_len=4)

    result = await engine.retention(policy, later=0).sweep()

    after = await engine.log.info(RUN_FEED)
    assert result.feed_events == before.last_id - 4
    assert (after.first_id, after.last_id) == (before.last_id - 3, before.last_id)


async def test_a_closed_run_stream_without_its_run_is_removed_as_an_orphan(
    engine: Engine,
) -> None:
    record = await engine.run()
    await engine.store.delete(record.id)  # as if the stream's deletion had failed
    assert await engine.stream_exists(record.id)

    result = await engine.retention(RetentionPolicy(), later=0).sweep()

    assert result.orphans == 1
    assert not await engine.stream_exists(record.id)


async def test_orphans_are_found_on_every_page_of_streams(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "_STREAM_PAGE", 2)
    runs = [await engine.run() for _ in range(6)]
    running = await engine.run(end=None)
    orphans = runs[::2]
    for record in orphans:
        await engine.store.delete(record.id)

    result = await engine.retention(RetentionPolicy(), later=0).sweep()

    assert result.orphans == len(orphans)
    assert [await engine.stream_exists(r.id) for r in runs] == [False, True] * 3
    assert await engine.exists(running.id)


# -- full scans ----------------------------------------------------------------------


async def test_orphans_are_looked_for_by_full_scans_only(engine: Engine) -> None:
    clock = [time.time()]
    scans = Retention(
        RetentionPolicy(), engine.store, engine.log, scan_interval=HOUR, clock=lambda: clock[0]
    )
    first = await scans.sweep()
    assert first.full_scan, "a process's first pass lists every stream"

    record = await engine.run()
    await engine.store.delete(record.id)  # an orphan appears after the first pass
    clock[0] += HOUR / 2
    quick = await scans.sweep()
    assert (quick.full_scan, quick.orphans) == (False, 0)
    assert await engine.stream_exists(record.id)

    clock[0] += HOUR / 2
    due = await scans.sweep()
    assert (due.full_scan, due.orphans) == (True, 1)
    assert not await engine.stream_exists(record.id)

    other = await engine.run()
    await engine.store.delete(other.id)
    asked = await scans.sweep(full=True)  # POST /v1/gc, runstream gc
    assert (asked.full_scan, asked.orphans) == (True, 1)
    assert asked.to_json()["full_scan"] is True
    assert not (await scans.sweep()).full_scan, "an asked-for scan restarts the interval"


async def test_passes_between_scans_apply_stream_rules_around_the_run_range(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "_STREAM_PAGE", 2)
    runs = [await engine.run() for _ in range(5)]
    names = ["alpha", "run-", "runner", "zeta"]  # before and after the run-id range
    for name in names:
        await engine.log.append(name, NewEvent("x", 1))
        await engine.log.close(name)
    listed: list[str] = []
    listing = engine.log.list_streams

    async def list_streams(**kwargs: Any) -> Any:
        page = await listing(**kwargs)
        listed.extend(i.name for i in page)
        return page

    monkeypatch.setattr(engine.log, "list_streams", list_streams)
    policy = RetentionPolicy(streams=StreamRetention(max_closed=HOUR))
    scans = engine.retention(policy, later=2 * HOUR)
    scans._scanned_at = time.time() + 2 * HOUR  # a full scan was just made

    result = await scans.sweep()

    assert (result.full_scan, result.streams) == (False, len(names))
    assert [await engine.stream_exists(n) for n in names] == [False] * len(names)
    assert [await engine.exists(r.id) for r in runs] == [True] * len(runs)
    assert [n for n in listed if RUN_ID_RE.fullmatch(n)] == [], "run streams were listed"
    assert set(names) <= set(listed)


async def test_a_plain_stream_named_inside_the_run_range_waits_for_a_full_scan(
    engine: Engine,
) -> None:
    inside = ["run-5", "run-zz"]  # run ids are lowercase Crockford base32
    for name in inside:
        await engine.log.append(name, NewEvent("x", 1))
        await engine.log.close(name)
    policy = RetentionPolicy(streams=StreamRetention(max_closed=HOUR))
    scans = engine.retention(policy, later=2 * HOUR)
    scans._scanned_at = time.time() + 2 * HOUR

    assert (await scans.sweep()).streams == 0
    assert (await scans.sweep(full=True)).streams == len(inside)
    assert [await engine.stream_exists(n) for n in inside] == [False] * len(inside)


async def test_a_pass_with_errors_makes_the_next_one_a_full_scan(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = await engine.run(ago=2 * HOUR)
    policy = RetentionPolicy(runs=RunRetention(max_age=HOUR))
    scans = engine.retention(policy, later=0)
    scans._scanned_at = time.time()
    deleting = engine.log.delete_many

    async def failing(streams: Any) -> dict[str, Any]:
        names = list(streams)
        return {name: StreamNotFound(name) for name in names}

    monkeypatch.setattr(engine.log, "delete_many", failing)
    failed = await scans.sweep()
    assert (failed.full_scan, failed.runs, failed.errors) == (False, 1, 1)
    assert await engine.stream_exists(record.id), "the run's stream was left behind"

    monkeypatch.setattr(engine.log, "delete_many", deleting)
    healed = await scans.sweep()
    assert (healed.full_scan, healed.orphans) == (True, 1)
    assert not await engine.stream_exists(record.id)


async def test_a_pass_that_stopped_early_makes_the_next_one_a_full_scan(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    scans = engine.retention(RetentionPolicy(runs=RunRetention(max_age=HOUR)), later=0)
    scans._scanned_at = time.time()

    async def unreachable(**kwargs: Any) -> Any:
        raise BackendUnavailable("the store went away")

    monkeypatch.setattr(engine.store, "ended", unreachable)
    with pytest.raises(BackendUnavailable):
        await scans.sweep()
    monkeypatch.undo()
    assert (await scans.sweep()).full_scan


def test_every_run_id_sorts_inside_the_range_passes_skip() -> None:
    assert RUN_ID_RE.fullmatch(RUN_ID_FIRST) and RUN_ID_RE.fullmatch(RUN_ID_LAST)
    assert all(RUN_ID_FIRST <= new_run_id() <= RUN_ID_LAST for _ in range(200))


# -- pacing --------------------------------------------------------------------------


async def test_a_paced_pass_deletes_what_a_full_speed_one_does_and_pauses_between_steps(
    engine: Engine,
) -> None:
    policy = RetentionPolicy(runs=RunRetention(max_age=HOUR))
    old = [await engine.run(ago=2 * HOUR) for _ in range(retention.DELETE_BATCH + 2)]
    kept = await engine.run()
    paced = Retention(policy, engine.store, engine.log, duty_cycle=0.5)
    result = await paced.sweep(paced=True)
    assert result.runs == len(old) and result.errors == 0
    assert [await engine.exists(r.id) for r in old] == [False] * len(old)
    assert await engine.exists(kept.id)
    # Busy half the time: about as long paused as working, up to the last step.
    assert 0 < result.paused < result.duration
    assert result.to_json()["paused"] == round(result.paused, 6)


async def test_a_pass_asked_for_runs_at_full_speed(engine: Engine) -> None:
    policy = RetentionPolicy(runs=RunRetention(max_age=HOUR))
    old = [await engine.run(ago=2 * HOUR) for _ in range(3)]
    result = await Retention(policy, engine.store, engine.log, duty_cycle=0.01).sweep()
    assert (result.runs, result.paused) == (len(old), 0.0)


async def test_the_passes_on_the_timer_are_paced(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    timer = Retention(RetentionPolicy(), engine.store, engine.log, interval=0.01)
    asked: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def sweep(**kwargs: Any) -> retention.SweepResult:
        asked.put_nowait(kwargs)
        return retention.SweepResult()

    monkeypatch.setattr(timer, "sweep", sweep)
    task = asyncio.create_task(timer.run_forever())
    try:
        assert await asyncio.wait_for(asked.get(), 10) == {"paced": True}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_pass_asked_for_meanwhile_makes_the_paced_one_finish_at_full_speed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []
    pausing = asyncio.Event()

    class Watched(Pacer):
        async def _sleep(self, delay: float) -> None:
            pauses.append(delay)
            pausing.set()
            await super()._sleep(delay)

    monkeypatch.setattr(retention, "Pacer", Watched)
    old = [await engine.run(ago=2 * HOUR) for _ in range(2 * retention.DELETE_BATCH + 1)]
    policy = RetentionPolicy(runs=RunRetention(max_age=HOUR))
    # Each pause would be MAX_PAUSE (1 s), the budget an hour.
    ret = Retention(policy, engine.store, engine.log, interval=2 * HOUR, duty_cycle=0.0001)
    timer = asyncio.create_task(ret.sweep(paced=True))
    await asyncio.wait_for(pausing.wait(), 10)
    asked = await asyncio.wait_for(ret.sweep(), 10)
    paced = await asyncio.wait_for(timer, 10)
    assert paced.runs + asked.runs == len(old) and asked.paused == 0
    assert len(pauses) == 1, "the paced pass paused again after the asked-for one came"
    assert paced.paused < MAX_PAUSE / 2, "the pause under way was not cut short"


@pytest.mark.parametrize("duty", [0.0, 1.5])
def test_a_duty_cycle_outside_zero_to_one_is_refused(duty: float) -> None:
    with pytest.raises(ConfigError, match="duty_cycle"):
        Retention(RetentionPolicy(), None, None, duty_cycle=duty)  # type: ignore[arg-type]
