"""Resume positions without I/O: parse them, check them against a stream, format them.

A *position* is the id of the last event a reader has seen (0 = nothing yet).
Over SSE the position travels in the ``id:`` field as ``"<epoch>:<offset>"`` so
that a plain browser ``EventSource`` sends the epoch back in ``Last-Event-ID``
on its own reconnect; that is what lets the server notice a re-created stream
instead of silently serving a different history from the same number. A bare
integer is accepted too (curl users, other clients); it skips the epoch check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runstream.core.model import Reset, StreamInfo
from runstream.errors import ValidationError

NOW: Literal["now"] = "now"
WAIT_FOR_CREATE: Literal["wait_for_create"] = "wait_for_create"
"""The read parameter that says whether a stream not created yet is waited for (``1``/``0``)."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a reader wants to start: after ``offset`` (or the tail, when ``now``)."""

    offset: int = 0
    epoch: str | None = None
    now: bool = False


def parse_position(value: str | int | None, *, allow_now: bool = True) -> Position:
    """Parse ``"now"``, ``"42"`` or ``"<epoch>:42"``; raise :class:`ValidationError` otherwise."""
    if value is None or value == "":
        return Position()
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValidationError("position must be >= 0", field="after")
        return Position(value)
    if not isinstance(value, str):
        raise ValidationError("position must be a string or integer", field="after")
    text = value.strip()
    if text == NOW:
        if not allow_now:
            raise ValidationError("'now' is not accepted here", field="after")
        return Position(now=True)
    epoch: str | None = None
    if ":" in text:
        epoch, _, text = text.rpartition(":")
        if not epoch or len(epoch) > 64:
            raise ValidationError(f"invalid position {value!r}", field="after")
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise ValidationError(
            f"invalid position {value!r}: expected an event id, '<epoch>:<id>' or 'now'",
            field="after",
        )
    return Position(int(text), epoch)


def format_sse_id(epoch: str, offset: int) -> str:
    """The SSE ``id:`` value for the event at ``offset`` of ``epoch``."""
    return f"{epoch}:{offset}"


def check_position(info: StreamInfo, offset: int, epoch: str | None) -> tuple[int, Reset | None]:
    """Decide where a reader at ``offset`` (of ``epoch``, if known) continues in ``info``.

    Returns the offset to read after and, when history was lost, the
    :class:`Reset` to report first. Position 0 means "from the start of what is
    retained" and is never a reset.
    """
    start = info.first_id - 1
    if epoch is not None and epoch != info.epoch:
        return start, Reset(info.epoch, start, "epoch_changed", offset)
    if offset == 0:
        return start, None
    if offset > info.last_id:
        return start, Reset(info.epoch, start, "ahead", offset)
    if offset < start:
        return start, Reset(info.epoch, start, "trimmed", offset)
    return offset, None
