"""The run lifecycle table: every allowed move passes, everything else raises."""

from __future__ import annotations

import itertools

import pytest

from runstream.errors import IllegalTransition
from runstream.runs.lifecycle import (
    ALL_STATUSES,
    FINISHED,
    TERMINAL,
    RunStatus,
    can_transition,
    check_transition,
    is_status,
)

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
