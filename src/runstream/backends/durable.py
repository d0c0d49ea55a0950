"""The Durable Streams store contract: what an engine provides for ``/v1/stream/{path}``.

A :class:`DurableStore` keeps DS streams (bytes of any content type, see
:mod:`runstream.core.durable`) beside the engine's event log. Each engine applies
the decisions of :mod:`runstream.core.durable` (:func:`decide_append`, ...) to
one consistent state, atomically with the write: the producer check, the
``Stream-Seq`` check, the entries and the close are one transaction.

Wake-ups reuse the engine's own notification path: every store has a
:class:`~runstream.backends.base.Notifier` (keyed by stream name) that it
notifies after a write is durable; live readers register before they read.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from runstream.backends.base import Notifier
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

N = TypeVar("N")

KEY_PREFIX = "\x00ds\x00"
"""Notifier keys of DS streams (event stream names cannot hold NUL)."""


class KeyedNotifier(Notifier):
    """A view of another notifier with every key prefixed."""

    def __init__(self, inner: Notifier, prefix: str) -> None:
        super().__init__()
        self._inner = inner
        self._prefix = prefix

    def watch(self, stream: str) -> asyncio.Future[None]:
        return self._inner.watch(self._prefix + stream)

    def unwatch(self, stream: str, fut: asyncio.Future[None]) -> None:
        self._inner.unwatch(self._prefix + stream, fut)

    def notify(self, stream: str) -> None:
        self._inner.notify(self._prefix + stream)


READ_MAX_BYTES = 1024 * 1024
"""Bytes one catch-up response carries at most (always at least one entry)."""


@dataclass(frozen=True, slots=True)
class DsRead:
    """One consistent read: the state, and the entries from ``start`` to ``end``."""

    state: DsState
    start: int
    end: int
    entries: list[bytes]

    @property
    def up_to_date(self) -> bool:
        return self.end >= self.state.tail


@dataclass(frozen=True, slots=True)
class DsWrite:
    outcome: Outcome
    state: DsState


class DsReader(Protocol):
    """What live and catch-up reads need: a DS store, or a view of event streams."""

    notifier: Notifier

    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead: ...


class DurableStore(ABC):
    """Durable Streams storage of one engine. Raises :class:`~runstream.core.durable.DsError`."""

    def __init__(self) -> None:
        self.notifier = Notifier()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abstractmethod
    async def create(self, name: str, req: CreateRequest, now: float) -> tuple[DsState, bool]:
        """Create ``name`` (``True``) or confirm an identical one (``False``); 409 otherwise.

        Forks (``req.fork_source``) share the source's entries up to the fork
        position: 404 if the source does not exist, 409 if it was deleted or its
        content type differs, 400 for a position or sub-offset past its end.
        """

    @abstractmethod
    async def append(self, name: str, req: AppendRequest, now: float) -> DsWrite:
        """Apply :func:`~runstream.core.durable.decide_append` and store its plan atomically."""

    @abstractmethod
    async def head(self, name: str, now: float) -> DsState:
        """The state (404 absent or expired, 410 deleted with forks left); no TTL renewal."""

    @abstractmethod
    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead:
        """Entries after ``position`` (``None``: the tail) up to ``max_bytes``; renews a TTL.

        400 if ``position`` is beyond the tail.
        """

    @abstractmethod
    async def delete(self, name: str, now: float) -> None:
        """Delete ``name``: gone at once, or kept for its forks' reads (410 to everyone)."""

    async def sweep(self, now: float) -> int:
        """Delete expired streams; returns how many. Engines may also expire lazily."""
        return 0


# -- the engine-neutral operations over a repository ---------------------------------------


class DsRepo(ABC, Generic[N]):
    """Synchronous access to one engine's DS records, used inside its transaction.

    A node ``N`` is the engine's handle on one stream record (its state and where
    its own entries are). The operations below (:func:`op_create`, ...) hold every
    rule; an engine runs them on its write path (SQLite: the writer thread, in
    the group transaction) so that each one is atomic.
    """

    @abstractmethod
    def get(self, name: str) -> N | None: ...

    @abstractmethod
    def state(self, node: N) -> DsState: ...

    @abstractmethod
    def source(self, node: N) -> N | None: ...

    @abstractmethod
    def entries(self, node: N, lo: int, hi: int, budget: int, used: int) -> list[bytes]:
        """Own entries at positions ``(lo, hi]`` while ``used`` + their sizes fit ``budget``
        (the first one always, if ``used`` is 0)."""

    @abstractmethod
    def insert(self, state: DsState, entries: list[bytes], source: N | None) -> None: ...

    @abstractmethod
    def save(self, node: N, state: DsState, entries: list[bytes]) -> None:
        """Store ``state`` and append ``entries`` (positions after the old tail)."""

    def touch(self, node: N, state: DsState) -> None:
        """Store a renewed TTL (``touched``): a write that must wake nobody."""
        self.save(node, state, [])

    @abstractmethod
    def drop(self, node: N) -> None:
        """Remove the record and its own entries."""

    @abstractmethod
    def expired(self, now: float) -> list[str]:
        """Names of streams (not deleted) whose deadline passed."""


