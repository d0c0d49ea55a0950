"""What every RunStore shares: argument checks of ``transition``, the same on every store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runstream.errors import ValidationError
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.store import (
    MATCHABLE_FIELDS,
    RUN_FIELDS,
    SETTABLE_FIELDS,
    RunStore,
    check_transition_args,
    open_run_store,
)
from tests.conftest import RedisServer

BAD_TRANSITIONS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # (new status, fields, match, what the error names)
    ("finished", {}, {}, "unknown run status 'finished'"),
    ("running", {"colour": "red"}, {}, "run field 'colour' does not exist"),
    ("running", {}, {"colour": "red"}, "run field 'colour' does not exist"),
    ("running", {"task": "other"}, {}, "run field 'task' cannot be set"),
    ("running", {"created_at": 1.0}, {}, "run field 'created_at' cannot be set"),
    ("running", {}, {"id": "x"}, "run field 'id' cannot be matched"),
    ("running", {}, {"status": "queued"}, "run field 'status' cannot be matched"),
]


def test_field_sets_follow_the_record() -> None:
    assert set(RUN_FIELDS) >= SETTABLE_FIELDS | MATCHABLE_FIELDS
    assert {"worker", "attempt", "exit_code", "error"} <= SETTABLE_FIELDS
    assert not {"id", "status"} & (SETTABLE_FIELDS | MATCHABLE_FIELDS)
    assert "task" in MATCHABLE_FIELDS and "task" not in SETTABLE_FIELDS


@pytest.mark.parametrize(("new", "fields", "match", "message"), BAD_TRANSITIONS)
def test_bad_transition_arguments_are_refused(
    new: str, fields: dict[str, Any], match: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        check_transition_args(new, fields, match)


def test_good_transition_arguments_pass() -> None:
    check_transition_args("running", {"worker": "w1", "attempt": 2}, {"worker": None})


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunStore]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        url = f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}"
    store = open_run_store(url)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.mark.parametrize(("new", "fields", "match", "message"), BAD_TRANSITIONS)
async def test_every_store_refuses_bad_transitions_alike_and_keeps_the_run(
    any_store: RunStore, new: str, fields: dict[str, Any], match: dict[str, Any], message: str
) -> None:
    record = RunRecord(id=new_run_id(), task="t", params={}, status="queued", created_at=1000.0)
    await any_store.create(record)
    with pytest.raises(ValidationError, match=message):
        await any_store.transition(record.id, new, match=match, **fields)  # type: ignore[arg-type]
    assert await any_store.get(record.id) == record
