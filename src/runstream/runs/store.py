"""Where run records live: one RunStore per backend, sharing the backend's URL."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from runstream.errors import ValidationError
from runstream.redact import mask_secrets
from runstream.runs.lifecycle import RunStatus, is_status
from runstream.runs.model import RunRecord

RUN_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunRecord))
SETTABLE_FIELDS = frozenset(RUN_FIELDS) - {"id", "status", "task", "created_at"}
"""Fields a transition may change; the status only through its ``new`` argument."""
MATCHABLE_FIELDS = frozenset(RUN_FIELDS) - {"id", "status"}
"""Fields a transition's ``match`` may fence on (the status is fenced by ``expect``)."""


def check_transition_args(
    new: str, fields: Mapping[str, Any], match: Mapping[str, Any] | None
) -> None:
    """Refuse (:class:`ValidationError`) an unknown status or field before touching a store."""
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


def encode_cursor(created_at: float, run_id: str) -> str:
    """The runs-list cursor after the run ``run_id`` created at ``created_at``."""
    return f"{created_at!r}|{run_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Parse a cursor from :func:`encode_cursor`; :class:`ValidationError` if malformed."""
    score, sep, run_id = cursor.partition("|")
    try:
        if not sep or not run_id:
            raise ValueError(cursor)
        return float(score), run_id
    except ValueError:
        raise ValidationError(f"invalid runs cursor {cursor!r}", field="cursor") from None


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

        Raises :class:`~runstream.errors.IllegalTransition` if the table forbids
        the move, the current status is not in ``expect`` or ``match`` fails,
        and :class:`~runstream.errors.ValidationError` for an unknown status or
        a field that does not exist or cannot be set (see :data:`SETTABLE_FIELDS`).
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


def open_run_store(url: str) -> RunStore:
    """Create (not start) the RunStore for the backend URL ``url`` (the EventLog's URL).

    ``memory://`` → an in-process store; ``sqlite:///path`` → the ``runs``
    table of the same database file; ``redis://``/``rediss://`` → the Redis
    store (needs the ``redis`` extra). Raises :class:`ConfigError` otherwise.
    """
    from urllib.parse import urlsplit

    from runstream.errors import ConfigError

    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from runstream.runs.store_local import MemoryRunStore

        return MemoryRunStore()
    if scheme == "sqlite":
        from runstream.runs.store_local import SQLiteRunStore

        return SQLiteRunStore.from_url(url)
    if scheme in ("redis", "rediss"):
        try:
            from runstream.runs.store_redis import RedisRunStore
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "the redis backend needs the 'redis' extra: pip install 'runstream[redis]'"
            ) from exc
        return RedisRunStore.from_url(url)
    raise ConfigError(
        f"unknown backend URL {mask_secrets(url)!r}: use memory://, sqlite:///path/to/file.db "
        "or redis://host:port/db"
    )