def collect(repo: DsRepo[N], node: N, after: int, upto: int, budget: int) -> list[bytes]:
    """Entries at positions ``(after, upto]``, through fork sources, within ``budget`` bytes."""
    chain: list[tuple[N, int, int]] = []
    current: N | None = node
    hi = upto
    while current is not None and after < hi:
        base = repo.state(current).base
        chain.append((current, max(after, base), hi))
        hi = base
        current = repo.source(current)
    out: list[bytes] = []
    used = 0
    for item, lo, top in reversed(chain):
        got = repo.entries(item, lo, top, budget, used)
        out += got
        used += sum(len(e) for e in got)
        if len(got) < top - lo:
            break
    return out


def op_get(repo: DsRepo[N], name: str, now: float) -> N | None:
    """The record under ``name``, expired (deleted) first if its time has come."""
    node = repo.get(name)
    if node is not None:
        state = repo.state(node)
        if not state.deleted and state.expired(now):
            op_remove(repo, node)
            node = repo.get(name)
    return node


def op_live(repo: DsRepo[N], name: str, now: float) -> tuple[N, DsState]:
    node = op_get(repo, name, now)
    state = check_writable(None if node is None else repo.state(node), name)
    assert node is not None
    return node, state


def op_remove(repo: DsRepo[N], node: N) -> None:
    """Delete: kept (``deleted``, 410) while forks read it, else gone, with any deleted
    source whose last fork it was."""
    state = repo.state(node)
    if state.forks > 0:
        repo.save(node, replace(state, deleted=True), [])
        return
    source = repo.source(node)
    repo.drop(node)
    while source is not None:
        src = repo.state(source)
        src = replace(src, forks=src.forks - 1)
        if not src.deleted or src.forks > 0:
            repo.save(source, src, [])
            break
        following = repo.source(source)
        repo.drop(source)
        source = following


def op_create(
    repo: DsRepo[N], name: str, req: CreateRequest, now: float, uid: str
) -> tuple[DsState, bool]:
    validate_create(req)
    source: N | None = None
    src: DsState | None = None
    if req.fork_source is not None:
        source = op_get(repo, req.fork_source, now)
        if source is None:
            raise DsNotFound(f"fork source {req.fork_source!r} does not exist")
        src = repo.state(source)
        if src.deleted:
            raise DsConflict(f"fork source {req.fork_source!r} was deleted")
        content_type = (
            src.content_type
            if req.content_type is None
            else normalize_content_type(req.content_type)
        )
        if media_type(content_type) != media_type(src.content_type):
            raise DsConflict("a fork has its source's content type")
    else:
        content_type = normalize_content_type(req.content_type)
    existing = op_get(repo, name, now)
    if existing is not None:
        state = repo.state(existing)
        if state.deleted:
            raise DsConflict(f"stream {name!r} was deleted and is still read by forks")
        if same_config(state, req, content_type):
            return state, False
        raise DsConflict(f"stream {name!r} exists with another configuration")
    base = 0
    own: list[bytes] = []
    ttl, expires_at = req.ttl, req.expires_at
    fork = None
    if source is not None and src is not None:
        base = src.tail if req.fork_offset is None else req.fork_offset
        if base > src.tail:
            raise DsError("Stream-Fork-Offset is beyond the end of the source")
        if req.sub_offset:
            following = collect(repo, source, base, base + 1, 0)
            if not following:
                raise DsError("Stream-Fork-Sub-Offset points past the end of the source")
            own.append(cut_entry(content_type, following[0], req.sub_offset))
        if ttl is None and expires_at is None:
            ttl, expires_at = src.ttl, src.expires_at
        fork = Fork(src.name, base, req.sub_offset)
    own += entries_for(content_type, req.body, allow_empty=True)
    state = DsState(
        name=name,
        uid=uid,
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
    if source is not None and src is not None:
        repo.save(source, replace(src, forks=src.forks + 1), [])
    repo.insert(state, own, source)
    return state, True


def op_append(repo: DsRepo[N], name: str, req: AppendRequest, now: float) -> DsWrite:
    node, state = op_live(repo, name, now)
    plan = decide_append(state, req, now)
    if plan.outcome is Outcome.DUPLICATE:
        return DsWrite(plan.outcome, state)
    repo.save(node, plan.state, plan.entries)
    return DsWrite(plan.outcome, plan.state)


def op_head(repo: DsRepo[N], name: str, now: float) -> DsState:
    node = op_get(repo, name, now)
    return check_writable(None if node is None else repo.state(node), name)


def op_read(
    repo: DsRepo[N], name: str, position: int | None, now: float, max_bytes: int, *, touch: bool
) -> DsRead:
    node, state = op_live(repo, name, now)
    start = state.tail if position is None else position
    check_position(start, state.tail)
    if touch and state.ttl is not None:
        state = replace(state, touched=now)
        repo.touch(node, state)
    entries = collect(repo, node, start, state.tail, max_bytes)
    return DsRead(state, start, start + len(entries), entries)


def op_delete(repo: DsRepo[N], name: str, now: float) -> None:
    node = op_get(repo, name, now)
    if node is None:
        raise DsNotFound(f"stream {name!r} does not exist")
    if repo.state(node).deleted:
        raise DsGone(f"stream {name!r} was deleted")
    op_remove(repo, node)


def op_sweep(repo: DsRepo[N], now: float) -> list[str]:
    names = repo.expired(now)
    for name in names:
        op_get(repo, name, now)
    return names
