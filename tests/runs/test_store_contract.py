"""The RunStore contract. Every engine (memory, SQLite, Redis) must pass this file unchanged.

Run one engine with ``pytest tests/runs/test_store_contract.py -k sqlite``.
Engine-specific behaviour (files, keys, pub/sub, reconnects) is tested in
``test_store_local.py`` and ``test_store_redis.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import deque
from typing import Any

import pytest

from runstream.errors import IllegalTransition, RunNotFound, ValidationError
from runstream.runs.lifecycle import ALL_STATUSES, TRANSITIONS, RunStatus
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.store import (
    MAX_LIST_LIMIT,
    SETTABLE_FIELDS,
    RunStore,
    encode_cursor,
)
from tests.runs.conftest import RunStores


def make(
    task: str = "t", created_at: float = 1_700_000_000.25, run_id: str | None = None, **kw: Any
) -> RunRecord:
    return RunRecord(
        id=run_id or new_run_id(),
        task=task,
        params={"name": "wörld", "n": 3, "nested": [1, None, {"x": 1.5}]},
        status="queued",
        created_at=created_at,
        **kw,
    )


def _paths() -> dict[RunStatus, list[RunStatus]]:
    """The shortest walk from ``queued`` to every status, read off the lifecycle table."""
    paths: dict[RunStatus, list[RunStatus]] = {"queued": []}
    todo: deque[RunStatus] = deque(["queued"])
    while todo:
        current = todo.popleft()
        for target in sorted(TRANSITIONS[current]):
            if target not in paths:
                paths[target] = [*paths[current], target]
                todo.append(target)
    return paths


PATH_TO = _paths()
MOVES = [(a, b) for a in ALL_STATUSES for b in ALL_STATUSES]


async def run_in(store: RunStore, status: RunStatus, **kw: Any) -> RunRecord:
    """A new run brought to ``status`` through legal moves."""
    record = await store.create(make(**kw))
    for step in PATH_TO[status]:
        record = await store.transition(record.id, step)
    return record


async def all_pages(store: RunStore, limit: int, **filters: Any) -> list[str]:
    """Every run id ``list`` returns, following the cursors to the end."""
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list(limit=limit, cursor=cursor, **filters)
        assert len(page) <= limit
        seen.extend(r.id for r in page)
        if cursor is None:
            return seen
        assert len(page) == limit, "a page with a next cursor is full"
        assert len(seen) < 10_000, "the cursors never end"


def newest_first(records: list[RunRecord]) -> list[str]:
    return [r.id for r in sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)]


# -- create and get ----------------------------------------------------------------


async def test_create_returns_the_record_and_get_returns_it_field_for_field(
    run_store: RunStore,
) -> None:
    record = make(timeout=12.5, extra={"k": "v"})
    assert await run_store.create(record) == record
    got = await run_store.get(record.id)
    assert got == record
    assert (got.attempt, got.worker, got.cancel_requested, got.exit_code) == (1, None, False, None)


async def test_an_unknown_run_raises_run_not_found_everywhere(run_store: RunStore) -> None:
    await run_store.create(make())
    with pytest.raises(RunNotFound):
        await run_store.get("run-missing")
    with pytest.raises(RunNotFound):
        await run_store.transition("run-missing", "running")
    with pytest.raises(RunNotFound):
        await run_store.request_cancel("run-missing")


@pytest.mark.parametrize("status", [s for s in ALL_STATUSES if s != "queued"])
async def test_create_refuses_a_record_that_is_not_queued(
    run_store: RunStore, status: RunStatus
) -> None:
    record = dataclasses.replace(make(), status=status)
    with pytest.raises(ValidationError) as info:
        await run_store.create(record)
    assert info.value.field == "status"
    with pytest.raises(RunNotFound):
        await run_store.get(record.id)


async def test_create_refuses_an_existing_id_and_keeps_the_first_run(run_store: RunStore) -> None:
    first = await run_store.create(make(task="first"))
    with pytest.raises(ValidationError) as info:
        await run_store.create(dataclasses.replace(make(task="second"), id=first.id))
    assert info.value.field == "id"
    assert await run_store.get(first.id) == first
    assert [r.id for r in (await run_store.list())[0]] == [first.id]


BAD_RECORDS: list[tuple[str, Any]] = [
    # (field, a value the record must not hold)
    ("id", 5),
    ("id", "run-\udcff"),  # an unpaired surrogate is not text any engine can store
    ("task", None),
    ("task", "t\ud800"),
    ("params", [1, 2]),
    ("params", {"x": object()}),
    ("params", {"x": float("nan")}),
    ("params", {"x": {1, 2}}),
    ("created_at", "now"),
    ("created_at", float("nan")),
    ("created_at", float("inf")),
    ("created_at", True),
    ("timeout", "30"),
    ("exit_code", 1.5),
    ("error", b"bytes"),
    ("worker", 7),
    ("attempt", None),
    ("attempt", True),
    ("cancel_requested", 0),
    ("extra", None),
    ("extra", {"x": float("inf")}),
]


@pytest.mark.parametrize(("name", "value"), BAD_RECORDS, ids=[f"{n}={v!r}" for n, v in BAD_RECORDS])
async def test_create_refuses_a_field_of_the_wrong_type_and_stores_nothing(
    run_store: RunStore, name: str, value: Any
) -> None:
    record = dataclasses.replace(make(run_id="run-bad"), **{name: value})
    with pytest.raises(ValidationError) as info:
        await run_store.create(record)
    assert info.value.field == name
    assert (await run_store.list())[0] == []


ODD_PARAMS: dict[str, Any] = {
    "ascii": "plain",
    "": "the empty key",
    "emoji 😀": "🎉👩‍👩‍👧 family",
    "combining": "e\u0301 vs \u00e9",
    "rtl": "שלום عربى",
    "nul": "a\x00b",
    "controls": "\t\n\r\x1b[31mred\x7f",
    "separators": "\u2028\u2029\x85",
    "bom": "\ufeffx",
    "unpaired high surrogate": "\ud800",
    "unpaired low surrogate": "x\udcffy",
    "quotes": "\"'\\`",
    "cursor-like": "1.5|run-x",
    "braces": "{run-x}",
    "json text": '{"a": [1, 2]}',
    "big int": 2**70,
    "negative zero": -0.0,
    "a tenth": 0.1,
    "smallest": 5e-324,
    "largest": 1.7976931348623157e308,
    "bool is not int": [True, False, None, 1, 0, 1.0],
    "nested": {"a": [{"b": []}, {}], "z": {"y": {"x": "deep"}}},
    "long": "x" * 100_000,
}


async def test_params_and_extra_round_trip_exactly_through_every_read(
    run_stores: RunStores,
) -> None:
    store = await run_stores.open()
    record = dataclasses.replace(make(), params=ODD_PARAMS, extra={"echo": ODD_PARAMS})
    await store.create(record)
    moved = await store.transition(record.id, "running", worker="w")
    listed = (await store.list())[0][0]
    other = await (await run_stores.open()).get(record.id)
    # repr tells True from 1, -0.0 from 0.0 and key order, which == does not.
    for got in (await store.get(record.id), moved, listed, other):
        assert repr(got.params) == repr(ODD_PARAMS)
        assert repr(got.extra) == repr({"echo": ODD_PARAMS})
        assert list(got.params) == list(ODD_PARAMS)


async def test_params_can_be_replaced_by_a_transition_and_round_trip(run_store: RunStore) -> None:
    record = await run_store.create(make())
    moved = await run_store.transition(record.id, "running", params=ODD_PARAMS)
    assert repr(moved.params) == repr(ODD_PARAMS)
    assert repr((await run_store.get(record.id)).params) == repr(ODD_PARAMS)


ODD_TEXT = 'tâsk 😀 a\x00b | {x} "q" \\ \u2028 שלום'


async def test_text_fields_round_trip_exactly(run_store: RunStore) -> None:
    record = await run_store.create(make(task=ODD_TEXT, run_id="run-" + ODD_TEXT))
    await run_store.create(make(task="plain"))
    moved = await run_store.transition(record.id, "running", worker=ODD_TEXT, error=ODD_TEXT)
    got = await run_store.get(record.id)
    assert got == moved
    assert (got.id, got.task, got.worker, got.error) == (record.id, ODD_TEXT, ODD_TEXT, ODD_TEXT)
    only, _ = await run_store.list(task=ODD_TEXT)
    assert [r.id for r in only] == [record.id]


async def test_awkward_timestamps_round_trip_to_the_last_bit(run_store: RunStore) -> None:
    created = math.nextafter(1_700_000_000.123456, math.inf)
    record = await run_store.create(make(created_at=created, timeout=0.1 + 0.2))
    moved = await run_store.transition(
        record.id, "running", started_at=math.nextafter(created, math.inf)
    )
    got = await run_store.get(record.id)
    assert got == moved
    assert (got.created_at.hex(), got.timeout, got.started_at) == (
        created.hex(),
        0.1 + 0.2,
        math.nextafter(created, math.inf),
    )


async def test_changing_the_callers_params_after_create_does_not_change_the_run(
    run_store: RunStore,
) -> None:
    params: dict[str, Any] = {"items": [1, 2]}
    record = await run_store.create(dataclasses.replace(make(), params=params))
    params["items"].append(3)
    params["new"] = True
    assert (await run_store.get(record.id)).params == {"items": [1, 2]}


# -- transitions -------------------------------------------------------------------


@pytest.mark.parametrize(("current", "new"), MOVES, ids=[f"{a}->{b}" for a, b in MOVES])
async def test_every_move_follows_the_lifecycle_table(
    run_store: RunStore, current: RunStatus, new: RunStatus
) -> None:
    record = await run_in(run_store, current)
    if new in TRANSITIONS[current]:
        moved = await run_store.transition(record.id, new)
        assert moved == dataclasses.replace(record, status=new)
        assert await run_store.get(record.id) == moved
    else:
        with pytest.raises(IllegalTransition, match=f"from {current!r} to {new!r}"):
            await run_store.transition(record.id, new, worker="intruder")
        assert await run_store.get(record.id) == record


async def test_a_lost_run_goes_around_the_lifecycle_again_with_its_next_attempt(
    run_store: RunStore,
) -> None:
    record = await run_store.create(make())
    await run_store.transition(record.id, "running", worker="w1", started_at=10.0)
    await run_store.transition(record.id, "lost", error="worker vanished", finished_at=11.0)
    again = await run_store.transition(
        record.id, "queued", expect=["lost"], attempt=2, worker=None, error=None,
        started_at=None, finished_at=None,
    )  # fmt: skip
    assert again == dataclasses.replace(record, attempt=2)
    await run_store.transition(record.id, "running", worker="w2", started_at=12.0)
    done = await run_store.transition(
        record.id, "succeeded", match={"worker": "w2", "attempt": 2}, exit_code=0
    )
    assert (done.status, done.attempt, done.worker, done.exit_code) == ("succeeded", 2, "w2", 0)
    assert (done.started_at, done.finished_at) == (12.0, None)


async def test_a_transition_sets_only_the_given_fields_and_stamps_no_time(
    run_store: RunStore,
) -> None:
    record = await run_store.create(make(timeout=30.0, extra={"k": "v"}))
    running = await run_store.transition(record.id, "running", worker="w1", started_at=5.0)
    assert running == dataclasses.replace(record, status="running", worker="w1", started_at=5.0)
    failed = await run_store.transition(record.id, "failed", exit_code=3, error="boom")
    assert failed == dataclasses.replace(running, status="failed", exit_code=3, error="boom")
    assert failed.finished_at is None  # the caller says when; the store invents nothing
    assert failed.created_at == record.created_at
    assert await run_store.get(record.id) == failed


SETTABLE_SAMPLES: dict[str, Any] = {
    "params": {"replaced": ["by", "a", "transition"]},
    "timeout": 2.5,
    "exit_code": -9,
    "error": "boom",
    "started_at": 10.5,
    "finished_at": 11.5,
    "worker": "w-ü",
    "attempt": 3,
    "cancel_requested": True,
    "extra": {"k": [1, "v"]},
}


def test_every_settable_field_has_a_sample() -> None:
    assert set(SETTABLE_SAMPLES) == SETTABLE_FIELDS


@pytest.mark.parametrize("name", sorted(SETTABLE_SAMPLES))
async def test_every_settable_field_can_be_set_and_cleared(run_store: RunStore, name: str) -> None:
    record = await run_store.create(make())
    value = SETTABLE_SAMPLES[name]
    moved = await run_store.transition(record.id, "running", **{name: value})
    assert moved == dataclasses.replace(record, status="running", **{name: value})
    assert await run_store.get(record.id) == moved
    default = getattr(record, name)
    if default is None:
        cleared = await run_store.transition(record.id, "failed", **{name: None})
        assert getattr(cleared, name) is None
        assert await run_store.get(record.id) == cleared


BAD_TRANSITIONS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # (new status, fields, match, what the error names)
    ("finished", {}, {}, "unknown run status 'finished'"),
    ("running", {"colour": "red"}, {}, "run field 'colour' does not exist"),
    ("running", {}, {"colour": "red"}, "run field 'colour' does not exist"),
    ("running", {"id": "run-other"}, {}, "run field 'id' cannot be set"),
    ("running", {"status": "failed"}, {}, "run field 'status' cannot be set"),
    ("running", {"task": "other"}, {}, "run field 'task' cannot be set"),
    ("running", {"created_at": 1.0}, {}, "run field 'created_at' cannot be set"),
    ("running", {}, {"id": "x"}, "run field 'id' cannot be matched"),
    ("running", {}, {"status": "queued"}, "run field 'status' cannot be matched"),
]


@pytest.mark.parametrize(("new", "fields", "match", "message"), BAD_TRANSITIONS)
async def test_bad_transition_arguments_are_refused_and_the_run_is_kept(
    run_store: RunStore, new: str, fields: dict[str, Any], match: dict[str, Any], message: str
) -> None:
    record = await run_store.create(make())
    with pytest.raises(ValidationError, match=message):
        await run_store.transition(record.id, new, match=match, **fields)  # type: ignore[arg-type]
    assert await run_store.get(record.id) == record
    # Arguments are checked before the run is looked up.
    with pytest.raises(ValidationError, match=message):
        await run_store.transition("run-missing", new, match=match, **fields)  # type: ignore[arg-type]


BAD_VALUES: list[tuple[str, Any]] = [
    ("exit_code", "0"),
    ("exit_code", 1.5),
    ("exit_code", True),
    ("attempt", None),
    ("attempt", "2"),
    ("worker", 5),
    ("worker", "w\udcff"),
    ("error", b"boom"),
    ("error", "boom \ud800"),
    ("started_at", "now"),
    ("started_at", float("nan")),
    ("finished_at", float("inf")),
    ("timeout", True),
    ("cancel_requested", 1),
    ("cancel_requested", None),
    ("params", None),
    ("params", ["a", "list"]),
    ("params", {"x": object()}),
    ("params", {"x": float("nan")}),
    ("extra", {"x": {1, 2}}),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
async def test_a_value_of_the_wrong_type_is_refused_and_the_run_is_kept(
    run_store: RunStore, name: str, value: Any
) -> None:
    record = await run_store.create(make())
    with pytest.raises(ValidationError) as info:
        await run_store.transition(record.id, "running", **{name: value})
    assert info.value.field == name
    assert await run_store.get(record.id) == record
    # Values are checked before the run is looked up, and whatever the move.
    for run_id, new in (("run-missing", "running"), (record.id, "succeeded")):
        with pytest.raises(ValidationError) as info:
            await run_store.transition(run_id, new, **{name: value})  # type: ignore[arg-type]
        assert info.value.field == name


async def test_expect_refuses_a_status_outside_it_and_changes_nothing(
    run_store: RunStore,
) -> None:
    record = await run_store.create(make())
    with pytest.raises(IllegalTransition, match="expected one of"):
        await run_store.transition(record.id, "cancelled", expect=["running"], error="x")
    with pytest.raises(IllegalTransition):
        await run_store.transition(record.id, "cancelled", expect=[])
    assert await run_store.get(record.id) == record
    moved = await run_store.transition(record.id, "cancelled", expect=("queued", "running"))
    assert moved.status == "cancelled"
    # A move the table forbids stays forbidden whatever ``expect`` says.
    with pytest.raises(IllegalTransition, match="from 'cancelled' to 'running'"):
        await run_store.transition(record.id, "running", expect=["cancelled"])


async def test_match_fences_out_a_worker_that_lost_the_run(run_store: RunStore) -> None:
    record = await run_store.create(make())
    # A fence on the current values passes, None included.
    await run_store.transition(record.id, "running", match={"worker": None}, worker="w1")
    await run_store.transition(record.id, "lost")
    await run_store.transition(record.id, "queued", attempt=2, worker=None)
    await run_store.transition(record.id, "running", worker="w2")
    before = await run_store.get(record.id)
    for fence in ({"worker": "w1", "attempt": 1}, {"worker": "w2", "attempt": 1},
                  {"worker": "w1"}, {"attempt": "2"}, {"worker": None}):  # fmt: skip
        with pytest.raises(IllegalTransition):
            await run_store.transition(record.id, "succeeded", match=fence, exit_code=0)
    with pytest.raises(IllegalTransition, match="worker"):
        await run_store.transition(record.id, "succeeded", match={"worker": "w1"})
    assert await run_store.get(record.id) == before
    ok = await run_store.transition(
        record.id, "succeeded", expect=["running"], match={"worker": "w2", "attempt": 2}
    )
    assert (ok.status, ok.worker, ok.attempt) == ("succeeded", "w2", 2)


async def test_match_may_fence_on_any_matchable_field(run_store: RunStore) -> None:
    record = await run_store.create(make(task="fenced", timeout=5.0))
    with pytest.raises(IllegalTransition):
        await run_store.transition(record.id, "running", match={"task": "other"})
    with pytest.raises(IllegalTransition):
        await run_store.transition(record.id, "running", match={"params": {"n": 3}})
    fence = {"task": "fenced", "params": record.params, "cancel_requested": False}
    # Numbers compare as numbers: 5 matches the 5.0 stored.
    moved = await run_store.transition(record.id, "running", match={**fence, "timeout": 5})
    assert moved.status == "running"


# -- cancel requests ---------------------------------------------------------------


@pytest.mark.parametrize("status", ALL_STATUSES)
async def test_request_cancel_sets_only_the_flag_in_any_status_and_is_idempotent(
    run_store: RunStore, status: RunStatus
) -> None:
    record = await run_in(run_store, status)
    flagged = await run_store.request_cancel(record.id)
    assert flagged == dataclasses.replace(record, cancel_requested=True)
    assert await run_store.request_cancel(record.id) == flagged
    assert await run_store.get(record.id) == flagged


async def test_the_cancel_flag_outlives_transitions_until_a_retry_clears_it(
    run_store: RunStore,
) -> None:
    record = await run_store.create(make())
    await run_store.request_cancel(record.id)
    assert (await run_store.transition(record.id, "running")).cancel_requested
    assert (await run_store.transition(record.id, "lost")).cancel_requested
    again = await run_store.transition(record.id, "queued", attempt=2, cancel_requested=False)
    assert not again.cancel_requested
    assert not (await run_store.get(record.id)).cancel_requested


# -- listing -----------------------------------------------------------------------


async def test_listing_an_empty_store_gives_an_empty_last_page(run_store: RunStore) -> None:
    assert await run_store.list() == ([], None)
    assert await run_store.list(status="running", task="t", limit=1) == ([], None)


@pytest.mark.parametrize("limit", [1, 2, 3, 9, 10, MAX_LIST_LIMIT])
async def test_pages_list_every_run_once_newest_first(run_store: RunStore, limit: int) -> None:
    records = [await run_store.create(make(created_at=100.0 + (i * 7) % 9)) for i in range(9)]
    expected = newest_first(records)
    assert await all_pages(run_store, limit) == expected
    first, cursor = await run_store.list(limit=limit)
    assert [r.id for r in first] == expected[:limit]
    assert (cursor is None) == (limit >= len(records))


async def test_runs_created_at_the_same_time_are_ordered_by_id_descending(
    run_store: RunStore,
) -> None:
    ids = ["a", "b", "B", "run-1", "run-10", "run-2", "run|x", "é", "z", "😀", "\x00"]
    for rid in ids:
        await run_store.create(make(created_at=5.0, run_id=rid))
    older = await run_store.create(make(created_at=4.0, run_id="zzz"))
    expected = [*sorted(ids, reverse=True), older.id]
    assert [r.id for r in (await run_store.list())[0]] == expected
    for limit in (1, 2, 5):
        assert await all_pages(run_store, limit) == expected


async def test_pages_tell_apart_times_one_bit_apart(run_store: RunStore) -> None:
    t = 1_700_000_000.5
    times = [t, math.nextafter(t, 0), math.nextafter(t, math.inf), -1.5, 0.0, 1e-300]
    records = [await run_store.create(make(created_at=x)) for x in times]
    assert await all_pages(run_store, 1) == newest_first(records)


async def test_list_filters_by_status_task_or_both_and_pages_the_result(
    run_store: RunStore,
) -> None:
    records = [
        await run_store.create(make(task="a" if i % 2 else "b", created_at=1000.0 + i))
        for i in range(9)
    ]
    await run_store.transition(records[1].id, "running", worker="w")
    await run_store.transition(records[4].id, "cancelled")
    await run_store.transition(records[5].id, "running")

    def ids(*indices: int) -> list[str]:
        return [records[i].id for i in indices]

    assert await all_pages(run_store, 2, task="a") == ids(7, 5, 3, 1)
    assert await all_pages(run_store, 1, status="running") == ids(5, 1)
    assert await all_pages(run_store, 2, status="queued", task="b") == ids(8, 6, 2, 0)
    assert await all_pages(run_store, 3, status="cancelled", task="b") == ids(4)
    assert await all_pages(run_store, 3, status="cancelled", task="a") == []
    assert await all_pages(run_store, 3, task="nobody") == []


async def test_the_cursor_is_none_exactly_when_nothing_more_matches(run_store: RunStore) -> None:
    records = [await run_store.create(make(created_at=10.0 + i)) for i in range(4)]
    page, cursor = await run_store.list(limit=4)
    assert (len(page), cursor) == (4, None)
    page, cursor = await run_store.list(limit=2)
    page, cursor = await run_store.list(limit=2, cursor=cursor)
    assert ([r.id for r in page], cursor) == ([records[1].id, records[0].id], None)
    # Filtered: the last match is on a full page, with non-matching runs after it.
    await run_store.transition(records[3].id, "running")
    await run_store.transition(records[2].id, "running")
    page, cursor = await run_store.list(status="running", limit=2)
    assert ([r.id for r in page], cursor) == ([records[3].id, records[2].id], None)
    page, cursor = await run_store.list(status="running", limit=1)
    assert cursor is not None
    assert await run_store.list(status="running", limit=1, cursor=cursor) == (
        [await run_store.get(records[2].id)],
        None,
    )


async def test_the_default_page_holds_fifty_runs(run_store: RunStore) -> None:
    records = [await run_store.create(make(created_at=float(i))) for i in range(51)]
    page, cursor = await run_store.list()
    assert [r.id for r in page] == newest_first(records)[:50]
    assert cursor is not None
    rest, cursor = await run_store.list(cursor=cursor)
    assert ([r.id for r in rest], cursor) == ([records[0].id], None)


async def test_a_cursor_is_a_position_not_a_snapshot(run_store: RunStore) -> None:
    records = [await run_store.create(make(created_at=100.0 + i)) for i in range(6)]
    page, cursor = await run_store.list(status="queued", limit=2)
    assert [r.id for r in page] == [records[5].id, records[4].id]
    assert cursor is not None
    # A newer run does not shift later pages; a run that changed status is filtered at read time.
    await run_store.create(make(created_at=200.0))
    await run_store.transition(records[3].id, "running")
    await run_store.transition(records[5].id, "running")
    page, cursor = await run_store.list(status="queued", limit=2, cursor=cursor)
    assert [r.id for r in page] == [records[2].id, records[1].id]
    page, cursor = await run_store.list(status="queued", limit=2, cursor=cursor)
    assert ([r.id for r in page], cursor) == ([records[0].id], None)
    # Any position works as a cursor, whether or not a run sits there.
    page, _ = await run_store.list(cursor=encode_cursor(102.5, "run-anything"))
    assert [r.id for r in page] == [records[2].id, records[1].id, records[0].id]


BAD_LIST_ARGS: list[tuple[dict[str, Any], str]] = [
    ({"limit": 0}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": MAX_LIST_LIMIT + 1}, "limit"),
    ({"limit": 100_000}, "limit"),
    ({"limit": True}, "limit"),
    ({"limit": 1.5}, "limit"),
    ({"limit": "5"}, "limit"),
    ({"status": "done"}, "status"),
    ({"status": "done", "limit": 0}, "status"),
    ({"cursor": "garbage"}, "cursor"),
    ({"cursor": ""}, "cursor"),
    ({"cursor": "1.5|"}, "cursor"),
    ({"cursor": "|run-x"}, "cursor"),
    ({"cursor": "one|run-x"}, "cursor"),
    ({"cursor": "nan|run-x"}, "cursor"),
    ({"cursor": "inf|run-x"}, "cursor"),
    ({"cursor": "-inf|run-x"}, "cursor"),
    ({"cursor": "1e999|run-x"}, "cursor"),
]


@pytest.mark.parametrize(
    ("kwargs", "field"), BAD_LIST_ARGS, ids=[repr(a) for a, _ in BAD_LIST_ARGS]
)
async def test_list_refuses_bad_arguments(
    run_store: RunStore, kwargs: dict[str, Any], field: str
) -> None:
    await run_store.create(make())
    with pytest.raises(ValidationError) as info:
        await run_store.list(**kwargs)
    assert info.value.field == field


# -- sharing and concurrency -------------------------------------------------------


async def test_another_handle_sees_every_change_at_once(run_stores: RunStores) -> None:
    one, two = await run_stores.open(), await run_stores.open()
    record = await one.create(make())
    assert await two.get(record.id) == record
    moved = await two.transition(record.id, "running", worker="w2")
    assert await one.get(record.id) == moved
    flagged = await one.request_cancel(record.id)
    assert await two.get(record.id) == flagged
    assert (await two.list())[0] == [flagged]


async def test_concurrent_claims_of_one_run_let_exactly_one_win(run_stores: RunStores) -> None:
    stores = [await run_stores.open() for _ in range(4)]
    record = await stores[0].create(make())

    async def claim(i: int) -> str | None:
        try:
            await stores[i % 4].transition(record.id, "running", expect=["queued"], worker=f"w{i}")
        except IllegalTransition:
            return None
        return f"w{i}"

    winners = [w for w in await asyncio.gather(*(claim(i) for i in range(40))) if w]
    assert len(winners) == 1
    assert (await stores[1].get(record.id)).worker == winners[0]


async def test_racing_to_settle_a_run_only_one_outcome_stands(run_stores: RunStores) -> None:
    one, two = await run_stores.open(), await run_stores.open()
    ids = [(await run_in(one, "running")).id for _ in range(40)]

    async def settle(store: RunStore, run_id: str, status: RunStatus) -> RunStatus | None:
        try:
            await store.transition(run_id, status, expect=["running"], match={"attempt": 1})
        except IllegalTransition:
            return None
        return status

    results = await asyncio.gather(*(
        asyncio.gather(settle(one, rid, "succeeded"), settle(two, rid, "lost")) for rid in ids
    ))  # fmt: skip
    for rid, outcomes in zip(ids, results, strict=True):
        winners = [w for w in outcomes if w is not None]
        assert len(winners) == 1, (rid, outcomes)
        assert (await one.get(rid)).status == winners[0]
        assert (await two.get(rid)).status == winners[0]


async def test_concurrent_creates_of_one_id_let_exactly_one_win(run_stores: RunStores) -> None:
    one, two = await run_stores.open(), await run_stores.open()
    records = [make(task=f"t{i}", run_id="run-twin") for i in range(6)]

    async def create(i: int) -> RunRecord | str | None:
        try:
            return await (one, two)[i % 2].create(records[i])
        except ValidationError as exc:
            return exc.field

    outcomes = await asyncio.gather(*(create(i) for i in range(6)))
    created = [r for r in outcomes if isinstance(r, RunRecord)]
    assert len(created) == 1
    assert [r for r in outcomes if not isinstance(r, RunRecord)] == ["id"] * 5
    assert await one.get("run-twin") == created[0]
    assert (await two.list())[0] == created


async def test_a_cancel_request_is_not_lost_to_a_concurrent_transition(
    run_stores: RunStores,
) -> None:
    one, two = await run_stores.open(), await run_stores.open()
    records = [await one.create(make()) for _ in range(20)]
    await asyncio.gather(*(
        coro for r in records
        for coro in (one.transition(r.id, "running", worker="w"), two.request_cancel(r.id))
    ))  # fmt: skip
    for r in records:
        got = await two.get(r.id)
        assert (got.status, got.worker, got.cancel_requested) == ("running", "w", True)


# -- the store itself --------------------------------------------------------------


async def test_start_is_optional_the_first_call_opens_the_store(run_stores: RunStores) -> None:
    store = await run_stores.open(start=False)
    record = await store.create(make())
    assert await store.get(record.id) == record
    assert (await store.list())[0] == [record]


async def test_start_and_aclose_may_be_called_twice(run_stores: RunStores) -> None:
    store = await run_stores.open()
    await store.start()
    record = await store.create(make())
    assert await store.get(record.id) == record
    await store.aclose()
    await store.aclose()


async def test_runs_survive_closing_and_reopening_the_store(run_stores: RunStores) -> None:
    if not run_stores.durable:
        pytest.skip(f"{run_stores.engine}:// keeps runs only while the store is open")
    store = await run_stores.open()
    done = await run_in(store, "succeeded", created_at=1.0)
    running = await run_in(store, "running", created_at=2.0)
    flagged = await store.request_cancel((await store.create(make(created_at=3.0))).id)
    odd = await store.create(dataclasses.replace(make(created_at=4.0), params=ODD_PARAMS))
    before = (await store.list())[0]
    await run_stores.close_all()

    reopened = await run_stores.open()
    for record in (done, running, flagged, odd):
        assert await reopened.get(record.id) == record
    assert repr((await reopened.get(odd.id)).params) == repr(ODD_PARAMS)
    assert (await reopened.list())[0] == before
    assert (await reopened.transition(running.id, "failed", exit_code=1)).status == "failed"
