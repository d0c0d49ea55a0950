"""The in-process run store (``memory://``): tests and embedding."""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from runstream.errors import RunNotFound, ValidationError
from runstream.runs.lifecycle import FINISHED, RunStatus
from runstream.runs.model import RunRecord
from runstream.runs.store import (
    EndedRun,
    RunStore,
    apply_transition,
    check_deletable,
    check_ended_args,
    check_ids,
    check_list_args,
    check_new_record,
    decode_cursor,
    encode_cursor,
    json_copies,
    with_extra,
)

__all__ = ["MemoryRunStore"]

P = TypeVar("P", RunRecord, EndedRun)


class MemoryRunStore(RunStore):
    """Run records in a dict; for ``memory://``, tests and embedding. Not shared across processes.

    All methods run on the event loop without awaiting in between, so every
    transition is atomic by construction.
    """

    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}

    async def create(self, record: RunRecord) -> RunRecord:
        check_new_record(record)
        if record.id in self._runs:
            raise ValidationError(f"run {record.id} already exists", field="id")
        # Copies, as SQLite and Redis store them: the caller's dicts stay the caller's.
        copies = json_copies({"params": record.params, "extra": record.extra})
        self._runs[record.id] = dataclasses.replace(record, **copies)
        return record

    async def get(self, run_id: str) -> RunRecord:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunNotFound(f"run {run_id!r} does not exist") from None

    async def _move(
        self,
        run_id: str,
        new: RunStatus,
        expect: list[RunStatus] | None,
        match: Mapping[str, Any],
        fields: Mapping[str, Any],
    ) -> RunRecord:
        record = await self.get(run_id)
        updated = apply_transition(record, new, expect, match, json_copies(fields))
        self._runs[run_id] = updated
        return updated

    async def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"runs": float(len(self._runs))}
        for record in self._runs.values():
            key = f"runs_{record.status}"
            out[key] = out.get(key, 0.0) + 1
        return out

    async def _delete(self, run_id: str, expect: frozenset[RunStatus]) -> RunRecord:
        record = await self.get(run_id)
        check_deletable(record, expect)
        del self._runs[run_id]
        return record

    async def _set_extra(
        self, run_id: str, key: str, value: Any, expect: frozenset[RunStatus]
    ) -> RunRecord | None:
        record = await self.get(run_id)
        if record.status not in expect:
            return None
        extra = json_copies({"extra": with_extra(record, key, value)})["extra"]
        record = dataclasses.replace(record, extra=extra)
        self._runs[run_id] = record
        return record

    async def request_cancel(self, run_id: str) -> RunRecord:
        record = await self.get(run_id)
        if not record.cancel_requested:
            record = dataclasses.replace(record, cancel_requested=True)
            self._runs[run_id] = record
        return record

    async def ended(
        self,
        *,
        task: str | None = None,
        finished_before: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[EndedRun], str | None]:
        check_ended_args(task, finished_before, limit)

        def select(record: RunRecord) -> EndedRun | None:
            if record.status not in FINISHED or (task is not None and record.task != task):
                return None
            run = EndedRun.of(record)
            if finished_before is not None and run.ended_at >= finished_before:
                return None
            return run

        return self._page(cursor, limit, select)

    async def missing(self, ids: Iterable[str]) -> set[str]:
        return {run_id for run_id in check_ids(ids) if run_id not in self._runs}

    async def list(
        self,
        *,
        status: RunStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        check_list_args(status, limit)

        def select(record: RunRecord) -> RunRecord | None:
            if (status is not None and record.status != status) or (
                task is not None and record.task != task
            ):
                return None
            return record

        return self._page(cursor, limit, select)

    def _page(
        self, cursor: str | None, limit: int, select: Callable[[RunRecord], P | None]
    ) -> tuple[builtins.list[P], str | None]:
        """What ``select`` makes of the runs after ``cursor``, newest first (None: skip
        the run): a page and the cursor after it, None when no further run matches."""
        after = decode_cursor(cursor) if cursor is not None else None
        page: builtins.list[P] = []
        last: RunRecord | None = None
        for record in sorted(self._runs.values(), key=lambda r: (r.created_at, r.id), reverse=True):
            if after is not None and (record.created_at, record.id) >= after:
                continue
            item = select(record)
            if item is None:
                continue
            if last is not None and len(page) == limit:
                return page, encode_cursor(last.created_at, last.id)
            page.append(item)
            last = record
        return page, None
