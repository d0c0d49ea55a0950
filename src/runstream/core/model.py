"""Immutable records shared by every layer: events, stream state, pages, resets.

A stream is an append-only log. Event ids are 1-based offsets, strictly
increasing by one within a stream and epoch. Closing a stream appends one last
entry of type :data:`END_TYPE` whose data is ``{"status": ..., "reason": ...}``;
that entry has an id like any other, so a reader that missed the moment of the
close still finds it in the log.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

from runstream.core.jsonbody import check_text
from runstream.errors import ValidationError

JSON: TypeAlias = Any
"""Any value that :func:`json.dumps` accepts (checked at append time)."""

END_TYPE = "end"
"""Type of the entry that closes a stream. Users cannot append it directly."""

RESET_TYPE = "reset"
"""Type of the control message that reports lost history. Never stored."""

UNREADABLE_TYPE = "unreadable"
"""Type of the item a reader gets in place of a stored entry that cannot be served
(written by an older version, another program or a hand edit): same id, data
``{"reason": ...}``. Never stored."""

HEARTBEAT_TYPE = "ping"
"""Type of the WebSocket heartbeat message (``{"type": "ping", "time": ...}``, no ``id``).

Sent on an idle WebSocket at the keepalive interval, so a client's idle
watchdog has something to see. Never stored; reserved so that no event can
be mistaken for it."""

RESERVED_TYPES = frozenset({END_TYPE, RESET_TYPE, UNREADABLE_TYPE, HEARTBEAT_TYPE})

STREAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
SYSTEM_PREFIX = "runstream:"
"""Names of streams the server writes itself (the runs feed, ``runstream:runs``): readable
like any stream, but the streams API refuses to append to, close or delete them."""
MAX_TYPE_LENGTH = 100

StreamStatus: TypeAlias = Literal["open", "closed"]
ResetReason: TypeAlias = Literal["epoch_changed", "trimmed", "ahead"]


def validate_stream_name(name: str) -> str:
    """Return ``name`` if it is a valid stream name, else raise :class:`ValidationError`."""
    if not isinstance(name, str) or not STREAM_NAME_RE.fullmatch(name):
        raise ValidationError(
            f"invalid stream name {name!r}: use 1-200 characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit",
            field="stream",
        )
    return name


def validate_event_type(type_: str, *, allow_reserved: bool = False) -> str:
    if not isinstance(type_, str) or not 1 <= len(type_) <= MAX_TYPE_LENGTH:
        raise ValidationError(
            f"event type must be a string of 1-{MAX_TYPE_LENGTH} characters", field="type"
        )
    if "\n" in type_ or "\r" in type_ or "\0" in type_:
        raise ValidationError("event type must not contain line breaks or NUL", field="type")
    check_text(type_, where="type")
    if not allow_reserved and type_ in RESERVED_TYPES:
        raise ValidationError(
            f"event type {type_!r} is reserved; close the stream to end it", field="type"
        )
    return type_


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""Reused: ``json.dumps`` with non-default options builds a new encoder on every call."""


def encode_data(data: JSON) -> str:
    """Serialise event data to compact JSON, raising :class:`ValidationError` if impossible.

    Refused: values JSON cannot hold (``NaN``, infinities, non-JSON types),
    strings UTF-8 cannot hold (lone surrogates: the data could never be served)
    and nesting beyond the interpreter's recursion limit.
    """
    try:
        text = _ENCODER.encode(data)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"event data is not JSON-serialisable: {exc}", field="data") from exc
    except RecursionError:
        raise ValidationError("event data is nested too deeply", field="data") from None
    return check_text(text, where="data")


def new_epoch() -> str:
    """A fresh opaque epoch: 12 lowercase hex characters (never contains ``:``)."""
    return secrets.token_hex(6)


def now() -> float:
    """Server time as UNIX seconds."""
    return datetime.now(UTC).timestamp()


_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")
_last_time: tuple[float, str] = (0.0, "1970-01-01T00:00:00.000Z")


