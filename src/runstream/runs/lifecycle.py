"""Every run status change and its effects, in one module.

The table (:data:`TRANSITIONS`) says which moves exist; :class:`Lifecycle`
makes them. The runner, the dispatchers, the HTTP API and the janitors all go
through :meth:`Lifecycle.advance`; no other module writes a ``status`` event
or closes a run's stream.

::

    queued ──► running ──► succeeded | failed | cancelled | timed_out | lost
       │                                                             │
       └──► cancelled                       lost ──► queued (retry, if the task allows)

One move (:meth:`Lifecycle.advance`), in order:

1. the move is looked up in the table: an illegal one raises
   :class:`~runstream.errors.IllegalTransition` before any I/O;
2. the store's compare-and-set from ``current`` (and ``match``, the fence on
   worker and attempt); a refused move raises ``IllegalTransition`` and has
   no effects;
3. the ``status`` event (:func:`status_event`) is appended to the run's stream;
4. if the run is now terminal, the stream is closed with the status (the
   error, cut to :data:`MAX_REASON`, as reason). A ``lost`` run is closed by
   :meth:`Lifecycle.settle_lost`, and only if no retry follows;
5. the move is announced on the runs feed (:mod:`runstream.runs.feed`):
   ``created``, ``status`` or ``ended``.

Steps 3 to 5 happen after the record changed, and the record is the truth:
their failures are logged and the move stands (a finished run's stream left
open is closed later by :meth:`Lifecycle.close_finished`, which the hub's end
check and the Redis janitor call; a missing announcement is made later by
:class:`~runstream.runs.feed.FeedRepair`). With ``strict=True`` the run's own
effects (3, 4) are still attempted, then :class:`EffectFailed` (carrying the
moved record) is raised: for a caller that must not go on as if they had
happened. The announcement never fails a move, strict or not.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, Protocol

from runstream.backends.base import EventLog
from runstream.core.model import NewEvent
from runstream.errors import BackendError, IllegalTransition, RunstreamError, StreamNotFound
from runstream.runs.feed import announce
from runstream.runs.model import RunRecord, RunStatus

__all__ = [
    "ALL_STATUSES",
    "FINISHED",
    "MAX_REASON",
    "TERMINAL",
    "TRANSITIONS",
    "EffectFailed",
    "Lifecycle",
    "RunStatus",
    "can_transition",
    "check_transition",
    "close_reason",
    "is_status",
    "status_event",
    "storable_text",
    "wants_retry",
]

log = logging.getLogger("runstream.runs")

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

MAX_REASON = 1000
"""Close reasons are limited to this many characters by the EventLog."""

_EVENT_ORDER = ("status", "attempt", "worker", "retry", "exit_code", "signal", "error", "duration")
"""Key order of a status event's data (its JSON is part of what followers see)."""

_SURROGATE = re.compile("[\ud800-\udfff]")


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


# -- decisions (no I/O) -------------------------------------------------------------


def storable_text(text: str) -> str:
    """``text`` with every code point UTF-8 cannot hold (a lone surrogate) replaced by U+FFFD.

    Exception messages may carry them (e.g. a file name decoded with
    ``surrogateescape``); the run stores and the event log refuse them.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def status_event(
    record: RunRecord, *, before: RunStatus | None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The data of the ``status`` event announcing ``record`` (just moved from ``before``).

    Always ``status`` and ``attempt``; ``worker`` for ``running``; ``"retry":
    true`` for a ``lost → queued`` retry; ``exit_code`` and ``error`` when the
    record has them. ``extra`` adds what the store does not keep (the
    executor's ``signal`` and ``duration``); it cannot override those keys.
    """
    data: dict[str, Any] = {"status": record.status, "attempt": record.attempt}
    if record.status == "running":
        data["worker"] = record.worker
    elif record.status == "queued":
        if before == "lost":
            data["retry"] = True
    else:
        if record.exit_code is not None:
            data["exit_code"] = record.exit_code
        if record.error is not None:
            data["error"] = record.error
    for key, value in (extra or {}).items():
        if key in data or key in ("status", "attempt", "worker", "retry"):
            raise ValueError(f"status event key {key!r} comes from the record")
        data[key] = value
    rank = {key: i for i, key in enumerate(_EVENT_ORDER)}
    return {key: data[key] for key in sorted(data, key=lambda k: rank.get(k, len(rank)))}


