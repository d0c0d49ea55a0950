"""The argument checks every RunStore shares (store.py); the stores themselves are held to
test_store_contract.py."""

from __future__ import annotations

from typing import Any

import pytest

from runstream.errors import ValidationError
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.store import (
    MATCHABLE_FIELDS,
    RUN_FIELDS,
    SETTABLE_FIELDS,
    check_field,
    check_new_record,
    check_transition_args,
    decode_cursor,
    encode_cursor,
)

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


def test_every_run_field_has_a_kind() -> None:
    record = RunRecord(id=new_run_id(), task="t", params={}, status="queued", created_at=1.0)
    for name in RUN_FIELDS:
        check_field(name, getattr(record, name))  # KeyError if a field has no kind
    check_new_record(record)


@pytest.mark.parametrize("position", [0.0, -1.5, 1e-300, 1_700_000_000.123456789, 2.0**60])
def test_a_cursor_round_trips_any_finite_position(position: float) -> None:
    for run_id in ("run-x", "run|with|bars", "é"):
        assert decode_cursor(encode_cursor(position, run_id)) == (position, run_id)