def rfc3339(ts: float) -> str:
    """Format UNIX seconds as RFC 3339 UTC with millisecond precision.

    The same text as ``datetime.fromtimestamp(ts, UTC).isoformat(timespec=
    "milliseconds")`` with ``Z``, at a fraction of the cost: every SSE and
    WebSocket frame carries one, the events of one append share their time,
    and those of a stream mostly share their second, so the last result and
    the date part of the last second are kept. The split into seconds and
    microseconds is the one ``datetime.fromtimestamp`` makes (round half to
    even, carried into the seconds).
    """
    global _last_second, _last_time
    last = _last_time
    if last[0] == ts:
        return last[1]
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole += 1.0
        us -= 1_000_000
    elif us < 0:
        whole -= 1.0
        us += 1_000_000
    second = int(whole)
    cached = _last_second
    if cached[0] == second:
        prefix = cached[1]
    else:
        prefix = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:-6]
        _last_second = (second, prefix)
    text = f"{prefix}.{us // 1000:03d}Z"
    _last_time = (ts, text)
    return text


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. Validated on construction; ``data_json`` is the encoded data."""

    type: str
    data: JSON = None
    data_json: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        validate_event_type(self.type)
        if not self.data_json:
            object.__setattr__(self, "data_json", encode_data(self.data))

    @classmethod
    def trusted(cls, type_: str, data: JSON, data_json: str) -> NewEvent:
        """Build without validation, for hot paths whose inputs are valid by construction.

        The caller guarantees that ``type_`` passes :func:`validate_event_type`
        and that ``data_json`` is exactly ``encode_data(data)`` (the subprocess
        runner's ``stdout``/``stderr`` lines, for instance). Anything built from
        user input must use the normal constructor.
        """
        event = object.__new__(cls)
        object.__setattr__(event, "type", type_)
        object.__setattr__(event, "data", data)
        object.__setattr__(event, "data_json", data_json)
        return event

    @classmethod
    def from_json(cls, obj: object) -> NewEvent:
        """Build from a decoded ``{"type": ..., "data": ...}`` body item."""
        if not isinstance(obj, Mapping):
            raise ValidationError('each event must be an object {"type": ..., "data": ...}')
        unknown = set(obj) - {"type", "data"}
        if unknown:
            raise ValidationError(f"unknown event fields: {sorted(unknown)}", field="event")
        if "type" not in obj:
            raise ValidationError("event is missing 'type'", field="type")
        return cls(type=obj["type"], data=obj.get("data"))


@dataclass(frozen=True, slots=True)
class EncodedEvents:
    """Events of one type whose data is already encoded: the bulk form of trusted events.

    Appending it (:meth:`~runstream.backends.base.EventLog.append_encoded`)
    stores exactly what appending
    ``[NewEvent.trusted(type, json.loads(j), j) for j in data_json]`` would,
    without building an object per event. The type is validated here, once;
    like :meth:`NewEvent.trusted`, the caller guarantees that each string in
    ``data_json`` is what :func:`encode_data` gives for the event's data (the
    subprocess runner's line records, through
    :func:`runstream.runner.lines.encode_runs`). The sequence is not copied:
    do not change it afterwards.
    """

    type: str
    data_json: Sequence[str]

    def __post_init__(self) -> None:
        validate_event_type(self.type)


@dataclass(frozen=True, slots=True)
class Event:
    """One stored entry of a stream.

    ``data_json`` is the data as the backend stored it (compact JSON, what
    :func:`encode_data` gives for ``data``) when the backend read it that way;
    writers of SSE and WebSocket frames use it instead of encoding ``data``
    again. ``epoch`` is the epoch the event belongs to when the reader knows
    it (the SDK sets it on every event it delivers); with the stream name and
    ``id`` it identifies the event for good (see :meth:`idempotency_key`).
    Neither takes part in equality.
    """

    id: int
    type: str
    data: JSON
    time: float
    data_json: str | None = field(default=None, compare=False, repr=False)
    epoch: str | None = field(default=None, compare=False, repr=False)

    @property
    def is_end(self) -> bool:
        """True for the entry that closed the stream (``data`` holds status and reason)."""
        return self.type == END_TYPE

    def idempotency_key(self, stream: str) -> str:
        """``"<stream>:<epoch>:<id>"``: the same for every delivery of this event, and only it.

        A stream re-created (or a backend that lost its data) starts a new
        epoch, so ids reused there get different keys. Raises
        :class:`ValidationError` when the epoch is unknown.
        """
        if self.epoch is None:
            raise ValidationError("this event's epoch is unknown: no idempotency key")
        return f"{stream}:{self.epoch}:{self.id}"

    def to_json(self) -> dict[str, JSON]:
        return {"id": self.id, "type": self.type, "data": self.data, "time": rfc3339(self.time)}

    def to_json_text(self) -> str:
        """Compact JSON of :meth:`to_json`, reusing the stored data text when there is one.

        No re-encoding of ``data``: cheaper, and exactly what was stored and checked.
        """
        data = self.data_json if self.data_json is not None else encode_data(self.data)
        return (
            f'{{"id":{self.id},"type":{_ENCODER.encode(self.type)},"data":{data},'
            f'"time":"{rfc3339(self.time)}"}}'
        )


@dataclass(frozen=True, slots=True)
class Reset:
    """History was lost for a follower: it continues after ``after`` in ``epoch``.

    ``reason`` is ``"epoch_changed"`` (stream re-created or backend lost data),
    ``"trimmed"`` (the position is older than the retained history) or
    ``"ahead"`` (the position is beyond the end of the log, so it came from a
    history this backend no longer has).
    """

    epoch: str
    after: int
    reason: ResetReason
    requested: int

    def to_json(self) -> dict[str, JSON]:
        return {
            "epoch": self.epoch,
            "after": self.after,
            "reason": self.reason,
            "requested": self.requested,
        }


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """State of one stream. ``first_id`` > ``last_id`` means no event is retained."""

    name: str
    epoch: str
    status: StreamStatus
    first_id: int
    last_id: int
    created_at: float
    closed_at: float | None = None
    close_status: str | None = None
    close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.status == "closed"

    @property
    def tail(self) -> int:
        """Where a reader asking for ``after=now`` starts: after the last event.

        On a closed stream that is before the end entry, so the reader still
        gets the end (the one rule for ``now``, on every transport and backend).
        """
        return max(0, self.last_id - 1) if self.closed else self.last_id

    def to_json(self) -> dict[str, JSON]:
        return {
            "stream": self.name,
            "epoch": self.epoch,
            "status": self.status,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "created_at": rfc3339(self.created_at),
            "closed_at": rfc3339(self.closed_at) if self.closed_at is not None else None,
            "close_status": self.close_status,
            "close_reason": self.close_reason,
        }


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append stored: ids ``first_id..last_id`` in ``epoch``.

    ``duplicate`` is true when a producer retried its last seq and nothing new
    was stored; the ids are those of the original append.
    """

    stream: str
    epoch: str
    first_id: int
    last_id: int
    duplicate: bool = False

    def to_json(self) -> dict[str, JSON]:
        return {
            "stream": self.stream,
            "epoch": self.epoch,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "duplicate": self.duplicate,
        }


@dataclass(frozen=True, slots=True)
class Page:
    """A page read from a stream: ``events`` after the requested position, in order.

    ``next_after`` is the position to pass to the next read. ``closed`` is true
    once the page includes (or the caller is already past) the end entry.
    """

    stream: str
    epoch: str
    events: tuple[Event, ...]
    next_after: int
    closed: bool

    def to_json(self) -> dict[str, JSON]:
        return {
            "stream": self.stream,
            "epoch": self.epoch,
            "events": [e.to_json() for e in self.events],
            "next_after": self.next_after,
            "closed": self.closed,
        }


@dataclass(frozen=True, slots=True)
class Producer:
    """Identity of an idempotent producer: retries with the same ``seq`` store nothing new."""

    id: str
    seq: int

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not 1 <= len(self.id) <= 200:
            raise ValidationError("producer id must be 1-200 characters", field="Producer-Id")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0:
            raise ValidationError(
                "producer seq must be a non-negative integer", field="Producer-Seq"
            )
