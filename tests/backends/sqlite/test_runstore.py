"""What is particular to the memory:// and sqlite: run stores (the shared contract is
test_store_contract.py): picking the store by URL, the SQLite file it shares."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from runstream.backends import open_run_store
from runstream.backends.memory import MemoryRunStore
from runstream.backends.sqlite import SQLiteRunStore
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.core.model import NewEvent
from runstream.errors import ConfigError
from runstream.runs.model import RunRecord, new_run_id


def make(task: str = "t", created_at: float = 1000.0, **kw: object) -> RunRecord:
    return RunRecord(
        id=new_run_id(), task=task, params={"a": [1, "x"]}, status="queued",
        created_at=created_at, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_factory_picks_the_store_by_scheme(tmp_path: Path) -> None:
    assert isinstance(open_run_store("memory://"), MemoryRunStore)
    sqlite_store = open_run_store(f"sqlite:///{tmp_path / 'x.db'}?busy_timeout=2")
    assert isinstance(sqlite_store, SQLiteRunStore)
    assert sqlite_store.busy_timeout == 2
    with pytest.raises(ConfigError):
        open_run_store("ftp://x")


async def test_runs_share_the_event_log_file_without_disturbing_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    log = SQLiteEventLog.from_url(url)
    store = SQLiteRunStore.from_url(url)
    async with log:
        await store.start()
        try:
            record = await store.create(make())
            await log.append(record.id, NewEvent("status", {"status": "queued"}))
            await store.transition(record.id, "running")
            assert (await log.info(record.id)).last_id == 1
        finally:
            await store.aclose()
    conn = sqlite3.connect(tmp_path / "shared.db")
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        assert {"runs", "streams", "events"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_a_store_made_from_a_path_opens_on_first_use_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "reopen.db"
    first = SQLiteRunStore(path)
    record = await first.create(make())
    await first.transition(record.id, "running", worker="w")
    await first.aclose()
    second = SQLiteRunStore(path)
    try:
        got = await second.get(record.id)
        assert (got.status, got.worker, got.params) == ("running", "w", {"a": [1, "x"]})
    finally:
        await second.aclose()