def close_reason(record: RunRecord) -> str | None:
    """The reason a finished run's stream is closed with: its error, cut to :data:`MAX_REASON`."""
    return record.error[:MAX_REASON] if record.error else None


def wants_retry(record: RunRecord, retries: int) -> bool:
    """Whether a ``lost`` run gets another attempt: attempts left and no cancel requested."""
    return record.status == "lost" and record.attempt <= retries and not record.cancel_requested


# -- effects ---------------------------------------------------------------------------


class EffectFailed(BackendError):
    """The move is stored, but its status event or the stream close failed (``strict``).

    ``record`` is the record as moved; ``__cause__`` is the first failure.
    """

    def __init__(self, record: RunRecord, what: str, cause: RunstreamError) -> None:
        super().__init__(f"run {record.id} is {record.status}, but {what} failed: {cause}")
        self.record = record


class RunRecords(Protocol):
    """What :class:`Lifecycle` needs of a :class:`~runstream.runs.store.RunStore`."""

    async def create(self, record: RunRecord) -> RunRecord: ...

    async def get(self, run_id: str) -> RunRecord: ...

    async def transition(
        self,
        run_id: str,
        new: RunStatus,
        *,
        expect: Iterable[RunStatus] | None = None,
        match: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> RunRecord: ...

    async def delete(self, run_id: str, *, expect: Iterable[RunStatus] = ...) -> RunRecord: ...

    async def delete_many(
        self, run_ids: Iterable[str], *, expect: Iterable[RunStatus] = ...
    ) -> list[RunRecord]: ...


class Lifecycle:
    """Moves runs of one store and writes the effects to one event log. Cheap; share or not."""

    def __init__(self, store: RunRecords, log: EventLog) -> None:
        self.store = store
        self.log = log
        self.announce_failures = 0
        """Runs-feed announcements that failed (each is repaired later)."""

    async def create(self, record: RunRecord) -> RunRecord:
        """Store a new ``queued`` run and open its stream with the first ``status`` event.

        Raises what the store or the log raise (the record may then exist
        without its stream: nothing was dispatched, the caller reports the failure).
        """
        await self.store.create(record)
        await self.log.append(record.id, NewEvent("status", status_event(record, before=None)))
        await self._announce(record, None, final=False)
        return record

    async def advance(
        self,
        run_id: str,
        current: RunStatus,
        new: RunStatus,
        *,
        match: Mapping[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
        strict: bool = False,
        **fields: Any,
    ) -> RunRecord:
        """Move the run ``current → new``, set ``fields``, then write the move's effects.

        ``match`` fences the move (see :meth:`RunStore.transition`); an
        ``error`` field is made storable (:func:`storable_text`); ``event``
        adds keys to the status event (see :func:`status_event`). Returns the
        record as moved.

        Raises :class:`IllegalTransition` if the table forbids the move (before
        any I/O) or the store refuses it (the run is not ``current``, or
        ``match`` fails: nothing was written); what the store raises; with
        ``strict``, :class:`EffectFailed` after the move if an effect failed.
        After a move to ``lost`` the caller must call :meth:`settle_lost`.
        """
        check_transition(run_id, current, new)
        if isinstance(fields.get("error"), str):
            fields["error"] = storable_text(fields["error"])
        record = await self.store.transition(run_id, new, expect=(current,), match=match, **fields)
        data = status_event(record, before=current, extra=event)
        failure = await self._effect(record, "its status event", self._append(record, data))
        if new in TERMINAL:
            # Closed even if the event failed: followers must learn that the run ended.
            closing = await self._effect(record, "closing its stream", self._close(record))
            failure = failure or closing
        await self._announce(record, current, final=new in TERMINAL)
        if strict and failure is not None:
            raise failure
        return record

    async def settle_lost(
        self, record: RunRecord, *, retries: int, announce: bool = False
    ) -> RunRecord:
        """After ``record`` moved to ``lost``: queue it again, or close its stream.

        If :func:`wants_retry` (``retries`` is the task's; 0 for a task this
        process does not know or a dead-lettered run), moves it ``lost → queued``
        with ``attempt + 1`` (fenced on the attempt; the stream stays open) and
        returns that record: the caller must dispatch it. Otherwise closes the
        stream with ``lost`` and returns ``record``. ``announce`` first appends
        the ``lost`` status event again, for a run found ``lost`` whose mover
        may have died before announcing it.
        """
        if announce:
            data = status_event(record, before="running")
            await self._effect(record, "its status event", self._append(record, data))
            await self._announce(record, "running", final=False)
        if not wants_retry(record, retries):
            await self._effect(record, "closing its stream", self._close(record))
            await self._announce(record, "running", final=True)
            return record
        try:
            return await self.advance(
                record.id,
                "lost",
                "queued",
                match={"attempt": record.attempt},
                attempt=record.attempt + 1,
                worker=None,
                started_at=None,
                finished_at=None,
                exit_code=None,
                error=None,
            )
        except IllegalTransition:
            return await self.store.get(record.id)  # another settler got there first

    async def close_finished(self, record: RunRecord) -> None:
        """Close the stream of a finished run (idempotent): the repair for a close that was lost.

        Its announcement on the runs feed is made again too (stored only if missing).
        Raises what the event log raises.
        """
        await self._close(record)
        await self._announce(record, None, final=True)

    async def delete(self, run_id: str) -> RunRecord:
        """Delete a run that ended: its record, then its stream. Returns the record removed.

        Raises :class:`~runstream.errors.RunNotFound`, or :class:`IllegalTransition`
        (nothing deleted) if the run has not ended (``queued``, ``running``):
        cancel it and wait for its end first. The record goes first (it is the
        truth); if deleting the stream then fails, the error is raised and the
        stream, an orphan, is removed by the next retention pass. Followers of
        the stream end (SSE ``end``, WebSocket close 4404); later reads get 404.
        """
        record = await self.store.delete(run_id, expect=FINISHED)
        with contextlib.suppress(StreamNotFound):  # never created, or already gone
            await self.log.delete(run_id)
        return record

    async def delete_many(self, run_ids: Iterable[str]) -> tuple[list[RunRecord], int]:
        """Delete the runs among ``run_ids`` that ended, records then streams, as a batch.

        Returns the records removed and how many of their streams could not be
        deleted (orphans, removed by the next retention pass; logged). Runs that
        do not exist or have not ended are skipped. The records go in one store
        call and the streams in one :meth:`EventLog.delete_many`, so SQLite writes the
        whole batch in a few transactions: appends to other streams wait for one of
        them at most.
        """
        records = await self.store.delete_many(run_ids, expect=FINISHED)
        failures = await self.log.delete_many(r.id for r in records)
        for run_id, error in failures.items():
            log.warning("run %s deleted, but deleting its stream failed: %s", run_id, error)
        return records, len(failures)

    async def _append(self, record: RunRecord, data: dict[str, Any]) -> None:
        await self.log.append(record.id, NewEvent("status", data))

    async def _close(self, record: RunRecord) -> None:
        await self.log.close(record.id, record.status, close_reason(record))

    async def _announce(
        self, record: RunRecord, previous: RunStatus | None, *, final: bool
    ) -> None:
        """Announce the move on the runs feed; a failure is logged and counted, never raised
        (:class:`~runstream.runs.feed.FeedRepair` makes the announcement later)."""
        try:
            await announce(self.log, record, previous, final=final)
        except RunstreamError as exc:
            self.announce_failures += 1
            log.warning(
                "run %s is %s, but announcing it on the runs feed failed: %s (it is repaired "
                "later)",
                record.id,
                record.status,
                exc,
            )

    async def _effect(
        self, record: RunRecord, what: str, action: Coroutine[Any, Any, None]
    ) -> EffectFailed | None:
        try:
            await action
        except RunstreamError as exc:
            log.warning("run %s is %s, but %s failed: %s", record.id, record.status, what, exc)
            failure = EffectFailed(record, what, exc)
            failure.__cause__ = exc
            return failure
        return None
