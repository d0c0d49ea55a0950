"""Where run records live: one RunStore per backend, sharing the backend's URL."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from runstream.runs.lifecycle import RunStatus
from runstream.runs.model import RunRecord


class RunStore(ABC):
    """Durable run records with atomic, lifecycle-checked status changes.

    Implementations must make :meth:`transition` a compare-and-set: it reads
    the current status, checks the move with
    :func:`runstream.runs.lifecycle.check_transition` and writes in one atomic
    step, so two servers cannot both finish (or both start) the same run.
    """

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    @abstractmethod
    async def create(self, record: RunRecord) -> RunRecord:
        """Store a new run (status ``queued``). The id must be new."""

    @abstractmethod
    async def get(self, run_id: str) -> RunRecord:
        """The run, or :class:`~runstream.errors.RunNotFound`."""

    @abstractmethod
    async def transition(
        self,
        run_id: str,
        new: RunStatus,
        *,
        expect: Iterable[RunStatus] | None = None,
        **fields: Any,
    ) -> RunRecord:
        """Move the run to ``new`` and set ``fields`` (exit_code, error, worker, ...) atomically.

        Raises :class:`~runstream.errors.IllegalTransition` if the table forbids
        the move or the current status is not in ``expect``.
        """

    @abstractmethod
    async def request_cancel(self, run_id: str) -> RunRecord:
        """Mark the run as cancel-requested (idempotent); a worker running it must stop it."""

    @abstractmethod
    async def list(
        self,
        *,
        status: RunStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """Runs newest first, filtered; returns the page and the cursor of the next page."""
