"""Where run records live: one RunStore per backend, sharing the backend's URL."""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from runstream.errors import IllegalTransition, RunNotFound, ValidationError
from runstream.runs.lifecycle import FINISHED, RunStatus, check_transition, is_status
from runstream.runs.model import RunRecord

RUN_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunRecord))
SETTABLE_FIELDS = frozenset(RUN_FIELDS) - {"id", "status", "task", "created_at"}
"""Fields a transition may change; the status only through its ``new`` argument."""
MATCHABLE_FIELDS = frozenset(RUN_FIELDS) - {"id", "status"}
"""Fields a transition's ``match`` may fence on (the status is fenced by ``expect``)."""
MAX_LIST_LIMIT = 1000
"""Most runs one :meth:`RunStore.list` page may hold."""

_KINDS: dict[str, str] = {
    "id": "text",
    "task": "text",
    "params": "object",
    "status": "status",
    "created_at": "number",
    "timeout": "number?",
    "exit_code": "integer?",
    "error": "text?",
    "started_at": "number?",
    "finished_at": "number?",
    "worker": "text?",
    "attempt": "integer",
    "cancel_requested": "bool",
    "extra": "object",
}
"""What each stored field may hold (``?``: or None); every engine can store exactly these."""

NUMBER_FIELDS = frozenset(name for name, kind in _KINDS.items() if kind.startswith("number"))
"""Fields holding a float (an int is accepted and equal to the same float)."""

_DESCRIPTIONS = {
    "text": "a string of valid Unicode (no unpaired surrogate)",
    "number": "a finite number",
    "integer": "a 64-bit integer",
    "bool": "true or false",
    "object": "a JSON-serialisable dict (no NaN or infinity)",
    "status": "a run status",
}


