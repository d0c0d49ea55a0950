"""The RunStore contract for deleting runs, reading what retention may delete (``ended``,
``missing``) and noting why runs wait, on every engine.

Kept apart from ``test_store_contract.py`` (which is at the module size limit);
the same ``run_store`` fixture runs it on memory, SQLite and Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from runstream.errors import IllegalTransition, RunNotFound, ValidationError
from runstream.runs.lifecycle import ALL_STATUSES, FINISHED, RunStatus
from runstream.runs.store import EndedRun, RunStore
from tests.runs.conftest import RunStores
from tests.runs.test_store_contract import make, run_in


@pytest.mark.parametrize("status", sorted(FINISHED))
async def test_an_ended_run_is_deleted_and_gone_from_get_and_list(
    run_store: RunStore, status: RunStatus
) -> None:
    keep = await run_in(run_store, "succeeded")
    gone = await run_in(run_store, status)
    assert await run_store.delete(gone.id) == gone
    with pytest.raises(RunNotFound):
        await run_store.get(gone.id)
    assert [r.id for r in (await run_store.list())[0]] == [keep.id]
    assert [r.id for r in (await run_store.list(status=status))[0]] == (
        [keep.id] if status == "succeeded" else []
    )


@pytest.mark.parametrize("status", ["queued", "running"])
async def test_a_run_that_has_not_ended_is_never_deleted(
    run_store: RunStore, status: RunStatus
) -> None:
    record = await run_in(run_store, status)
    with pytest.raises(IllegalTransition):
        await run_store.delete(record.id)
    assert await run_store.get(record.id) == record


async def test_delete_of_an_unknown_run_raises_run_not_found(run_store: RunStore) -> None:
    with pytest.raises(RunNotFound):
        await run_store.delete("run-missing")


async def test_delete_may_be_allowed_in_other_statuses_and_refuses_unknown_ones(
    run_store: RunStore,
) -> None:
    record = await run_in(run_store, "queued")
    with pytest.raises(ValidationError):
        await run_store.delete(record.id, expect=["nope"])  # type: ignore[list-item]
    assert await run_store.delete(record.id, expect=ALL_STATUSES) == record


async def test_concurrent_deletes_of_one_run_let_exactly_one_win(run_stores: RunStores) -> None:
    store = await run_stores.open()
    other = await run_stores.open()
    record = await run_in(store, "failed")
    results = await asyncio.gather(
        store.delete(record.id), other.delete(record.id), return_exceptions=True
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert all(isinstance(r, RunNotFound) for r in results if isinstance(r, BaseException))


async def test_a_deleted_id_can_be_created_again(run_store: RunStore) -> None:
    record = await run_in(run_store, "cancelled")
    await run_store.delete(record.id)
    again = make(run_id=record.id, task="again")
    await run_store.create(again)
    assert (await run_store.get(record.id)).task == "again"


async def test_stats_count_the_runs(run_store: RunStore) -> None:
    await run_in(run_store, "queued")
    await run_in(run_store, "succeeded")
    stats = await run_store.stats()
    assert stats["runs"] == 2


# -- set_extra -----------------------------------------------------------------------


async def test_set_extra_notes_a_queued_run_and_removes_the_note_with_none(
    run_store: RunStore,
) -> None:
    record = await run_store.create(make(extra={"keep": 1}))
    noted = await run_store.set_extra(record.id, "waiting", "free memory 1.0 GiB < 2.0 GiB")
    assert noted is not None
    assert noted.extra == {"keep": 1, "waiting": "free memory 1.0 GiB < 2.0 GiB"}
    assert await run_store.get(record.id) == noted
    cleared = await run_store.set_extra(record.id, "waiting", None)
    assert cleared is not None and cleared.extra == {"keep": 1}
    assert (await run_store.get(record.id)).extra == {"keep": 1}


async def test_set_extra_changes_nothing_in_another_status(run_store: RunStore) -> None:
    record = await run_in(run_store, "running")
    assert await run_store.set_extra(record.id, "waiting", "x") is None
    assert await run_store.get(record.id) == record
    with pytest.raises(RunNotFound):
        await run_store.set_extra("run-missing", "waiting", "x")
    with pytest.raises(ValidationError):
        await run_store.set_extra(record.id, "waiting", float("nan"), expect=["running"])


async def test_delete_many_removes_the_ended_runs_and_skips_the_rest(run_store: RunStore) -> None:
    ended = [await run_in(run_store, s) for s in ("succeeded", "failed", "lost")]
    live = [await run_in(run_store, s) for s in ("queued", "running")]
    ids = [r.id for r in [*ended, *live]] + ["run-missing"]
    removed = await run_store.delete_many(ids)
    assert sorted(r.id for r in removed) == sorted(r.id for r in ended)
    assert sorted(r.id for r in (await run_store.list())[0]) == sorted(r.id for r in live)
    assert await run_store.delete_many([ended[0].id]) == []


async def test_delete_many_returns_the_records_in_the_order_asked_across_long_lists(
    run_store: RunStore,
) -> None:
    created = [await run_in(run_store, "succeeded") for _ in range(5)]
    # Asked in neither creation nor id order (the orders an SQL query may come back in).
    ended = [created[i] for i in (2, 0, 4, 1, 3)]
    # A long list, with the runs that exist spread through it.
    ids = [f"run-missing-{i}" for i in range(1_100)]
    ids[3], ids[501], ids[502], ids[503], ids[1_050] = (r.id for r in ended)
    ids.append(ended[0].id)  # asked twice: removed once
    removed = await run_store.delete_many(ids)
    assert removed == ended
    assert await run_store.list() == ([], None)


# -- ended and missing (what a retention pass reads) ---------------------------------


async def ended_at(store: RunStore, status: RunStatus, finished_at: float | None, **kw: Any) -> str:
    """A run brought from ``running`` to ``status``, with ``finished_at`` if given."""
    record = await run_in(store, "running", **kw)
    fields = {} if finished_at is None else {"finished_at": finished_at}
    return (await store.transition(record.id, status, **fields)).id


async def all_ended(store: RunStore, limit: int, **filters: Any) -> list[EndedRun]:
    seen: list[EndedRun] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.ended(limit=limit, cursor=cursor, **filters)
        assert len(page) <= limit
        seen.extend(page)
        if cursor is None:
            return seen
        assert len(page) == limit, "a page with a next cursor is full"
        assert len(seen) < 10_000, "the cursors never end"


async def test_ended_lists_only_runs_that_ended_newest_first_with_their_times(
    run_store: RunStore,
) -> None:
    t = 1_700_000_000.0
    ended = [
        await ended_at(run_store, status, t + 100 + i, created_at=t + i)
        for i, status in enumerate(sorted(FINISHED - {"lost"}))
    ]
    for i, status in enumerate(["queued", "running"]):
        await run_in(run_store, status, created_at=t + 50 + i)

    runs = await all_ended(run_store, 2)

    assert [r.id for r in runs] == ended[::-1]
    for r in runs:
        record = await run_store.get(r.id)
        assert r == EndedRun.of(record)
        assert (r.task, r.status, r.finished_at) == ("t", record.status, record.finished_at)


async def test_ended_filters_by_task_and_by_when_the_run_finished(run_store: RunStore) -> None:
    t = 1_700_000_000.0
    early = await ended_at(run_store, "succeeded", t + 10, created_at=t)
    late = await ended_at(run_store, "failed", t + 1000, created_at=t + 1)
    other = await ended_at(run_store, "succeeded", t + 10, created_at=t + 2, task="other")
    no_end_time = await ended_at(run_store, "cancelled", None, created_at=t + 3)

    assert [r.id for r in await all_ended(run_store, 10, task="t")] == [no_end_time, late, early]
    # Without a finished_at, the run counts as finished when it was created.
    before = await all_ended(run_store, 10, finished_before=t + 11)
    assert [r.id for r in before] == [no_end_time, other, early]
    assert [r.id for r in await all_ended(run_store, 1, task="t", finished_before=t + 11)] == [
        no_end_time,
        early,
    ]
    assert await all_ended(run_store, 10, finished_before=t) == []


async def test_ended_refuses_bad_arguments(run_store: RunStore) -> None:
    for bad in ({"limit": 0}, {"finished_before": float("nan")}, {"cursor": "nope"}):
        with pytest.raises(ValidationError):
            await run_store.ended(**bad)  # type: ignore[arg-type]


async def test_missing_names_the_ids_without_a_run(run_store: RunStore) -> None:
    kept = await run_in(run_store, "succeeded")
    gone = await run_in(run_store, "failed")
    await run_store.delete(gone.id)

    assert await run_store.missing([kept.id, gone.id, "run-never", gone.id]) == {
        gone.id,
        "run-never",
    }
    assert await run_store.missing([]) == set()
    many = [f"run-x{i}" for i in range(1200)]  # more than one engine query or round trip
    assert await run_store.missing([*many, kept.id]) == set(many)
    with pytest.raises(ValidationError):
        await run_store.missing([kept.id, 7])  # type: ignore[list-item]
