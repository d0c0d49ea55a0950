"""Every run status change, in one table.

The runner, the dispatchers, the HTTP API and the janitor all go through
:func:`check_transition`; an illegal move raises :class:`IllegalTransition`
instead of silently overwriting a final status.

::

    queued ──► running ──► succeeded | failed | cancelled | timed_out | lost
       │                                                             │
       └──► cancelled                       lost ──► queued (retry, if the task allows)
"""

from __future__ import annotations

from typing import Literal, TypeAlias

from runstream.errors import IllegalTransition

RunStatus: TypeAlias = Literal[
    "queued", "running", "succeeded", "failed", "cancelled", "timed_out", "lost"
]

ALL_STATUSES: tuple[RunStatus, ...] = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "lost",
)

TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "timed_out", "lost"}),
    "lost": frozenset({"queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
    "timed_out": frozenset(),
}

TERMINAL: frozenset[RunStatus] = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
"""Statuses after which nothing more happens. ``lost`` is final only when no retry follows."""

FINISHED: frozenset[RunStatus] = TERMINAL | {"lost"}
"""Statuses that end the current attempt. The run's stream is closed with a
terminal status, and with ``lost`` only when no retry follows: a retried run
keeps its stream open and appends ``lost`` then ``queued`` (``{"retry": true}``)
status events before the next attempt's output."""


def is_status(value: str) -> bool:
    return value in TRANSITIONS


def can_transition(current: RunStatus, new: RunStatus) -> bool:
    return new in TRANSITIONS[current]


def check_transition(run_id: str, current: RunStatus, new: RunStatus) -> None:
    """Raise :class:`IllegalTransition` unless ``current → new`` is in the table."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (final)"
        raise IllegalTransition(
            f"run {run_id}: cannot go from {current!r} to {new!r}; allowed: {allowed}"
        )
