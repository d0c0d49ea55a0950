"""The run record: one execution of a task."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from runstream.core.model import rfc3339

RunStatus: TypeAlias = Literal[
    "queued", "running", "succeeded", "failed", "cancelled", "timed_out", "lost"
]
"""A run's status; the moves between them are in :mod:`runstream.runs.lifecycle`."""

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
RUN_ID_RE = re.compile(f"^run-[{_CROCKFORD}]{{26}}$")
"""What :func:`new_run_id` returns (and nothing a run id is not)."""
RUN_ID_FIRST = "run-" + _CROCKFORD[0] * 26
RUN_ID_LAST = "run-" + _CROCKFORD[-1] * 26
"""Every run id sorts between these two names (inclusive)."""


def new_run_id() -> str:
    """A time-sortable run id (``run-`` + 10 time chars + 16 random chars, Crockford base32).

    It is a valid stream name: each run owns the stream of the same name.
    """
    ms = int(time.time() * 1000)
    head = "".join(_CROCKFORD[(ms >> (5 * i)) & 31] for i in range(9, -1, -1))
    rnd = int.from_bytes(os.urandom(10), "big")
    tail = "".join(_CROCKFORD[(rnd >> (5 * i)) & 31] for i in range(15, -1, -1))
    return f"run-{head}{tail}"


@dataclass(frozen=True, slots=True)
class RunRecord:
    """State of one run. Change it only through a RunStore transition."""

    id: str
    task: str
    params: dict[str, Any]
    status: RunStatus
    created_at: float
    timeout: float | None = None
    exit_code: int | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempt: int = 1
    cancel_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def ts(v: float | None) -> str | None:
            return rfc3339(v) if v is not None else None

        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "params": self.params,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "created_at": ts(self.created_at),
            "started_at": ts(self.started_at),
            "finished_at": ts(self.finished_at),
            "worker": self.worker,
            "attempt": self.attempt,
            "timeout": self.timeout,
            "cancel_requested": self.cancel_requested,
            "stream": self.id,
        }
        waiting = self.extra.get("waiting")
        if self.status == "queued" and isinstance(waiting, str):
            out["waiting"] = waiting  # why it has not started (a closed resource gate)
        return out
