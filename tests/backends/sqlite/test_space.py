"""The SQLite file gives space back: schema 2 (incremental auto-vacuum), bounded purges."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from runstream.backends.sqlite import space
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.backends.sqlite.migrate import STEPS, migrate
from runstream.backends.sqlite.space import op_purge_step
from runstream.backends.sqlite.sql import SCHEMA_VERSION
from runstream.core import pacing
from runstream.core.model import NewEvent
from runstream.core.pacing import Pacer
from runstream.errors import BackendError, StreamDeleted, StreamNotFound
from tests.backends.followers import watching

BIG = "x" * 2000


def pragma(path: Path, name: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])
    finally:
        conn.close()


def make_v1(path: Path) -> None:
    """A database as runstream with schema 1 left it: WAL, no auto-vacuum, one stream."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in STEPS[0].statements:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO streams (sid, name, epoch, status, first_id, last_id, created_at) "
        "VALUES (1, 'old', 'e1', 'open', 1, 1, 1.0)"
    )
    conn.execute("INSERT INTO events VALUES (?, 'x', '\"kept\"', 1.0)", ((1 << 32) + 1,))
    conn.close()


def test_the_steps_are_numbered_in_order_and_end_at_the_schema_version() -> None:
    assert [s.version for s in STEPS] == list(range(1, SCHEMA_VERSION + 1))
    assert SCHEMA_VERSION >= 2


async def test_a_new_database_is_created_at_the_current_version_with_incremental_vacuum(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.db"
    async with SQLiteEventLog(path):
        pass
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert pragma(path, "auto_vacuum") == 2  # INCREMENTAL


async def test_a_version_1_database_is_migrated_once_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    make_v1(path)
    assert pragma(path, "auto_vacuum") == 0
    async with SQLiteEventLog(path) as log:
        page = await log.read("old")
        assert [e.data for e in page.events] == ["kept"]
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert pragma(path, "auto_vacuum") == 2
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn, str(path)) == []  # nothing left to do
    finally:
        conn.close()


async def test_deleting_a_stream_and_reclaiming_shrinks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shrink.db"
    async with SQLiteEventLog(path) as log:
        await log.append("keep", NewEvent("x", 1))
        for _ in range(20):
            await log.append("big", [NewEvent("x", BIG) for _ in range(100)])
        full = (await log.storage_stats())["file_bytes"]
        await log.purge("big", batch=300)
        stats = await log.storage_stats()
        assert stats["free_pages"] > 0
        freed = await log.reclaim_space(step=64)
        assert freed > 0
        after = await log.storage_stats()
        assert after["free_pages"] == 0
        assert (after["streams"], after["events"]) == (1, 1)
        with pytest.raises(StreamNotFound):
            await log.info("big")
    # The WAL is checkpointed on close: the database file itself is smaller.
    assert path.stat().st_size < full / 4


async def test_the_row_counts_match_the_events_table_through_trims_closes_and_purges(
    tmp_path: Path,
) -> None:
    """``storage_stats`` counts events from the streams table; the events table is the truth."""
    path = tmp_path / "counts.db"

    def counted() -> tuple[int, int]:
        conn = sqlite3.connect(path)
        try:
            streams = conn.execute("SELECT count(*) FROM streams").fetchone()[0]
            return int(streams), int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            conn.close()

    async with SQLiteEventLog(path) as log:

        async def check() -> None:
            stats = await log.storage_stats()
            assert (stats["streams"], stats["events"]) == counted()

        await check()  # empty
        await log.append("a", [NewEvent("x", i) for i in range(50)])
        await log.append("b", [NewEvent("x", i) for i in range(30)])
        await check()
        await log.trim("a", max_len=20)
        await log.close("b")  # the end entry is an event too
        await check()
        await log.trim("b", max_len=1)  # a closed stream keeps its end entry
        await log.append("c", [NewEvent("x", i) for i in range(500)])
        await check()
        conn = sqlite3.connect(path, isolation_level=None)
        try:  # one step of a purge, as another process's writer would run it
            conn.execute("BEGIN IMMEDIATE")
            assert op_purge_step(conn, "c", 100) is False
            conn.execute("COMMIT")
        finally:
            conn.close()
        await check()
        await log.purge("c", batch=100)
        await log.delete("a")
        await check()
        assert counted() == (1, 1)  # "b": its end entry


async def test_a_purge_goes_in_batches_and_lets_other_appends_through(tmp_path: Path) -> None:
    async with SQLiteEventLog(tmp_path / "batches.db") as log:
        await log.append("big", [NewEvent("x", i) for i in range(1000)])
        commits = log.commits
        purge = asyncio.ensure_future(log.purge("big", batch=100))
        await asyncio.sleep(0)  # let the purge queue its first step
        await log.append("other", NewEvent("x", 1))
        assert not purge.done(), "the append did not wait for the whole purge"
        await purge
        assert log.commits - commits >= 10
        with pytest.raises(StreamNotFound):
            await log.info("big")
        with pytest.raises(StreamNotFound):
            await log.purge("big")


