"""The SQLite run store (``sqlite:///path``).

:class:`SQLiteRunStore` keeps run records in a ``runs`` table of the *same*
database file as the SQLite EventLog, through its own connection. Every status
change is one ``BEGIN IMMEDIATE`` transaction that reads the current row,
checks the move against the lifecycle table and writes it, so two processes
sharing the file (a server and a CLI) can never both start, or both finish,
one run. Blocking SQLite calls run on one private thread.

It accepts, beyond :class:`~runstream.runs.store.RunStore`, a
``match`` mapping on :meth:`transition` (as the Redis store does): each named
field must hold the given value or the move is refused with
:class:`IllegalTransition`. Executors fence their final transition with
``match={"worker": me, "attempt": n}``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from runstream.backends.sqlite.helpers import switch_to_wal, write_lock
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.errors import (
    BackendError,
    BackendUnavailable,
    RunNotFound,
    ValidationError,
)
from runstream.runs.lifecycle import FINISHED, RunStatus, is_status
from runstream.runs.model import RunRecord
from runstream.runs.store import (
    DELETABLE,
    JSON_FIELDS,
    RUN_FIELDS,
    EndedRun,
    RunStore,
    apply_transition,
    check_deletable,
    check_ended_args,
    check_ids,
    check_list_args,
    check_new_record,
    decode_cursor,
    encode_cursor,
    encode_json_field,
    with_extra,
)

__all__ = ["SQLiteRunStore"]

T = TypeVar("T")
P = TypeVar("P", RunRecord, EndedRun)


DEFAULT_BUSY_TIMEOUT = 5.0


_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        timeout REAL,
        exit_code INTEGER,
        error TEXT,
        started_at REAL,
        finished_at REAL,
        worker TEXT,
        attempt INTEGER NOT NULL,
        cancel_requested INTEGER NOT NULL,
        extra TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS runs_newest ON runs (created_at DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS runs_status ON runs (status, created_at DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS runs_task ON runs (task, created_at DESC, id DESC)",
)
_COLUMNS = ", ".join(RUN_FIELDS)
_ENDED = sorted(FINISHED)
_IDS_PER_QUERY = 500
"""Ids per :meth:`SQLiteRunStore.missing` query (SQLite before 3.32 takes 999 parameters)."""
_PLACEHOLDERS = ", ".join("?" * len(RUN_FIELDS))


def _to_row(record: RunRecord) -> list[Any]:
    row: list[Any] = []
    for name in RUN_FIELDS:
        value = getattr(record, name)
        if name in JSON_FIELDS:
            value = encode_json_field(name, value)
        elif name == "cancel_requested":
            value = int(value)
        row.append(value)
    return row


def _from_row(row: sqlite3.Row | tuple[Any, ...]) -> RunRecord:
    values = dict(zip(RUN_FIELDS, row, strict=True))
    for name in JSON_FIELDS:
        values[name] = json.loads(values[name])
    values["cancel_requested"] = bool(values["cancel_requested"])
    if not is_status(values["status"]):
        raise BackendError(f"run {values['id']}: stored status {values['status']!r} is unknown")
    return RunRecord(**values)


def _ended_from_row(row: tuple[Any, ...]) -> EndedRun:
    return EndedRun(*row)


class SQLiteRunStore(RunStore):
    """Run records in the ``runs`` table of a SQLite file (WAL), shareable by local processes.

    Build it with :meth:`from_url` (the EventLog's URL) or a path; call
    :meth:`start` (creates the file and table) and :meth:`aclose`. Methods
    raise runstream errors only; sqlite3 errors become :class:`BackendError`.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = str(path)
        self.busy_timeout = busy_timeout
        self._write_lock = write_lock(self.path)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._start_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteRunStore:
        """Parse the same ``sqlite:///path`` URL as the SQLite EventLog (raises ConfigError)."""
        parsed = SQLiteEventLog.from_url(url)
        return cls(parsed.path, busy_timeout=parsed.busy_timeout)

    def __repr__(self) -> str:
        return f"SQLiteRunStore({self.path!r})"

    # -- plumbing --------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        parent = Path(self.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot create directory {str(parent)!r}: {exc}") from exc
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"cannot open sqlite database {self.path!r}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = switch_to_wal(conn, self.busy_timeout)
            if str(mode).lower() != "wal":
                raise BackendError(f"sqlite database {self.path!r} could not switch to WAL mode")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _error(self, exc: sqlite3.Error) -> BackendError:
        message = str(exc)
        if "locked" in message or "busy" in message:
            return BackendError(
                f"sqlite database {self.path!r} stayed locked for more than "
                f"{self.busy_timeout:g}s ({message})"
            )
        return BackendError(f"sqlite error on {self.path!r} (runs): {message}")

    async def start(self) -> None:
        """Open the file and create the ``runs`` table if needed. Idempotent."""
        async with self._start_lock:
            if self._conn is not None:
                return
            executor = ThreadPoolExecutor(1, thread_name_prefix="runstream-sqlite-runs")
            try:
                conn = await asyncio.get_running_loop().run_in_executor(executor, self._open)
            except BaseException:
                executor.shutdown(wait=False)
                raise
            self._conn, self._executor = conn, executor

    async def aclose(self) -> None:
        """Close the connection and the thread. Idempotent."""
        async with self._start_lock:
            conn, executor = self._conn, self._executor
            self._conn = self._executor = None
            if conn is None or executor is None:
                return
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
            # The close was the thread's last job: it is idle, nothing to wait for.
            executor.shutdown(wait=False)

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        """Run ``fn`` on the store's thread; a ``write`` holds this process's write lock
        of the file (shared with the event log's writer, see :func:`.helpers.write_lock`)."""
        if self._conn is None:
            await self.start()
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise BackendError(f"run store {self.path!r} is closed")

        def call() -> T:
            try:
                if write:
                    with self._write_lock:
                        return fn(conn)
                return fn(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise self._error(exc) from exc
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    @staticmethod
    def _select(conn: sqlite3.Connection, run_id: str) -> RunRecord:
        row = conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"run {run_id!r} does not exist")
        return _from_row(row)

    # -- RunStore --------------------------------------------------------------

    async def create(self, record: RunRecord) -> RunRecord:
        check_new_record(record)
        row = _to_row(record)

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(f"INSERT INTO runs ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", row)
            except sqlite3.IntegrityError:
                raise ValidationError(f"run {record.id} already exists", field="id") from None

        await self._run(insert, write=True)
        return record

    async def get(self, run_id: str) -> RunRecord:
        return await self._run(lambda conn: self._select(conn, run_id))

    async def _move(
        self,
        run_id: str,
        new: RunStatus,
        expect: list[RunStatus] | None,
        match: Mapping[str, Any],
        fields: Mapping[str, Any],
    ) -> RunRecord:
        def cas(conn: sqlite3.Connection) -> RunRecord:
            # BEGIN IMMEDIATE takes the write lock before the read, so the status
            # we check is still the status when we write (also across processes).
            conn.execute("BEGIN IMMEDIATE")
            record = self._select(conn, run_id)
            updated = apply_transition(record, new, expect, match, fields)
            row = _to_row(updated)
            assignments = ", ".join(f"{name} = ?" for name in RUN_FIELDS[1:])
            conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*row[1:], run_id))
            conn.execute("COMMIT")
            return updated

        return await self._run(cas, write=True)

    async def stats(self) -> dict[str, float]:
        def count(conn: sqlite3.Connection) -> dict[str, float]:
            rows = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
            out = {f"runs_{status}": float(n) for status, n in rows}
            out["runs"] = float(sum(n for _, n in rows))
            return out

        return await self._run(count)

    async def _delete(self, run_id: str, expect: frozenset[RunStatus]) -> RunRecord:
        def remove(conn: sqlite3.Connection) -> RunRecord:
            conn.execute("BEGIN IMMEDIATE")
            record = self._select(conn, run_id)
            check_deletable(record, expect)
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
            conn.execute("COMMIT")
            return record

        return await self._run(remove, write=True)

    async def delete_many(
        self, run_ids: Iterable[str], *, expect: Iterable[RunStatus] = DELETABLE
    ) -> list[RunRecord]:
        """See :meth:`RunStore.delete_many`: the whole batch in one write transaction."""
        ids = list(run_ids)
        allowed = frozenset(expect)
        for status in allowed:
            if not is_status(status):
                raise ValidationError(f"unknown run status {status!r}", field="status")

        def remove(conn: sqlite3.Connection) -> list[RunRecord]:
            conn.execute("BEGIN IMMEDIATE")
            removed: list[RunRecord] = []
            for run_id in ids:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)
                ).fetchone()
                if row is None:
                    continue
                record = _from_row(row)
                if record.status in allowed:
                    conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
                    removed.append(record)
            conn.execute("COMMIT")
            return removed

        return await self._run(remove, write=True)

    async def _set_extra(
        self, run_id: str, key: str, value: Any, expect: frozenset[RunStatus]
    ) -> RunRecord | None:
        def update(conn: sqlite3.Connection) -> RunRecord | None:
            conn.execute("BEGIN IMMEDIATE")
            record = self._select(conn, run_id)
            if record.status not in expect:
                conn.execute("COMMIT")
                return None
            extra = with_extra(record, key, value)
            conn.execute(
                "UPDATE runs SET extra = ? WHERE id = ?",
                (encode_json_field("extra", extra), run_id),
            )
            conn.execute("COMMIT")
            return self._select(conn, run_id)

        return await self._run(update, write=True)

    async def request_cancel(self, run_id: str) -> RunRecord:
        def mark(conn: sqlite3.Connection) -> RunRecord:
            conn.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))
            return self._select(conn, run_id)

        return await self._run(mark, write=True)

    async def ended(
        self,
        *,
        task: str | None = None,
        finished_before: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[EndedRun], str | None]:
        """See :meth:`RunStore.ended`: filtered by SQLite, five columns per run, so the
        runs kept cost the store's thread no Python work (and the event loop no GIL)."""
        check_ended_args(task, finished_before, limit)
        where = [f"status IN ({', '.join(['?'] * len(_ENDED))})"]
        args: list[Any] = list(_ENDED)
        if task is not None:
            where.append("task = ?")
            args.append(task)
        if finished_before is not None:
            where.append("COALESCE(finished_at, created_at) < ?")
            args.append(finished_before)
        columns = "id, task, status, created_at, finished_at"
        return await self._page(columns, where, args, limit, cursor, _ended_from_row)

    async def missing(self, ids: Iterable[str]) -> set[str]:
        """See :meth:`RunStore.missing`: only the missing ids come back from SQLite."""
        wanted = check_ids(ids)

        def query(conn: sqlite3.Connection) -> set[str]:
            gone: set[str] = set()
            for start in range(0, len(wanted), _IDS_PER_QUERY):
                chunk = wanted[start : start + _IDS_PER_QUERY]
                values = ", ".join(["(?)"] * len(chunk))
                gone.update(
                    row[0]
                    for row in conn.execute(
                        f"WITH ids(id) AS (VALUES {values}) SELECT id FROM ids"
                        " WHERE NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = ids.id)",
                        chunk,
                    )
                )
            return gone

        return await self._run(query) if wanted else set()

    async def list(
        self,
        *,
        status: RunStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        check_list_args(status, limit)
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if task is not None:
            where.append("task = ?")
            args.append(task)
        return await self._page(_COLUMNS, where, args, limit, cursor, _from_row)

    async def _page(
        self,
        columns: str,
        where: builtins.list[str],
        args: builtins.list[Any],
        limit: int,
        cursor: str | None,
        build: Callable[[tuple[Any, ...]], P],
    ) -> tuple[builtins.list[P], str | None]:
        """Runs matching ``where``, newest first after ``cursor``: a page and the next
        cursor (None when no further run matches: one more row is asked for)."""
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            where = [*where, "(created_at < ? OR (created_at = ? AND id < ?))"]
            args = [*args, created_at, created_at, last_id]
        sql = f"SELECT {columns} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args = [*args, limit + 1]

        def query(conn: sqlite3.Connection) -> builtins.list[P]:
            return [build(row) for row in conn.execute(sql, args)]

        rows = await self._run(query)
        if len(rows) > limit:
            last = rows[limit - 1]
            return rows[:limit], encode_cursor(last.created_at, last.id)
        return rows, None
