"""Durable Streams on the memory engine: records and entries in dicts and lists.

The operations of :mod:`runstream.backends.durable` run without awaiting, so on
the event loop each request's decision and store are atomic (no lock needed). A
fork holds a reference to its source's record, so a deleted source's history
stays readable through its forks until the last one goes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from runstream.backends.durable import (
    READ_MAX_BYTES,
    DsRead,
    DsRepo,
    DsWrite,
    DurableStore,
    op_append,
    op_create,
    op_delete,
    op_head,
    op_read,
    op_sweep,
)
from runstream.core.durable import AppendRequest, CreateRequest, DsState


@dataclass(eq=False, slots=True)
class _Record:
    state: DsState
    entries: list[bytes] = field(default_factory=list)
    """Own entries: positions ``state.base + 1`` ... ``state.tail``."""
    source: _Record | None = None


class _Repo(DsRepo[_Record]):
    def __init__(self) -> None:
        self.records: dict[str, _Record] = {}
        self.touched: set[str] = set()
        """Names written since the store last notified."""

    def get(self, name: str) -> _Record | None:
        return self.records.get(name)

    def state(self, node: _Record) -> DsState:
        return node.state

    def source(self, node: _Record) -> _Record | None:
        return node.source

    def entries(self, node: _Record, lo: int, hi: int, budget: int, used: int) -> list[bytes]:
        base = node.state.base
        out: list[bytes] = []
        for entry in node.entries[lo - base : hi - base]:
            if (out or used) and used + len(entry) > budget:
                break
            out.append(entry)
            used += len(entry)
        return out

    def insert(self, state: DsState, entries: list[bytes], source: _Record | None) -> None:
        self.records[state.name] = _Record(state, list(entries), source)
        self.touched.add(state.name)

    def save(self, node: _Record, state: DsState, entries: list[bytes]) -> None:
        node.state = state
        node.entries += entries
        self.touched.add(state.name)

    def touch(self, node: _Record, state: DsState) -> None:
        node.state = state

    def drop(self, node: _Record) -> None:
        name = node.state.name
        if self.records.get(name) is node:
            del self.records[name]
        self.touched.add(name)

    def expired(self, now: float) -> list[str]:
        return [n for n, r in self.records.items() if not r.state.deleted and r.state.expired(now)]


class MemoryDurableStore(DurableStore):
    def __init__(self) -> None:
        super().__init__()
        self._repo = _Repo()

    def _notify(self) -> None:
        touched, self._repo.touched = self._repo.touched, set()
        for name in touched:
            self.notifier.notify(name)

    async def create(self, name: str, req: CreateRequest, now: float) -> tuple[DsState, bool]:
        try:
            return op_create(self._repo, name, req, now, secrets.token_hex(6))
        finally:
            self._notify()

    async def append(self, name: str, req: AppendRequest, now: float) -> DsWrite:
        try:
            return op_append(self._repo, name, req, now)
        finally:
            self._notify()

    async def head(self, name: str, now: float) -> DsState:
        try:
            return op_head(self._repo, name, now)
        finally:
            self._notify()

    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead:
        try:
            return op_read(self._repo, name, position, now, max_bytes, touch=True)
        finally:
            self._notify()

    async def delete(self, name: str, now: float) -> None:
        try:
            op_delete(self._repo, name, now)
        finally:
            self._notify()

    async def sweep(self, now: float) -> int:
        try:
            return len(op_sweep(self._repo, now))
        finally:
            self._notify()
