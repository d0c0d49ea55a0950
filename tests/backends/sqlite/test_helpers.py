"""The SQLite log's helpers: the checkpointer (the WAL is copied into the file off the
writer thread), the write lock the log and the run store share, and the switch to WAL
mode of a file another process is opening at the same time."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from runstream.backends.sqlite.helpers import Checkpointer, switch_to_wal, write_lock
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.backends.sqlite.runstore import SQLiteRunStore
from runstream.core.model import NewEvent
from runstream.errors import ConfigError
from runstream.runs.model import RunRecord, new_run_id

LINE = "y" * 50_000


async def checkpointed(log: SQLiteEventLog, within: float = 20.0) -> None:
    """Wait until a checkpoint that started after the last commit has finished."""
    deadline = time.monotonic() + within
    while log.checkpointer is None or log.checkpointer.covered < log.commits:
        if time.monotonic() > deadline:
            raise AssertionError("no checkpoint covered the last commit")
        await asyncio.sleep(0.005)  # the checkpointer is a thread; its counter is polled


def wal_bytes(db: Path) -> int:
    return Path(f"{db}-wal").stat().st_size


def events_in_file_alone(db: Path, tmp_path: Path) -> int:
    """Events found in a copy of the database file without its WAL (0 if not even the
    schema was copied into it yet)."""
    copy = tmp_path / "copy.db"
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(copy)
    try:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE name = 'events'").fetchall()
        if not tables:
            return 0
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


async def test_commits_reach_the_database_file_by_the_checkpointer(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    async with SQLiteEventLog(db, checkpoint_interval=0.01) as log:
        for i in range(30):
            await log.append("s", NewEvent("x", i))
        await checkpointed(log)
        assert log.checkpointer is not None and log.checkpointer.checkpoints >= 1
        assert events_in_file_alone(db, tmp_path) == 30


async def test_the_writer_never_checkpoints_inside_a_commit(tmp_path: Path) -> None:
    # SQLite's own checkpoint would run after a commit that pushes the WAL past
    # 1,000 pages (4 MiB here), on the writer thread, holding the appends queued
    # behind it. With the checkpointer asleep, ~6 MiB stay in the WAL only.
    db = tmp_path / "w.db"
    async with SQLiteEventLog(db, checkpoint_interval=3600) as log:
        for _ in range(130):
            await log.append("s", NewEvent("x", LINE))
        assert wal_bytes(db) > 6_000_000
        assert events_in_file_alone(db, tmp_path) == 0


async def test_the_wal_starts_over_once_checkpointed_instead_of_growing(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    # The checkpoint is run by hand: with the thread running every few ms, one of its
    # checkpoints may hold the WAL just when the writer could start it over (it then
    # starts over a few appends later, and the file keeps their size on a slow machine).
    async with SQLiteEventLog(db, checkpoint_interval=3600) as log:
        assert log.checkpointer is not None
        for _ in range(40):  # ~2 MiB
            await log.append("s", NewEvent("x", LINE))
        await asyncio.to_thread(log.checkpointer.run_once)
        first = wal_bytes(db)
        for _ in range(40):
            await log.append("s", NewEvent("x", LINE))
        # The second half overwrote the first half's frames rather than following them.
        assert wal_bytes(db) < first * 1.5
        await asyncio.to_thread(log.checkpointer.run_once)
        assert events_in_file_alone(db, tmp_path) == 80


async def test_a_checkpoint_a_reader_held_back_is_finished_without_new_commits(
    tmp_path: Path,
) -> None:
    db = tmp_path / "r.db"
    async with SQLiteEventLog(db, checkpoint_interval=3600) as log:
        assert log.checkpointer is not None
        await log.append("s", NewEvent("x", 1))
        reader = sqlite3.connect(db, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchall()  # a snapshot of 1 event
        await log.append("s", NewEvent("x", 2))
        await asyncio.to_thread(log.checkpointer.run_once)
        assert log.checkpointer.covered < log.commits, "the reader's snapshot held frames back"
        reader.execute("COMMIT")
        reader.close()
        await asyncio.to_thread(log.checkpointer.run_once)  # nothing committed since
        assert log.checkpointer.covered == log.commits
        assert events_in_file_alone(db, tmp_path) == 2


async def test_close_stops_the_checkpointer_thread(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "t.db", checkpoint_interval=0.01)
    async with log:
        await log.append("s", NewEvent("x", 1))
        assert any(t.name.startswith("runstream-sqlite-checkpoint") for t in threading.enumerate())
    assert log.checkpointer is None
    assert not any(t.name.startswith("runstream-sqlite-checkpoint") for t in threading.enumerate())


def test_a_checkpoint_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint_interval"):
        SQLiteEventLog(tmp_path / "x.db", checkpoint_interval=0)


def test_a_failing_checkpoint_is_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = sqlite3.connect(tmp_path / "f.db", check_same_thread=False)
    broken.close()  # every statement now fails with sqlite3.ProgrammingError
    commits = 3
    checkpointer = Checkpointer(broken, lambda: commits, interval=0.5, name="test-checkpoint")
    with caplog.at_level(logging.WARNING, logger="runstream.backends"):
        checkpointer.run_once()
        checkpointer.run_once()
        assert (checkpointer.failures, checkpointer.covered) == (2, 0)
        assert len(caplog.records) == 1 and "checkpoint failed" in caplog.records[0].message
        checkpointer.conn = sqlite3.connect(tmp_path / "f.db", check_same_thread=False)
        checkpointer.run_once()
    assert (checkpointer.checkpoints, checkpointer.covered) == (1, 3)
    assert "works again after 2 failures" in caplog.records[-1].message
    checkpointer.close()  # never started: closes the connection only


# -- the in-process write lock ------------------------------------------------------------


def test_every_writer_of_one_file_gets_the_same_lock(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    lock = write_lock(tmp_path / "sub" / "x.db")
    assert write_lock(str(tmp_path / "link" / "x.db")) is lock
    assert write_lock(tmp_path / "sub" / ".." / "sub" / "x.db") is lock
    assert write_lock(tmp_path / "other.db") is not lock


async def test_the_log_and_the_run_store_take_turns_on_the_write_lock(tmp_path: Path) -> None:
    # Queued on the lock, not sleeping in SQLite's busy handler: both writes wait
    # while it is held, and go through as soon as it is released.
    db = tmp_path / "l.db"
    store = SQLiteRunStore(db)
    async with SQLiteEventLog(db) as log:
        await store.start()
        try:
            record = RunRecord(new_run_id(), "t", {}, "queued", time.time())
            lock = write_lock(db)
            lock.acquire()
            try:
                append = asyncio.ensure_future(log.append("s", NewEvent("x", 1)))
                create = asyncio.ensure_future(store.create(record))
                await asyncio.sleep(0.05)  # a negative check: nothing to await
                assert not append.done() and not create.done()
            finally:
                lock.release()
            assert (await append).last_id == 1
            await create
            assert (await store.get(record.id)).status == "queued"
        finally:
            await store.aclose()


def locked_new_file(path: Path) -> sqlite3.Connection:
    """A file not yet in WAL mode with a write transaction open on it, as another server
    process leaves it while it creates its tables."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN IMMEDIATE")
    return holder


@pytest.mark.parametrize("opener", [SQLiteEventLog, SQLiteRunStore])
async def test_a_new_file_another_process_is_writing_is_waited_for_not_refused(
    tmp_path: Path, opener: type[SQLiteEventLog] | type[SQLiteRunStore]
) -> None:
    # SQLite refuses the switch to WAL at once here, without its busy handler: one of two
    # `serve --processes 2` children starting on a new file used to exit.
    path = tmp_path / "new.db"
    holder = locked_new_file(path)
    opened = opener(path)
    start = asyncio.ensure_future(opened.start())
    await asyncio.sleep(0.2)  # long enough to meet the lock (it used to fail at once)
    assert not start.done(), "start gave up while the other connection held the file"
    holder.execute("ROLLBACK")
    holder.close()
    await start
    try:
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        await opened.aclose()


def test_the_switch_to_wal_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    holder = locked_new_file(tmp_path / "held.db")
    conn = sqlite3.connect(tmp_path / "held.db", isolation_level=None, timeout=0)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        switch_to_wal(conn, 0.1)
    assert time.monotonic() - started >= 0.05
    holder.execute("ROLLBACK")
    assert switch_to_wal(conn, 0.1) == "wal"
    conn.close()
    holder.close()
