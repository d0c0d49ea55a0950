"""Run stores for memory:// and sqlite: records, lifecycle-checked compare-and-set, paging."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runstream.backends.sqlite import SQLiteEventLog
from runstream.core.model import NewEvent
from runstream.errors import ConfigError, IllegalTransition, RunNotFound, ValidationError
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.store import RunStore, open_run_store
from runstream.runs.store_local import MemoryRunStore, SQLiteRunStore


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'rs.db'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[RunStore]:
    s = open_run_store(store_url)
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


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


async def test_create_and_get_round_trip_every_field(store: RunStore) -> None:
    record = make(timeout=30.0, extra={"k": "v"})
    await store.create(record)
    assert await store.get(record.id) == record
    with pytest.raises(ValidationError):
        await store.create(record)
    with pytest.raises(RunNotFound):
        await store.get("run-missing")


async def test_create_refuses_a_non_queued_record(store: RunStore) -> None:
    with pytest.raises(ValidationError):
        await store.create(RunRecord("r", "t", {}, "running", 1.0))


async def test_transition_sets_fields_and_follows_the_table(store: RunStore) -> None:
    record = await store.create(make())
    running = await store.transition(record.id, "running", worker="w1", started_at=5.0)
    assert (running.status, running.worker, running.started_at) == ("running", "w1", 5.0)
    done = await store.transition(record.id, "failed", exit_code=3, error="boom", finished_at=6.0)
    assert (done.status, done.exit_code, done.error) == ("failed", 3, "boom")
    assert await store.get(record.id) == done
    with pytest.raises(IllegalTransition):
        await store.transition(record.id, "running")
    assert (await store.get(record.id)).status == "failed"


async def test_transition_honours_expect_and_match(store: RunStore) -> None:
    record = await store.create(make())
    with pytest.raises(IllegalTransition):
        await store.transition(record.id, "cancelled", expect=("running",))
    await store.transition(record.id, "running", worker="w1")
    with pytest.raises(IllegalTransition, match="worker"):
        await store.transition(record.id, "succeeded", match={"worker": "w2"})
    ok = await store.transition(record.id, "succeeded", match={"worker": "w1", "attempt": 1})
    assert ok.status == "succeeded"


async def test_transition_refuses_unknown_or_immutable_fields(store: RunStore) -> None:
    record = await store.create(make())
    with pytest.raises(ValidationError):
        await store.transition(record.id, "running", colour="red")
    with pytest.raises(ValidationError):
        await store.transition(record.id, "running", id="other")
    with pytest.raises(RunNotFound):
        await store.transition("run-missing", "running")


async def test_lost_run_can_be_queued_again_with_the_next_attempt(store: RunStore) -> None:
    record = await store.create(make())
    await store.transition(record.id, "running", worker="w1")
    await store.transition(record.id, "lost", error="worker vanished")
    again = await store.transition(record.id, "queued", attempt=2, worker=None, error=None)
    assert (again.status, again.attempt, again.worker) == ("queued", 2, None)


async def test_request_cancel_is_idempotent(store: RunStore) -> None:
    record = await store.create(make())
    assert (await store.request_cancel(record.id)).cancel_requested
    assert (await store.request_cancel(record.id)).cancel_requested
    assert (await store.get(record.id)).status == "queued"
    with pytest.raises(RunNotFound):
        await store.request_cancel("run-missing")


async def test_list_is_newest_first_with_filters_and_cursor(store: RunStore) -> None:
    records = [await store.create(make(task="a" if i % 2 else "b", created_at=100.0 + i))
               for i in range(7)]  # fmt: skip
    # Two runs created in the same instant still page deterministically.
    twins = [await store.create(make(task="a", created_at=200.0)) for _ in range(2)]
    await store.transition(records[3].id, "running")
    expected = sorted([*records, *twins], key=lambda r: (r.created_at, r.id), reverse=True)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list(limit=2, cursor=cursor)
        seen.extend(r.id for r in page)
        if cursor is None:
            break
    assert seen == [r.id for r in expected]
    only_a, _ = await store.list(task="a", limit=100)
    assert [r.id for r in only_a] == [r.id for r in expected if r.task == "a"]
    running, more = await store.list(status="running")
    assert [r.id for r in running] == [records[3].id]
    assert more is None
    exact, more = await store.list(limit=len(expected))
    assert len(exact) == len(expected)
    assert more is None


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 100_000}, "limit"),
    ({"status": "done"}, "status"), ({"cursor": "garbage"}, "cursor"),
])  # fmt: skip
async def test_list_rejects_bad_arguments(
    store: RunStore, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await store.list(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# -- SQLite specifics ---------------------------------------------------------------


async def test_two_connections_racing_to_finish_a_run_only_one_wins(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    a, b = SQLiteRunStore.from_url(url), SQLiteRunStore.from_url(url)
    await a.start()
    await b.start()
    try:
        ids = []
        for _ in range(40):
            record = await a.create(make())
            await a.transition(record.id, "running")
            ids.append(record.id)

        async def attempt(store: SQLiteRunStore, run_id: str, status: str) -> str | None:
            try:
                await store.transition(run_id, status, expect=("running",))  # type: ignore[arg-type]
            except IllegalTransition:
                return None
            return status

        results = await asyncio.gather(*(
            asyncio.gather(attempt(a, rid, "succeeded"), attempt(b, rid, "lost")) for rid in ids
        ))  # fmt: skip
        for rid, (x, y) in zip(ids, results, strict=True):
            winners = [w for w in (x, y) if w is not None]
            assert len(winners) == 1, (rid, x, y)
            assert (await a.get(rid)).status == winners[0]
            assert (await b.get(rid)).status == winners[0]
    finally:
        await a.aclose()
        await b.aclose()


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


async def test_records_survive_reopening_the_file(tmp_path: Path) -> None:
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
