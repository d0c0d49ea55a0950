"""Durable Streams on the memory engine: streams and entries in dicts and lists.

Every method runs without awaiting between its checks and its writes, so on the
event loop each request's decision and store are atomic (no lock needed). A fork
keeps a reference to its source's record, so a deleted source's history stays
readable through its forks until the last one goes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from runstream.backends.durable import READ_MAX_BYTES, DsRead, DsWrite, DurableStore
from runstream.core.durable import (
    AppendRequest,
    CreateRequest,
    DsConflict,
    DsError,
    DsGone,
    DsNotFound,
    DsState,
    Fork,
    Outcome,
    check_writable,
    cut_entry,
    decide_append,
    entries_for,
    media_type,
    normalize_content_type,
    same_config,
    validate_create,
)
from runstream.protocol.durable import check_position


@dataclass(eq=False, slots=True)
class _Stream:
    state: DsState
    entries: list[bytes] = field(default_factory=list)
    """Own entries: ids ``state.base + 1`` ... ``state.tail``."""
    source: _Stream | None = None


def collect(stream: _Stream, after: int, upto: int, budget: int) -> list[bytes]:
    """Entries with ids in ``(after, upto]`` (through fork sources), within ``budget`` bytes.

    At least one entry when there is one, so a reader always moves on.
    """
    out: list[bytes] = []
    size = 0
    chain: list[tuple[_Stream, int, int]] = []
    node: _Stream | None = stream
    hi = upto
    while node is not None and after < hi:
        lo = max(after, node.state.base)
        chain.append((node, lo, hi))
        hi = node.state.base
        node = node.source
    for node, lo, hi in reversed(chain):
        base = node.state.base
        for entry in node.entries[lo - base : hi - base]:
            if out and size + len(entry) > budget:
                return out
            out.append(entry)
            size += len(entry)
    return out


class MemoryDurableStore(DurableStore):
    def __init__(self) -> None:
        super().__init__()
        self._streams: dict[str, _Stream] = {}

    def _get(self, name: str, now: float) -> _Stream | None:
        """The stream under ``name``, expiring it first if its time has come."""
        stream = self._streams.get(name)
        if stream is not None and not stream.state.deleted and stream.state.expired(now):
            self._remove(name, stream)
            stream = self._streams.get(name)
        return stream

    def _live(self, name: str, now: float) -> _Stream:
        stream = self._get(name, now)
        check_writable(stream.state if stream else None, name)
        assert stream is not None
        return stream

    def _remove(self, name: str, stream: _Stream) -> None:
        """Delete: kept (deleted, 410) while forks read it, else gone with any source it held."""
        if stream.state.forks > 0:
            stream.state.deleted = True
            self.notifier.notify(name)
            return
        if self._streams.get(name) is stream:
            del self._streams[name]
        self.notifier.notify(name)
        source = stream.source
        while source is not None:
            source.state.forks -= 1
            if not source.state.deleted or source.state.forks > 0:
                break
            if self._streams.get(source.state.name) is source:
                del self._streams[source.state.name]
            source = source.source

    async def create(self, name: str, req: CreateRequest, now: float) -> tuple[DsState, bool]:
        validate_create(req)
        source: _Stream | None = None
        if req.fork_source is not None:
            source = self._get(req.fork_source, now)
            if source is None:
                raise DsNotFound(f"fork source {req.fork_source!r} does not exist")
            if source.state.deleted:
                raise DsConflict(f"fork source {req.fork_source!r} was deleted")
            content_type = (
                source.state.content_type
                if req.content_type is None
                else normalize_content_type(req.content_type)
            )
            if media_type(content_type) != media_type(source.state.content_type):
                raise DsConflict("a fork has its source's content type")
        else:
            content_type = normalize_content_type(req.content_type)
        existing = self._get(name, now)
        if existing is not None:
            if existing.state.deleted:
                raise DsConflict(f"stream {name!r} was deleted and is still read by forks")
            if same_config(existing.state, req, content_type):
                return existing.state, False
            raise DsConflict(f"stream {name!r} exists with another configuration")
        base = 0
        own: list[bytes] = []
        ttl, expires_at = req.ttl, req.expires_at
        fork = None
        if source is not None:
            src = source.state
            base = src.tail if req.fork_offset is None else req.fork_offset
            if base > src.tail:
                raise DsError("Stream-Fork-Offset is beyond the end of the source")
            if req.sub_offset:
                following = collect(source, base, base + 1, 0)
                if not following:
                    raise DsError("Stream-Fork-Sub-Offset points past the end of the source")
                own.append(cut_entry(content_type, following[0], req.sub_offset))
            if ttl is None and expires_at is None:
                ttl, expires_at = src.ttl, src.expires_at
            fork = Fork(src.name, base, req.sub_offset)
        own += entries_for(content_type, req.body, allow_empty=True)
        state = DsState(
            name=name,
            uid=secrets.token_hex(6),
            content_type=content_type,
            created=now,
            ttl=ttl,
            expires_at=expires_at,
            touched=now,
            base=base,
            tail=base + len(own),
            closed=req.closed,
            fork=fork,
        )
        if source is not None:
            source.state.forks += 1
        self._streams[name] = _Stream(state, own, source)
        self.notifier.notify(name)
        return state, True

    async def append(self, name: str, req: AppendRequest, now: float) -> DsWrite:
        stream = self._live(name, now)
        plan = decide_append(stream.state, req, now)
        if plan.outcome is Outcome.DUPLICATE:
            return DsWrite(plan.outcome, stream.state)
        stream.entries.extend(plan.entries)
        stream.state = plan.state
        self.notifier.notify(name)
        return DsWrite(plan.outcome, plan.state)

    async def head(self, name: str, now: float) -> DsState:
        stream = self._get(name, now)
        return check_writable(stream.state if stream else None, name)

    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead:
        stream = self._live(name, now)
        state = stream.state
        start = state.tail if position is None else position
        check_position(start, state.tail)
        state.touched = now
        entries = collect(stream, start, state.tail, max_bytes)
        return DsRead(state, start, start + len(entries), entries)

    async def delete(self, name: str, now: float) -> None:
        stream = self._get(name, now)
        if stream is None:
            raise DsNotFound(f"stream {name!r} does not exist")
        if stream.state.deleted:
            raise DsGone(f"stream {name!r} was deleted")
        self._remove(name, stream)

    async def sweep(self, now: float) -> int:
        expired = [
            (n, s) for n, s in self._streams.items() if not s.state.deleted and s.state.expired(now)
        ]
        for name, stream in expired:
            self._remove(name, stream)
        return len(expired)
