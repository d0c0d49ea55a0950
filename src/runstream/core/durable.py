"""The Durable Streams model without I/O: stream settings, requests, and every decision.

Durable Streams (``PROTOCOL.md`` of ``durable-streams/durable-streams``) streams are
append-only logs of *entries*: the body of one append. A byte stream (any content
type) is the concatenation of its entries; a JSON stream (``application/json``)
keeps message boundaries, so an entry holds the messages of one append, stored as
their compact JSON texts joined by ``,`` (a JSON array without its brackets).

Positions are entry counts: position ``p`` is "after the first ``p`` entries", so
an entry's id is its 1-based index and a stream's tail is its entry count. A fork
shares its source's entries up to the position it was forked at and continues the
numbering with its own.

Every rule the protocol states about one request is decided here, by pure
functions over :class:`DsState` (what an engine stores about a stream), so each
engine applies the same decision inside its own transaction: :func:`decide_create`,
:func:`decide_append`, :func:`decide_producer`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final

from runstream.core.jsonbody import parse_json
from runstream.errors import UsageError

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
JSON_TYPE: Final = "application/json"
MAX_SAFE_INTEGER: Final = 2**53 - 1
MAX_PRODUCER_ID: Final = 256
MAX_STREAM_SEQ: Final = 256
RESERVED_PREFIX: Final = "runstream:"
"""Names the server keeps for itself (the runs feed): readable, never written through DS."""


# -- errors -----------------------------------------------------------------------------


class DsError(UsageError):
    """A Durable Streams refusal; ``headers`` go on the response (``Stream-Closed`` ...)."""

    code = "bad_request"
    http_status = 400

    def __init__(
        self, message: str, headers: dict[str, str] | None = None, *, tail: int | None = None
    ) -> None:
        super().__init__(message)
        self.headers: dict[str, str] = headers or {}
        self.tail = tail
        """The stream's tail, for a ``Stream-Next-Offset`` on the refusal."""


class DsConflict(DsError):
    code = "conflict"
    http_status = 409


class DsGone(DsError):
    """The stream was deleted but forks still read its history (or the offset was trimmed)."""

    code = "gone"
    http_status = 410


class DsNotFound(DsError):
    code = "stream_not_found"
    http_status = 404


class DsStaleEpoch(DsError):
    code = "stale_producer_epoch"
    http_status = 403


class DsReadOnly(DsError):
    code = "method_not_allowed"
    http_status = 405


# -- header values ----------------------------------------------------------------------

_DECIMAL: Final = re.compile(r"^(0|[1-9][0-9]*)$")
_RFC3339: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_decimal(value: str, name: str, *, maximum: int = MAX_SAFE_INTEGER) -> int:
    """A non-negative decimal integer without sign, leading zeros, point or exponent."""
    text = value.strip()
    if not _DECIMAL.match(text) or len(text) > 16 or int(text) > maximum:
        raise DsError(f"{name} must be a non-negative integer (got {value[:40]!r})")
    return int(text)


