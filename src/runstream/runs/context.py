"""The run context handed to Python tasks.

A Python task is ``async def task(ctx)`` or an async generator
``async def task(ctx): ... yield value``. Everything it reports goes to the
run's stream:

* ``await ctx.emit(type, data)`` — any event type except the reserved
  ``status``, ``end`` and ``reset``;
* ``await ctx.progress(current=, total=, message=)`` — a ``progress`` event;
* ``await ctx.log(level, msg)`` — a ``stdout`` line (``debug``/``info``) or a
  ``stderr`` line (``warning`` and above) with ``"level"`` set, one event per
  line of ``msg``, so the output of Python and command tasks looks the same;
* the return value of an async function becomes the ``result`` event (also
  when it is ``None``); each value an async generator yields becomes an
  ``item`` event, in order.

Cancellation is cooperative first: when the run is cancelled or times out,
``ctx.cancelled`` is set and the task has the task's ``grace`` seconds to
return; after that its coroutine is cancelled (``asyncio.CancelledError`` is
raised at its current ``await``). A task should therefore check
``ctx.cancelled.is_set()`` between steps, or wait on it, and clean up in
``finally`` blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from runstream.backends.base import EventLog
from runstream.core.model import NewEvent
from runstream.errors import ValidationError

__all__ = ["LOG_LEVELS", "RESERVED_RUN_TYPES", "RunContext"]

RESERVED_RUN_TYPES = frozenset({"status", "end", "reset"})
"""Event types only runstream writes to a run's stream."""

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_STDERR_LEVELS = frozenset({"warning", "error", "critical"})
_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical", "err": "error", "trace": "debug"}


class RunContext:
    """What a Python task sees of its run. Created by the executor, one per attempt."""

    def __init__(
        self,
        *,
        run_id: str,
        task: str,
        params: Mapping[str, Any],
        log: EventLog,
        attempt: int = 1,
        cancelled: asyncio.Event | None = None,
    ) -> None:
        self.run_id = run_id
        self.task = task
        self.params: Mapping[str, Any] = dict(params)
        self.attempt = attempt
        self.cancelled = cancelled if cancelled is not None else asyncio.Event()
        """Set when the run is cancelled or timed out; return soon after it is set."""
        self._log = log
        self.events_emitted = 0

    async def emit(self, type: str, data: Any = None) -> int:
        """Append one event to the run's stream and return its id.

        Raises :class:`ValidationError` for a reserved or invalid type or data
        that is not JSON-serialisable.
        """
        if type in RESERVED_RUN_TYPES:
            raise ValidationError(
                f"event type {type!r} is reserved for runstream on a run's stream", field="type"
            )
        result = await self._log.append(self.run_id, NewEvent(type, data))
        self.events_emitted += 1
        return result.last_id

    async def progress(
        self,
        current: float | None = None,
        total: float | None = None,
        message: str | None = None,
    ) -> int:
        """Append a ``progress`` event with the fields that are given."""
        data: dict[str, Any] = {}
        if current is not None:
            data["current"] = current
        if total is not None:
            data["total"] = total
        if message is not None:
            data["message"] = message
        return await self.emit("progress", data)

    async def log(self, level: str, msg: str) -> None:
        """Append ``msg`` as output lines tagged with ``level`` (see :data:`LOG_LEVELS`)."""
        norm = _LEVEL_ALIASES.get(level.lower(), level.lower())
        if norm not in LOG_LEVELS:
            raise ValidationError(
                f"log level must be one of {', '.join(LOG_LEVELS)} (got {level!r})", field="level"
            )
        stream = "stderr" if norm in _STDERR_LEVELS else "stdout"
        lines = str(msg).split("\n") or [""]
        batch = [NewEvent(stream, {"line": line, "level": norm}) for line in lines]
        await self._log.append(self.run_id, batch)
        self.events_emitted += len(batch)
