"""Durable Streams on the SQLite engine: tables ``ds_streams`` and ``ds_entries`` (schema step 3).

Every write is one request on the event log's writer thread, so it joins the
group transaction of whatever else is pending (one fsync for a burst) and is
acknowledged only after the commit: the producer check, the ``Stream-Seq``
check, the entries and the close are atomic (§5.2.1), and survive ``kill -9``.

Entries are BLOBs keyed ``dsid << 32 | position`` (one range scan per read);
a stream's state is one JSON text (:func:`~runstream.core.durable.state_to_json`),
rewritten with each append: a few hundred bytes per append on top of the entry.

Reads run on the log's reader threads; a read that must write (renewing a TTL,
expiring a stream) goes through the writer instead. Wake-ups use the log's
notifier under keys no event stream can have (``KEY_PREFIX``), so the writer's
post-commit notification wakes DS readers in this process, and the log's commit
probe (``PRAGMA data_version``) wakes them on another process's commit.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from runstream.backends.base import EventLog
from runstream.backends.durable import (
    KEY_PREFIX,
    READ_MAX_BYTES,
    DsRead,
    DsRepo,
    DsWrite,
    DurableStore,
    KeyedNotifier,
    op_append,
    op_create,
    op_delete,
    op_get,
    op_head,
    op_read,
    op_sweep,
)
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.backends.sqlite.sql import ID_BITS, MAX_EVENT_ID
from runstream.core.durable import (
    AppendRequest,
    CreateRequest,
    DsError,
    DsState,
    state_from_json,
    state_to_json,
)
from runstream.errors import ConfigError


@dataclass(eq=False, slots=True)
class _Row:
    dsid: int
    source_id: int | None
    state: DsState


class _NeedsWrite(Exception):
    """A read found it must write (expire a stream, renew a TTL): redo it on the writer."""


class _Repo(DsRepo[_Row]):
    def __init__(self, conn: sqlite3.Connection, *, writable: bool) -> None:
        self.conn = conn
        self.writable = writable
        self.touched: set[str] = set()

    def _row(self, where: str, arg: object) -> _Row | None:
        row = self.conn.execute(
            f"SELECT dsid, source, state FROM ds_streams WHERE {where} = ?", (arg,)
        ).fetchone()
        return None if row is None else _Row(row[0], row[1], state_from_json(row[2]))

    def get(self, name: str) -> _Row | None:
        return self._row("name", name)

    def state(self, node: _Row) -> DsState:
        return node.state

    def source(self, node: _Row) -> _Row | None:
        return None if node.source_id is None else self._row("dsid", node.source_id)

    def entries(self, node: _Row, lo: int, hi: int, budget: int, used: int) -> list[bytes]:
        base = node.dsid << ID_BITS
        out: list[bytes] = []
        for (data,) in self.conn.execute(
            "SELECT data FROM ds_entries WHERE key > ? AND key <= ? ORDER BY key",
            (base + lo, base + hi),
        ):
            if (out or used) and used + len(data) > budget:
                break
            out.append(bytes(data))
            used += len(data)
        return out

    def _check(self) -> None:
        if not self.writable:
            raise _NeedsWrite

    def _put_entries(self, dsid: int, first: int, entries: list[bytes]) -> None:
        if first + len(entries) - 1 > MAX_EVENT_ID:
            raise DsError("the stream has reached its maximum number of appends")
        base = dsid << ID_BITS
        self.conn.executemany(
            "INSERT INTO ds_entries (key, data) VALUES (?, ?)",
            [(base + first + i, entry) for i, entry in enumerate(entries)],
        )

    def insert(self, state: DsState, entries: list[bytes], source: _Row | None) -> None:
        self._check()
        cursor = self.conn.execute(
            "INSERT INTO ds_streams (name, source, state, deleted, deadline) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                state.name,
                None if source is None else source.dsid,
                state_to_json(state),
                int(state.deleted),
                state.deadline(),
            ),
        )
        dsid = cursor.lastrowid
        assert dsid is not None
        self._put_entries(dsid, state.base + 1, entries)
        self.touched.add(state.name)

    def save(self, node: _Row, state: DsState, entries: list[bytes]) -> None:
        self._check()
        self.conn.execute(
            "UPDATE ds_streams SET state = ?, deleted = ?, deadline = ? WHERE dsid = ?",
            (state_to_json(state), int(state.deleted), state.deadline(), node.dsid),
        )
        if entries:
            self._put_entries(node.dsid, state.tail - len(entries) + 1, entries)
        node.state = state
        self.touched.add(state.name)

    def touch(self, node: _Row, state: DsState) -> None:
        self._check()
        self.conn.execute(
            "UPDATE ds_streams SET state = ?, deadline = ? WHERE dsid = ?",
            (state_to_json(state), state.deadline(), node.dsid),
        )
        node.state = state

    def drop(self, node: _Row) -> None:
        self._check()
        base = node.dsid << ID_BITS
        self.conn.execute(
            "DELETE FROM ds_entries WHERE key > ? AND key <= ?", (base, base + MAX_EVENT_ID)
        )
        self.conn.execute("DELETE FROM ds_streams WHERE dsid = ?", (node.dsid,))
        self.touched.add(node.state.name)

    def expired(self, now: float) -> list[str]:
        return [
            name
            for (name,) in self.conn.execute(
                "SELECT name FROM ds_streams WHERE deleted = 0 AND deadline <= ? LIMIT 1000",
                (now,),
            )
        ]


T = TypeVar("T")
_WriteOp = Callable[[_Repo], T]


class SQLiteDurableStore(DurableStore):
    """DS streams in the event log's database file, written by its writer thread."""

    def __init__(self, log: SQLiteEventLog) -> None:
        super().__init__()
        self.log = log
        self.notifier = KeyedNotifier(log.notifier, KEY_PREFIX)

    @classmethod
    def for_log(cls, url: str, log: EventLog) -> SQLiteDurableStore:
        if not isinstance(log, SQLiteEventLog):
            raise ConfigError("the SQLite Durable Streams store needs the SQLite event log")
        return cls(log)

    async def _write(self, name: str | None, op: _WriteOp[T]) -> T:
        """Run ``op`` on the writer (in its group transaction); wake readers of what changed.

        ``name`` ``None``: a write that wakes nobody (a TTL renewal)."""
        touched: set[str] = set()

        def run(conn: sqlite3.Connection) -> T:
            repo = _Repo(conn, writable=True)
            try:
                return op(repo)
            finally:
                touched.update(repo.touched)

        try:
            return await self.log._write(KEY_PREFIX + (name or "\x00"), run)
        finally:
            for other in touched - {name}:
                self.notifier.notify(other)

    async def _read(self, op: _WriteOp[T]) -> T:
        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                return op(_Repo(conn, writable=False))
            finally:
                conn.execute("COMMIT")

        return await self.log._reader(run)

    async def create(self, name: str, req: CreateRequest, now: float) -> tuple[DsState, bool]:
        uid = secrets.token_hex(6)
        return await self._write(name, lambda repo: op_create(repo, name, req, now, uid))

    async def append(self, name: str, req: AppendRequest, now: float) -> DsWrite:
        return await self._write(name, lambda repo: op_append(repo, name, req, now))

    async def head(self, name: str, now: float) -> DsState:
        try:
            return await self._read(lambda repo: op_head(repo, name, now))
        except _NeedsWrite:
            return await self._write(name, lambda repo: op_head(repo, name, now))

    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead:
        def plain(repo: _Repo) -> DsRead:
            node = op_get(repo, name, now)
            if node is not None and node.state.ttl is not None:
                raise _NeedsWrite  # renewing the TTL is a write
            return op_read(repo, name, position, now, max_bytes, touch=False)

        try:
            return await self._read(plain)
        except _NeedsWrite:
            return await self._write(
                None, lambda repo: op_read(repo, name, position, now, max_bytes, touch=True)
            )

    async def delete(self, name: str, now: float) -> None:
        await self._write(name, lambda repo: op_delete(repo, name, now))

    async def sweep(self, now: float) -> int:
        expired = await self._read(lambda repo: repo.expired(now))
        if not expired:
            return 0
        return len(await self._write(expired[0], lambda repo: op_sweep(repo, now)))