def _has_kind(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "text":
        if not isinstance(value, str):
            return False
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
        return True
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if isinstance(value, int):  # SQLite's integers are 64 bits
            return -(2**63) <= value < 2**63
        return kind == "number" and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "object":
        if not isinstance(value, dict):
            return False
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return False
        return True
    return isinstance(value, str) and is_status(value)


def check_field(name: str, value: Any) -> None:
    """Refuse (:class:`ValidationError`) a value that the field ``name`` cannot hold."""
    kind = _KINDS[name]
    if not _has_kind(value, kind):
        want = _DESCRIPTIONS[kind.rstrip("?")] + (" or None" if kind.endswith("?") else "")
        raise ValidationError(f"run field {name!r} must be {want}, not {value!r}", field=name)


def check_new_record(record: RunRecord) -> None:
    """Refuse (:class:`ValidationError`) a record :meth:`RunStore.create` must not store."""
    if record.status != "queued":
        raise ValidationError(
            f"run {record.id}: a new run must be 'queued', not {record.status!r}",
            field="status",
        )
    for name in RUN_FIELDS:
        check_field(name, getattr(record, name))


def check_transition_args(
    new: str, fields: Mapping[str, Any], match: Mapping[str, Any] | None
) -> None:
    """Refuse (:class:`ValidationError`) an unknown status or field, or a value a field
    cannot hold, before touching a store."""
    if not is_status(new):
        raise ValidationError(f"unknown run status {new!r}", field="status")
    for name in (*fields, *(match or {})):
        if name not in RUN_FIELDS:
            raise ValidationError(f"run field {name!r} does not exist", field=name)
    for name in fields:
        if name not in SETTABLE_FIELDS:
            raise ValidationError(f"run field {name!r} cannot be set", field=name)
    for name in match or {}:
        if name not in MATCHABLE_FIELDS:
            raise ValidationError(f"run field {name!r} cannot be matched", field=name)
    for name, value in fields.items():
        check_field(name, value)


def check_list_args(status: str | None, limit: int) -> None:
    """Refuse (:class:`ValidationError`) an unknown status or a limit outside 1..MAX_LIST_LIMIT."""
    if status is not None and not is_status(status):
        raise ValidationError(f"unknown run status {status!r}", field="status")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValidationError(f"limit must be 1-{MAX_LIST_LIMIT}", field="limit")


def check_ended_args(task: str | None, finished_before: float | None, limit: int) -> None:
    """Refuse (:class:`ValidationError`) what :meth:`RunStore.ended` cannot take."""
    check_list_args(None, limit)
    if task is not None and not isinstance(task, str):
        raise ValidationError("task must be a string", field="task")
    if finished_before is not None and (
        isinstance(finished_before, bool)
        or not isinstance(finished_before, int | float)
        or not math.isfinite(finished_before)
    ):
        raise ValidationError("finished_before must be a finite number", field="finished_before")


def check_ids(ids: Iterable[str]) -> list[str]:
    """``ids`` without repeats, in order; :class:`ValidationError` if one is not a string."""
    out = list(dict.fromkeys(ids))
    if not all(isinstance(run_id, str) for run_id in out):
        raise ValidationError("run ids must be strings", field="ids")
    return out


def encode_cursor(created_at: float, run_id: str) -> str:
    """The runs-list cursor after the run ``run_id`` created at ``created_at``."""
    return f"{created_at!r}|{run_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Parse a cursor from :func:`encode_cursor`; :class:`ValidationError` if malformed."""
    score, sep, run_id = cursor.partition("|")
    try:
        position = float(score)
        if not sep or not run_id or not math.isfinite(position):
            raise ValueError(cursor)
        return position, run_id
    except ValueError:
        raise ValidationError(f"invalid runs cursor {cursor!r}", field="cursor") from None


def apply_transition(
    record: RunRecord,
    new: RunStatus,
    expect: list[RunStatus] | None,
    match: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
) -> RunRecord:
    """The lifecycle-checked, fenced successor of ``record`` (pure)."""
    check_transition(record.id, record.status, new)
    if expect is not None and record.status not in expect:
        raise IllegalTransition(
            f"run {record.id}: is {record.status!r}, expected one of {sorted(expect)} "
            f"to move to {new!r}"
        )
    for name, value in (match or {}).items():
        if getattr(record, name) != value:
            raise IllegalTransition(
                f"run {record.id}: not moved to {new!r}; {name} is "
                f"{getattr(record, name)!r}, not {value!r}"
            )
    return dataclasses.replace(record, status=new, **fields)


JSON_FIELDS = frozenset({"params", "extra"})

DELETABLE: frozenset[RunStatus] = FINISHED
"""Statuses in which a run may be deleted: it has ended (never ``queued`` or ``running``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class EndedRun:
    """What a retention pass reads of a run that ended (:meth:`RunStore.ended`)."""

    id: str
    task: str
    status: RunStatus
    created_at: float
    finished_at: float | None

    @classmethod
    def of(cls, record: RunRecord) -> EndedRun:
        return cls(record.id, record.task, record.status, record.created_at, record.finished_at)

    @property
    def ended_at(self) -> float:
        """When it finished; its creation time if that was not recorded."""
        return self.finished_at if self.finished_at is not None else self.created_at


def check_deletable(record: RunRecord, expect: frozenset[RunStatus]) -> None:
    """Refuse (:class:`IllegalTransition`) deleting ``record`` unless its status is ``expect``ed."""
    if record.status not in expect:
        raise IllegalTransition(
            f"run {record.id} is {record.status!r}: only runs that ended "
            f"({', '.join(sorted(expect))}) can be deleted"
        )


def check_extra_args(key: str, value: Any) -> None:
    """Refuse (:class:`ValidationError`) an ``extra`` key or value that cannot be stored."""
    if not isinstance(key, str) or not key:
        raise ValidationError("an extra key must be a non-empty string", field="extra")
    if value is not None:
        check_field("extra", {key: value})


def with_extra(record: RunRecord, key: str, value: Any) -> dict[str, Any]:
    """``record.extra`` with ``key`` set to ``value`` (removed if ``value`` is None)."""
    extra = dict(record.extra)
    if value is None:
        extra.pop(key, None)
    else:
        extra[key] = value
    return extra


def encode_json_field(name: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"run field {name} is not JSON-serialisable: {exc}", field=name
        ) from exc


def json_copies(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``params``/``extra`` replaced by what the other engines would store."""
    return {
        name: json.loads(encode_json_field(name, value)) if name in JSON_FIELDS else value
        for name, value in values.items()
    }


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
        """Store a new run and return it; :meth:`get` then returns an equal record.

        Raises :class:`~runstream.errors.ValidationError` (``field`` names the
        culprit) if the record is not ``queued``, its id exists already, or a
        field holds a value the engines cannot all store (:func:`check_new_record`:
        e.g. ``params`` must be a JSON-serialisable dict). Strings in
        ``params``/``extra`` round-trip exactly, unpaired surrogates included.
        """

    @abstractmethod
    async def get(self, run_id: str) -> RunRecord:
        """The run, or :class:`~runstream.errors.RunNotFound`."""

    async def transition(
        self,
        run_id: str,
        new: RunStatus,
        *,
        expect: Iterable[RunStatus] | None = None,
        match: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> RunRecord:
        """Move the run to ``new`` and set ``fields`` (exit_code, error, worker, ...) atomically.

        ``match`` fences the move: each named field must currently hold the
        given value (e.g. ``{"worker": me, "attempt": n}``), so a worker that was
        presumed dead cannot overwrite the outcome of the attempt that replaced it.

        Fields not named keep their values (``None`` clears one); the store
        stamps no time of its own. Returns the record as stored.

        Raises :class:`~runstream.errors.ValidationError` for an unknown status,
        a field that does not exist or cannot be set (see :data:`SETTABLE_FIELDS`)
        or a value the field cannot hold, before looking the run up; then
        :class:`~runstream.errors.RunNotFound`; then
        :class:`~runstream.errors.IllegalTransition` if the table forbids the
        move, the current status is not in ``expect`` or ``match`` fails. A
        refused move changes nothing.
        """
        check_transition_args(new, fields, match)
        expected = None if expect is None else list(expect)
        return await self._move(run_id, new, expected, dict(match or {}), fields)

    @abstractmethod
    async def _move(
        self,
        run_id: str,
        new: RunStatus,
        expect: list[RunStatus] | None,
        match: Mapping[str, Any],
        fields: Mapping[str, Any],
    ) -> RunRecord:
        """:meth:`transition` with its arguments checked: the atomic compare-and-set itself."""

    @abstractmethod
    async def request_cancel(self, run_id: str) -> RunRecord:
        """Mark the run as cancel-requested (idempotent); a worker running it must stop it.

        Works in every status and changes nothing else; returns the record.
        Raises :class:`~runstream.errors.RunNotFound`.
        """

    async def stats(self) -> dict[str, float]:
        """Row counts: ``runs`` (all), and ``runs_<status>`` where the engine counts cheaply."""
        return {}

    async def delete(self, run_id: str, *, expect: Iterable[RunStatus] = DELETABLE) -> RunRecord:
        """Remove the run's record atomically if its status is in ``expect``; return it.

        Only the record: the run's stream is the caller's (see
        :meth:`runstream.runs.lifecycle.Lifecycle.delete`). Raises
        :class:`~runstream.errors.RunNotFound`, or
        :class:`~runstream.errors.IllegalTransition` (nothing removed) if the
        run is in another status, e.g. still ``queued`` or ``running``.
        """
        allowed = frozenset(expect)
        for status in allowed:
            if not is_status(status):
                raise ValidationError(f"unknown run status {status!r}", field="status")
        return await self._delete(run_id, allowed)

    @abstractmethod
    async def _delete(self, run_id: str, expect: frozenset[RunStatus]) -> RunRecord:
        """:meth:`delete` with its arguments checked: compare-status-and-remove, atomically."""

    async def delete_many(
        self, run_ids: Iterable[str], *, expect: Iterable[RunStatus] = DELETABLE
    ) -> list[RunRecord]:
        """Remove each run whose status is in ``expect``; return the records removed, in
        the order asked.

        Runs that do not exist or are in another status are skipped. Each run is
        decided atomically; engines that can do the whole batch in one write (SQLite)
        do, so a retention pass costs one transaction per batch, not one per run.
        """
        allowed = frozenset(expect)
        removed: list[RunRecord] = []
        for run_id in run_ids:
            try:
                removed.append(await self.delete(run_id, expect=allowed))
            except (RunNotFound, IllegalTransition):
                continue
        return removed

    async def set_extra(
        self, run_id: str, key: str, value: Any, *, expect: Iterable[RunStatus] = ("queued",)
    ) -> RunRecord | None:
        """Set ``extra[key] = value`` (``None`` removes it) if the run's status is in ``expect``.

        For notes that are not a status change, such as why a queued run waits
        (``extra["waiting"]``). Returns the record as stored, or ``None`` if the
        run was in another status (nothing changed). Raises
        :class:`~runstream.errors.RunNotFound` or
        :class:`~runstream.errors.ValidationError` for a value ``extra`` cannot hold.
        """
        check_extra_args(key, value)
        return await self._set_extra(run_id, key, value, frozenset(expect))

    @abstractmethod
    async def _set_extra(
        self, run_id: str, key: str, value: Any, expect: frozenset[RunStatus]
    ) -> RunRecord | None:
        """:meth:`set_extra` with its arguments checked, atomically."""

    @abstractmethod
    async def ended(
        self,
        *,
        task: str | None = None,
        finished_before: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[EndedRun], str | None]:
        """Runs in an ended status (:data:`~runstream.runs.lifecycle.FINISHED`), newest
        first and paged like :meth:`list`: only ``task``'s if given, and if
        ``finished_before`` is given only those whose ``finished_at`` (``created_at``
        when it is None) is earlier.

        What a retention pass reads: the engine filters in the store and returns a few
        fields, so a pass's work follows the runs it may delete, not every run kept.
        Raises :class:`~runstream.errors.ValidationError` for a ``limit`` outside
        1..:data:`MAX_LIST_LIMIT`, a non-finite ``finished_before`` or a bad cursor.
        """

    @abstractmethod
    async def missing(self, ids: Iterable[str]) -> set[str]:
        """The ids of ``ids`` that name no run (one store call per batch, not one per id).

        A retention pass asks it of the closed run streams it finds: a stream whose
        record is gone is an orphan. Raises :class:`~runstream.errors.ValidationError`
        if an id is not a string.
        """

    @abstractmethod
    async def list(
        self,
        *,
        status: RunStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """Runs newest first, filtered; returns the page and the cursor of the next page.

        Runs are ordered by ``(created_at, id)``, descending. The cursor is None
        exactly when no further run matches. A cursor is a position, not a
        snapshot: runs created later (newer) never appear on the following pages,
        and a run whose status changed is filtered when its page is read.

        Raises :class:`~runstream.errors.ValidationError` for an unknown status,
        a ``limit`` outside 1..:data:`MAX_LIST_LIMIT` or a malformed cursor.
        """