class CountingPacer(Pacer):
    """Never pauses; counts the ends of steps it is told about."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.steps_ended = 0

    def pause_for(self, now: float) -> float:
        self.steps_ended += 1
        return 0.0


async def test_paced_deletions_pause_between_their_steps_and_not_after_the_last(
    tmp_path: Path,
) -> None:
    async with SQLiteEventLog(tmp_path / "paced.db") as log:
        names = [f"run-{i}" for i in range(10)]
        for name in names:
            await log.append(name, [NewEvent("x", BIG) for _ in range(20)])
        await log.append("big", [NewEvent("x", BIG) for _ in range(250)])
        one, many, reclaim = CountingPacer(), CountingPacer(), CountingPacer()
        with pacing.pacing(many):
            assert await log.purge_many(names, batch=100) == {}  # 200 events: 2 steps
        with pacing.pacing(one):
            await log.purge("big", batch=100)  # 3 steps
        assert (many.steps_ended, one.steps_ended) == (1, 2)
        free = (await log.storage_stats())["free_pages"]
        assert free > 64
        with pacing.pacing(reclaim):
            assert await log.reclaim_space(step=32) == free
        assert reclaim.steps_ended == -(-free // 32) - 1


async def test_appends_go_through_while_a_paced_deletion_pauses(tmp_path: Path) -> None:
    paused, resume = asyncio.Event(), asyncio.Event()

    async def held(delay: float) -> None:
        paused.set()
        await resume.wait()

    async with SQLiteEventLog(tmp_path / "gaps.db") as log:
        await log.append("big", [NewEvent("x", i) for i in range(300)])

        async def paced_purge() -> None:
            with pacing.pacing(Pacer(0.01, sleep=held)):
                await log.purge("big", batch=100)

        purge = asyncio.ensure_future(paced_purge())
        await asyncio.wait_for(paused.wait(), 5)
        result = await asyncio.wait_for(log.append("other", NewEvent("x", 1)), 5)
        assert result.last_id == 1 and not purge.done()
        assert (await log.info("big")).first_id == 101  # one step done, then the pause
        resume.set()
        await asyncio.wait_for(purge, 5)
        with pytest.raises(StreamNotFound):
            await log.info("big")


async def test_bulk_requests_commit_one_by_one_after_the_writes_queued_with_them(
    tmp_path: Path,
) -> None:
    """Deletion steps are bulk requests: a write queued behind several of them is
    committed in the next transaction, and each step in a transaction of its own."""
    async with SQLiteEventLog(tmp_path / "order.db") as log:
        started, gate = threading.Event(), threading.Event()
        order: list[str] = []

        def hold(conn: sqlite3.Connection) -> None:
            started.set()
            gate.wait(10)
            order.append("hold")

        def note(name: str) -> Callable[[sqlite3.Connection], None]:
            return lambda conn: order.append(name)

        held = asyncio.ensure_future(log._write("h", hold))
        assert await asyncio.to_thread(started.wait, 10)
        writes = [asyncio.ensure_future(log._write(n, note(n), bulk=True)) for n in "abc"]
        writes.append(asyncio.ensure_future(log._write("w", note("write"))))
        await asyncio.sleep(0)  # each queues its request
        assert log._queue.qsize() == 4
        commits = log.commits
        gate.set()
        await asyncio.gather(held, *writes)
        assert order == ["hold", "write", "a", "b", "c"]
        assert log.commits - commits == 5


async def test_a_stream_re_created_after_a_purge_starts_fresh(tmp_path: Path) -> None:
    async with SQLiteEventLog(tmp_path / "again.db") as log:
        first = await log.append("s", [NewEvent("x", i) for i in range(50)])
        await log.purge("s", batch=7)
        second = await log.append("s", NewEvent("y", 1))
        assert second.epoch != first.epoch
        page = await log.read("s")
        assert [(e.id, e.type) for e in page.events] == [(1, "y")]


async def test_small_streams_are_deleted_together_in_few_transactions(tmp_path: Path) -> None:
    async with SQLiteEventLog(tmp_path / "many.db") as log:
        names = [f"run-{i}" for i in range(10)]
        for name in names:
            await log.append(name, [NewEvent("x", i) for i in range(20)])
        await log.append("big", [NewEvent("x", i) for i in range(250)])
        await log.append("kept", NewEvent("x", 1))
        commits = log.commits
        # 10 x 20 events, then 250: budgets of 100 events per transaction.
        assert await log.purge_many([*names, "big"], batch=100) == {}
        assert log.commits - commits == 5  # 200 small + 250 big = 450 events, 100 a step
        assert [i.name for i in await log.list_streams()] == ["kept"]
        stats = await log.storage_stats()
        assert (stats["streams"], stats["events"]) == (1, 1)


async def test_followers_of_every_stream_of_a_step_are_woken_by_it(tmp_path: Path) -> None:
    # The poller (which would notice the deletion later) is made too slow to matter.
    async with SQLiteEventLog(tmp_path / "wake.db", poll_interval=3600) as log:
        for name in ("a", "b", "c"):
            await log.append(name, NewEvent("x", 1))
        parked = watching(log, {"c"})
        pending = asyncio.ensure_future(anext(log.follow("c", 1)))
        await asyncio.wait_for(parked.wait(), 5)
        assert await log.delete_many(["a", "b", "c"]) == {}
        with pytest.raises(StreamDeleted):
            await asyncio.wait_for(pending, 5)


async def test_a_failed_step_reports_the_streams_it_did_not_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SQLiteEventLog(tmp_path / "fail.db") as log:
        for name in ("a", "b", "c"):
            await log.append(name, [NewEvent("x", i) for i in range(10)])
        real = space.op_purge_many_step
        calls = 0

        def second_step_fails(conn: sqlite3.Connection, names: list[str], batch: int) -> int:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise sqlite3.OperationalError("disk I/O error")
            return real(conn, names, batch)

        monkeypatch.setattr(space, "op_purge_many_step", second_step_fails)
        failed = await log.purge_many(["a", "b", "c"], batch=10)
        assert sorted(failed) == ["b", "c"]
        assert all(isinstance(e, BackendError) for e in failed.values())
        # The failed step changed nothing.
        assert [i.name for i in await log.list_streams()] == ["b", "c"]
        assert (await log.info("b")).last_id == 10