def parse_expires_at(value: str) -> float:
    """An RFC 3339 timestamp → seconds since the epoch."""
    text = value.strip()
    if not _RFC3339.match(text):
        raise DsError(f"Stream-Expires-At must be an RFC 3339 timestamp (got {value[:60]!r})")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    except ValueError:
        raise DsError(f"Stream-Expires-At is not a valid time (got {value[:60]!r})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_expires_at(when: float) -> str:
    return (
        datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def media_type(content_type: str) -> str:
    """The media type of a ``Content-Type`` value, lower case, parameters dropped."""
    return content_type.partition(";")[0].strip().lower()


def normalize_content_type(value: str | None) -> str:
    """How a stream keeps its content type: media type lower case, parameters as given."""
    if value is None or not value.strip():
        return DEFAULT_CONTENT_TYPE
    kind, sep, params = value.partition(";")
    kind = kind.strip().lower()
    if "/" not in kind or len(value) > 200 or any(c.isspace() for c in kind):
        raise DsError(f"Content-Type {value[:60]!r} is not a media type")
    params = "; ".join(p.strip() for p in params.split(";") if p.strip())
    return f"{kind}; {params}" if sep and params else kind


def is_json(content_type: str) -> bool:
    return media_type(content_type) == JSON_TYPE


def is_text(content_type: str) -> bool:
    """Served over SSE as text (otherwise base64): ``text/*`` and JSON."""
    kind = media_type(content_type)
    return kind.startswith("text/") or kind == JSON_TYPE


def parse_flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    text = value.strip().lower()
    if text == "true":
        return True
    if text == "false":
        return False
    raise DsError(f"{name} must be true or false (got {value[:20]!r})")


# -- JSON mode --------------------------------------------------------------------------


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_messages(body: bytes, *, allow_empty: bool) -> list[str]:
    """The messages of a JSON append: a top-level array is flattened exactly one level.

    Each message is its compact JSON text. ``[]`` is refused unless ``allow_empty``
    (a PUT may create an empty stream with it; an append may not).
    """
    value = parse_json(body, what="body")
    if isinstance(value, list):
        if not value and not allow_empty:
            raise DsError("an append of an empty JSON array has no messages")
        return [_compact(item) for item in value]
    return [_compact(value)]


def join_messages(messages: list[str]) -> bytes:
    """One JSON entry: the messages joined by ``,`` (an array without its brackets)."""
    return ",".join(messages).encode("utf-8")


def split_messages(entry: bytes) -> list[str]:
    """The messages of a stored JSON entry, each as compact JSON text."""
    values = json.loads(b"[" + entry + b"]")
    return [_compact(v) for v in values]


def count_messages(entry: bytes) -> int:
    return len(json.loads(b"[" + entry + b"]"))


# -- producers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProducerClaim:
    """The ``Producer-Id`` / ``Producer-Epoch`` / ``Producer-Seq`` of one request."""

    id: str
    epoch: int
    seq: int


def parse_producer(pid: str | None, epoch: str | None, seq: str | None) -> ProducerClaim | None:
    """All three headers or none (400 otherwise)."""
    if pid is None and epoch is None and seq is None:
        return None
    if pid is None or epoch is None or seq is None:
        raise DsError("Producer-Id, Producer-Epoch and Producer-Seq go together")
    if not pid.strip() or len(pid) > MAX_PRODUCER_ID:
        raise DsError(f"Producer-Id must be 1-{MAX_PRODUCER_ID} characters")
    return ProducerClaim(
        pid, parse_decimal(epoch, "Producer-Epoch"), parse_decimal(seq, "Producer-Seq")
    )


class Verdict(Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class ProducerState:
    epoch: int
    last_seq: int


def decide_producer(state: ProducerState | None, claim: ProducerClaim) -> Verdict:
    """§5.2.1: accept, duplicate, or raise (403 stale epoch, 400, 409 sequence gap)."""
    if state is None:
        if claim.seq != 0:
            raise _gap(0, claim.seq)
        return Verdict.ACCEPT
    if claim.epoch < state.epoch:
        raise DsStaleEpoch(
            f"producer epoch {claim.epoch} is stale (current {state.epoch})",
            {"Producer-Epoch": str(state.epoch)},
        )
    if claim.epoch > state.epoch:
        if claim.seq != 0:
            raise DsError("a new producer epoch must start at Producer-Seq 0")
        return Verdict.ACCEPT
    if claim.seq <= state.last_seq:
        return Verdict.DUPLICATE
    if claim.seq == state.last_seq + 1:
        return Verdict.ACCEPT
    raise _gap(state.last_seq + 1, claim.seq)


def _gap(expected: int, received: int) -> DsConflict:
    return DsConflict(
        f"producer sequence gap: expected {expected}, received {received}",
        {"Producer-Expected-Seq": str(expected), "Producer-Received-Seq": str(received)},
    )


# -- streams ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fork:
    """Where a fork starts: its source and the position it shares history up to."""

    source: str
    position: int
    sub_offset: int = 0


@dataclass(slots=True)
class DsState:
    """What an engine keeps about one stream besides its entries."""

    name: str
    uid: str
    """Distinguishes re-creations under one name (in ETags)."""
    content_type: str
    created: float
    ttl: int | None = None
    expires_at: float | None = None
    touched: float = 0.0
    """Last read or write: a TTL counts from here (sliding)."""
    base: int = 0
    """Entries shared with the fork source (0 for a stream that is not a fork)."""
    tail: int = 0
    """Position after the last entry (``base`` + own entries)."""
    closed: bool = False
    closed_by: ProducerClaim | None = None
    stream_seq: str | None = None
    fork: Fork | None = None
    forks: int = 0
    """Forks reading this stream's history (which keep it readable after a delete)."""
    deleted: bool = False
    """Deleted while forks still read it: 410 to everyone, gone with its last fork."""
    producers: dict[str, ProducerState] = field(default_factory=dict)

    @property
    def json(self) -> bool:
        return is_json(self.content_type)

    def deadline(self) -> float | None:
        if self.ttl is not None:
            return self.touched + self.ttl
        return self.expires_at

    def expired(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A PUT, its headers validated."""

    content_type: str | None
    ttl: int | None = None
    expires_at: float | None = None
    closed: bool = False
    fork_source: str | None = None
    fork_offset: int | None = None
    """``None``: the source's tail."""
    sub_offset: int = 0
    body: bytes = b""


def validate_create(req: CreateRequest) -> None:
    if req.ttl is not None and req.expires_at is not None:
        raise DsError("give Stream-TTL or Stream-Expires-At, not both")
    if req.fork_source is None and (req.fork_offset is not None or req.sub_offset):
        raise DsError("Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From")
    if req.sub_offset and req.fork_offset is None:
        raise DsError("Stream-Fork-Sub-Offset needs Stream-Fork-Offset")


def same_config(state: DsState, req: CreateRequest, content_type: str) -> bool:
    """Whether a PUT on an existing stream asks for what it is (200) or not (409)."""
    if media_type(state.content_type) != media_type(content_type):
        return False
    explicit = req.ttl is not None or req.expires_at is not None or state.fork is None
    if explicit and (state.ttl != req.ttl or not _same_time(state.expires_at, req.expires_at)):
        return False
    if req.closed and not state.closed:
        return False
    if req.fork_source is not None:
        fork = state.fork
        if fork is None or fork.source != req.fork_source:
            return False
        if req.fork_offset is not None and (
            fork.position != req.fork_offset or fork.sub_offset != req.sub_offset
        ):
            return False
    return True


def _same_time(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, abs_tol=0.001)


def entries_for(content_type: str, body: bytes, *, allow_empty: bool) -> list[bytes]:
    """The entries one request body adds: none for an empty body, else exactly one."""
    if is_json(content_type):
        if not body.strip():
            if allow_empty:
                return []
            raise DsError("an append needs a body")
        messages = json_messages(body, allow_empty=allow_empty)
        return [join_messages(messages)] if messages else []
    if not body:
        if allow_empty:
            return []
        raise DsError("an append needs a body")
    return [body]


def cut_entry(content_type: str, entry: bytes, sub_offset: int) -> bytes:
    """The first ``sub_offset`` bytes (or JSON messages) of an entry; 400 past its end."""
    if is_json(content_type):
        messages = split_messages(entry)
        if sub_offset > len(messages):
            raise DsError(f"Stream-Fork-Sub-Offset {sub_offset} is past the append's messages")
        return join_messages(messages[:sub_offset])
    if sub_offset > len(entry):
        raise DsError(f"Stream-Fork-Sub-Offset {sub_offset} is past the append's bytes")
    return entry[:sub_offset]


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """A POST, its headers validated (``content_type`` ``None``: none was sent)."""

    content_type: str | None
    body: bytes
    close: bool = False
    producer: ProducerClaim | None = None
    stream_seq: str | None = None


class Outcome(Enum):
    APPENDED = "appended"
    """Stored (and closed if asked): 200 with a producer, else 204."""
    DUPLICATE = "duplicate"
    """A producer retry of something already stored: 204, nothing stored."""
    CLOSED = "closed"
    """Close only: 204."""


@dataclass(frozen=True, slots=True)
class AppendPlan:
    """What :func:`decide_append` lets an engine store, and what to answer."""

    outcome: Outcome
    entries: list[bytes]
    state: DsState
    """The stream's state after the append (the engine stores it with the entries)."""


def check_writable(state: DsState | None, name: str) -> DsState:
    if state is None:
        raise DsNotFound(f"stream {name!r} does not exist")
    if state.deleted:
        raise DsGone(f"stream {name!r} was deleted")
    return state


def decide_append(state: DsState, req: AppendRequest, now: float) -> AppendPlan:
    """Every check of a POST, in the protocol's order, on one consistent ``state``.

    Raises :class:`DsError` (400/403/409) with the headers to answer. The returned
    state is a copy: the caller stores it and the entries atomically.
    """
    close_only = req.close and not req.body
    claim = req.producer
    if state.closed:
        closed_headers = {"Stream-Closed": "true"}
        if claim is not None:
            if decide_producer(state.producers.get(claim.id), claim) is Verdict.DUPLICATE:
                return AppendPlan(Outcome.DUPLICATE, [], state)
        elif close_only:
            return AppendPlan(Outcome.CLOSED, [], state)
        raise DsConflict("the stream is closed", closed_headers, tail=state.tail)
    entries: list[bytes] = []
    if not close_only:
        if req.content_type is None:
            raise DsError("an append needs a Content-Type")
        if media_type(req.content_type) != media_type(state.content_type):
            raise DsConflict(
                f"Content-Type {media_type(req.content_type)!r} does not match the stream's "
                f"{media_type(state.content_type)!r}"
            )
        entries = entries_for(state.content_type, req.body, allow_empty=False)
    new = replace(state, producers=dict(state.producers), touched=now)
    if claim is not None:
        verdict = decide_producer(state.producers.get(claim.id), claim)
        if verdict is Verdict.DUPLICATE:
            return AppendPlan(Outcome.DUPLICATE, [], state)
        new.producers[claim.id] = ProducerState(claim.epoch, claim.seq)
    if req.stream_seq is not None:
        if state.stream_seq is not None and req.stream_seq.encode() <= state.stream_seq.encode():
            raise DsConflict(
                f"Stream-Seq {req.stream_seq[:40]!r} is not above the last one "
                f"({state.stream_seq[:40]!r})"
            )
        new.stream_seq = req.stream_seq
    new.tail = state.tail + len(entries)
    if req.close:
        new.closed = True
        new.closed_by = claim
    return AppendPlan(Outcome.CLOSED if close_only else Outcome.APPENDED, entries, new)


# -- reads ------------------------------------------------------------------------------


CURSOR_EPOCH: Final = datetime(2024, 10, 9, tzinfo=UTC).timestamp()
CURSOR_INTERVAL: Final = 20.0


def next_cursor(now: float, client: str | None, jitter: int) -> str:
    """§8.1: the current interval number, strictly above a cursor the client echoed.

    ``jitter`` (seconds, 1-3600, chosen by the caller at random) moves a colliding
    cursor ahead so that caches never cycle.
    """
    interval = int((now - CURSOR_EPOCH) // CURSOR_INTERVAL)
    if client is not None and client.isascii() and client.isdigit() and len(client) < 19:
        echoed = int(client)
        if echoed >= interval:
            interval = echoed + max(1, int(jitter // CURSOR_INTERVAL))
    return str(interval)


# -- storage form -----------------------------------------------------------------------


def state_to_json(state: DsState) -> str:
    """A stream's state as one JSON text (how engines without columns for it store it)."""
    doc: dict[str, Any] = {
        "name": state.name,
        "uid": state.uid,
        "content_type": state.content_type,
        "created": state.created,
        "ttl": state.ttl,
        "expires_at": state.expires_at,
        "touched": state.touched,
        "base": state.base,
        "tail": state.tail,
        "closed": state.closed,
        "closed_by": None
        if state.closed_by is None
        else [state.closed_by.id, state.closed_by.epoch, state.closed_by.seq],
        "stream_seq": state.stream_seq,
        "fork": None
        if state.fork is None
        else [state.fork.source, state.fork.position, state.fork.sub_offset],
        "forks": state.forks,
        "deleted": state.deleted,
        "producers": {k: [v.epoch, v.last_seq] for k, v in state.producers.items()},
    }
    return json.dumps(doc, separators=(",", ":"))


def state_from_json(text: str | bytes) -> DsState:
    doc = json.loads(text)
    closed_by = doc["closed_by"]
    fork = doc["fork"]
    return DsState(
        name=doc["name"],
        uid=doc["uid"],
        content_type=doc["content_type"],
        created=doc["created"],
        ttl=doc["ttl"],
        expires_at=doc["expires_at"],
        touched=doc["touched"],
        base=doc["base"],
        tail=doc["tail"],
        closed=doc["closed"],
        closed_by=None if closed_by is None else ProducerClaim(*closed_by),
        stream_seq=doc["stream_seq"],
        fork=None if fork is None else Fork(*fork),
        forks=doc["forks"],
        deleted=doc["deleted"],
        producers={k: ProducerState(*v) for k, v in doc["producers"].items()},
    )
