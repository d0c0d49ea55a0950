"""The run lifecycle: the table, the status event of each move, and the moves' effects."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import runstream
from runstream.backends.base import EventLog
from runstream.backends.memory.log import MemoryEventLog
from runstream.errors import IllegalTransition, StreamClosed
from runstream.runs.lifecycle import (
    ALL_STATUSES,
    FINISHED,
    MAX_REASON,
    TERMINAL,
    EffectFailed,
    Lifecycle,
    RunStatus,
    can_transition,
    check_transition,
    close_reason,
    is_status,
    status_event,
    storable_text,
    wants_retry,
)
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.store import RunStore

ALLOWED: set[tuple[RunStatus, RunStatus]] = {
    ("queued", "running"),
    ("queued", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "timed_out"),
    ("running", "lost"),
    ("lost", "queued"),
}


@pytest.mark.parametrize(("current", "new"), sorted(ALLOWED))
def test_allowed_transition_passes(current: RunStatus, new: RunStatus) -> None:
    assert can_transition(current, new)
    check_transition("run-x", current, new)


ILLEGAL = sorted(set(itertools.product(ALL_STATUSES, ALL_STATUSES)) - ALLOWED)


@pytest.mark.parametrize(("current", "new"), ILLEGAL)
def test_every_other_transition_raises(current: RunStatus, new: RunStatus) -> None:
    assert not can_transition(current, new)
    with pytest.raises(IllegalTransition) as info:
        check_transition("run-x", current, new)
    assert "run-x" in str(info.value)
    assert info.value.http_status == 409


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_statuses_allow_nothing(status: RunStatus) -> None:
    assert not any(can_transition(status, other) for other in ALL_STATUSES)


def test_lost_ends_an_attempt_but_may_be_retried() -> None:
    assert "lost" in FINISHED
    assert "lost" not in TERMINAL
    assert can_transition("lost", "queued")


def test_is_status_knows_exactly_the_seven_statuses() -> None:
    assert all(is_status(s) for s in ALL_STATUSES)
    assert len(ALL_STATUSES) == 7
    assert not is_status("done")


# -- the status event of each move (no I/O) ---------------------------------------------


def record(status: RunStatus, **fields: Any) -> RunRecord:
    return RunRecord(id="run-x", task="t", params={}, status=status, created_at=1.0, **fields)


def test_status_events_have_the_documented_shapes() -> None:
    assert status_event(record("queued"), before=None) == {"status": "queued", "attempt": 1}
    assert status_event(record("running", worker="w", attempt=2), before="queued") == {
        "status": "running",
        "attempt": 2,
        "worker": "w",
    }
    assert status_event(record("queued", attempt=2), before="lost") == {
        "status": "queued",
        "attempt": 2,
        "retry": True,
    }
    assert status_event(record("lost", error="worker w is gone"), before="running") == {
        "status": "lost",
        "attempt": 1,
        "error": "worker w is gone",
    }
    assert status_event(record("succeeded", exit_code=0), before="running") == {
        "status": "succeeded",
        "attempt": 1,
        "exit_code": 0,
    }


def test_final_status_event_keys_keep_their_order_with_executor_extras() -> None:
    data = status_event(
        record("failed", exit_code=-9, error="killed by signal SIGKILL (9)"),
        before="running",
        extra={"duration": 1.5, "signal": 9},
    )
    assert json.dumps(data) == (
        '{"status": "failed", "attempt": 1, "exit_code": -9, "signal": 9, '
        '"error": "killed by signal SIGKILL (9)", "duration": 1.5}'
    )


def test_extras_cannot_override_what_the_record_says() -> None:
    with pytest.raises(ValueError, match="status"):
        status_event(record("failed"), before="running", extra={"status": "succeeded"})


def test_storable_text_replaces_only_what_utf8_cannot_hold() -> None:
    assert storable_text("plain ✓ text") == "plain ✓ text"
    assert storable_text("bad \udcff name \ud800") == "bad \ufffd name \ufffd"


def test_close_reason_is_the_error_cut_to_the_log_limit() -> None:
    assert close_reason(record("succeeded")) is None
    assert close_reason(record("failed", error="x" * (MAX_REASON + 5))) == "x" * MAX_REASON


@pytest.mark.parametrize(
    ("attempt", "retries", "cancel", "expected"),
    [(1, 0, False, False), (1, 1, False, True), (2, 1, False, False), (1, 3, True, False)],
)
def test_a_lost_run_is_retried_while_attempts_are_left_and_no_cancel_was_asked(
    attempt: int, retries: int, cancel: bool, expected: bool
) -> None:
    lost = record("lost", attempt=attempt, cancel_requested=cancel)
    assert wants_retry(lost, retries) is expected


# -- advance: the move and its effects ----------------------------------------------------


@pytest.fixture
async def log() -> AsyncIterator[EventLog]:
    async with MemoryEventLog() as backend:
        yield backend


async def created(lifecycle: Lifecycle) -> RunRecord:
    new = RunRecord(id=new_run_id(), task="t", params={}, status="queued", created_at=time.time())
    return await lifecycle.create(new)


async def statuses(log: EventLog, run_id: str) -> list[dict[str, Any]]:
    page = await log.read(run_id, 0, 100)
    return [e.data for e in page.events if e.type == "status"]


async def test_an_illegal_move_fails_at_the_table_before_the_store_is_asked(
    run_store: RunStore, log: EventLog
) -> None:
    lifecycle = Lifecycle(run_store, log)
    # The run does not exist: a store lookup would raise RunNotFound instead.
    with pytest.raises(IllegalTransition, match="cannot go from 'succeeded' to 'running'"):
        await lifecycle.advance("run-nowhere", "succeeded", "running")


async def test_a_move_records_its_status_event_and_a_terminal_one_closes_the_stream(
    run_store: RunStore, log: EventLog
) -> None:
    lifecycle = Lifecycle(run_store, log)
    run = await created(lifecycle)
    running = await lifecycle.advance(run.id, "queued", "running", worker="w")
    assert running.status == "running"
    assert not (await log.info(run.id)).closed
    final = await lifecycle.advance(
        run.id,
        "running",
        "failed",
        match={"worker": "w", "attempt": 1},
        exit_code=3,
        error="exited with code 3",
    )
    assert (final.status, final.exit_code) == ("failed", 3)
    assert await statuses(log, run.id) == [
        {"status": "queued", "attempt": 1},
        {"status": "running", "attempt": 1, "worker": "w"},
        {"status": "failed", "attempt": 1, "exit_code": 3, "error": "exited with code 3"},
    ]
    info = await log.info(run.id)
    assert (info.closed, info.close_status, info.close_reason) == (
        True,
        "failed",
        "exited with code 3",
    )


async def test_a_fenced_out_move_changes_nothing_and_has_no_effects(
    run_store: RunStore, log: EventLog
) -> None:
    lifecycle = Lifecycle(run_store, log)
    run = await created(lifecycle)
    await lifecycle.advance(run.id, "queued", "running", worker="w")
    with pytest.raises(IllegalTransition):
        await lifecycle.advance(run.id, "running", "succeeded", match={"worker": "other"})
    assert (await run_store.get(run.id)).status == "running"
    assert [d["status"] for d in await statuses(log, run.id)] == ["queued", "running"]
    assert not (await log.info(run.id)).closed


async def test_an_error_utf8_cannot_hold_is_stored_with_replacement_characters(
    run_store: RunStore, log: EventLog
) -> None:
    lifecycle = Lifecycle(run_store, log)
    run = await created(lifecycle)
    await lifecycle.advance(run.id, "queued", "running", worker="w")
    final = await lifecycle.advance(run.id, "running", "failed", error="no file b'\udcff'")
    assert final.error == "no file b'\ufffd'"
    assert (await run_store.get(run.id)).error == "no file b'\ufffd'"
    assert (await log.info(run.id)).close_reason == "no file b'\ufffd'"


async def test_a_lost_run_with_attempts_left_is_queued_again_on_its_open_stream(
    run_store: RunStore, log: EventLog
) -> None:
    lifecycle = Lifecycle(run_store, log)
    run = await created(lifecycle)
    await lifecycle.advance(run.id, "queued", "running", worker="w")
    lost = await lifecycle.advance(run.id, "running", "lost", error="worker w is gone")
    assert not (await log.info(run.id)).closed  # a retry may follow
    again = await lifecycle.settle_lost(lost, retries=1)
    assert (again.status, again.attempt, again.worker, again.error) == ("queued", 2, None, None)
    assert [d["status"] for d in await statuses(log, run.id)][-2:] == ["lost", "queued"]
    assert (await statuses(log, run.id))[-1] == {"status": "queued", "attempt": 2, "retry": True}
    assert not (await log.info(run.id)).closed
    # A second settler with the stale record finds the retry done: nothing moves twice.
    assert (await lifecycle.settle_lost(lost, retries=1)).attempt == 2
    assert [d["status"] for d in await statuses(log, run.id)].count("queued") == 2


async def test_a_lost_run_without_retries_closes_its_stream_as_lost(
    run_store: RunStore, log: EventLog
) -> None:
    lifecycle = Lifecycle(run_store, log)
    run = await created(lifecycle)
    await lifecycle.advance(run.id, "queued", "running", worker="w")
    lost = await lifecycle.advance(run.id, "running", "lost", error="worker w is gone")
    assert await lifecycle.settle_lost(lost, retries=0, announce=True) == lost
    assert [d["status"] for d in await statuses(log, run.id)] == [
        "queued", "running", "lost", "lost",
    ]  # fmt: skip
    info = await log.info(run.id)
    assert (info.closed, info.close_status, info.close_reason) == (True, "lost", "worker w is gone")


async def test_a_failed_effect_leaves_the_move_stored_and_strict_reports_it(
    run_store: RunStore, log: EventLog
) -> None:
    lifecycle = Lifecycle(run_store, log)
    first, second = await created(lifecycle), await created(lifecycle)
    for run in (first, second):
        await log.close(run.id)  # the stream refuses the status event from now on
    moved = await lifecycle.advance(first.id, "queued", "running", worker="w")
    assert moved.status == "running"
    with pytest.raises(EffectFailed) as info:
        await lifecycle.advance(second.id, "queued", "running", strict=True, worker="w")
    assert info.value.record.status == "running"
    assert isinstance(info.value.__cause__, StreamClosed)
    assert (await run_store.get(second.id)).status == "running"


def test_only_the_lifecycle_writes_status_events_or_closes_run_streams() -> None:
    package = Path(runstream.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path == package / "runs" / "lifecycle.py":
            continue
        text = path.read_text()
        if re.search(r"NewEvent\(\s*\"status\"", text) or re.search(r"\blog_?\.close\(", text):
            offenders.append(str(path.relative_to(package)))
    assert offenders == []
