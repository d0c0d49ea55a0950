"""``sqlite:///path/to/file.db`` — the embedded, durable default backend.

Layout of the work:

* **One writer thread** owns the only write connection. Every append, close,
  delete and trim is a request on its queue. The thread takes *all* pending
  requests, runs them in one ``BEGIN IMMEDIATE`` transaction (a savepoint per
  request, so one failing request does not undo the others), commits once and
  only then resolves the callers' futures and wakes local followers. A burst of
  concurrent appends therefore costs one fsync, not one each (group commit).
  Bulk requests (purge and reclaim steps) never join a group: each has its own
  transaction after the group queued with it, so an append waits for one step of
  a deletion at most. An append is acknowledged only after its commit returned,
  so it survives a ``kill -9`` of the process (the WAL is in the OS page cache; with the default
  ``synchronous=full`` it is also on disk).
* **Encoded appends** (:meth:`~runstream.backends.base.EventLog.append_encoded`,
  how a command's output arrives) insert each run of events with one
  ``INSERT ... SELECT ... FROM json_each(?)``: SQLite builds the rows from one
  JSON array of their data texts with the GIL released throughout. Row by row
  (``executemany``), the writer needs the GIL back after every row, and while
  the event loop thread is busy (splitting the next output) each of those
  hand-offs can wait up to a whole switch interval. Without ``json_each``
  (SQLite built without JSON), rows are inserted one by one.
* **Checkpoints** (copying the WAL into the file) run on a thread of their own
  (:class:`~.helpers.Checkpointer`), never inside the writer's commits.
* **Readers** use their own connections from a small thread pool. The file is in
  WAL mode, so readers never block the writer and each read is one snapshot.
* **Other processes** may share the file (a CLI run next to a server). Their
  commits do not go through our writer. While something is followed, the writer
  checks ``PRAGMA data_version`` on its own connection after each group and
  every :data:`POLL_INTERVAL` seconds when idle; that value changes only when
  *another* connection committed, so our own commits cost no extra work. On a
  change, a poller task compares the followed streams' state with what it last
  saw and wakes the followers of those that changed (a stream it has not seen
  yet counts as changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from runstream.backends.base import EventLog, events_from_rows
from runstream.backends.durable import KEY_PREFIX
from runstream.backends.sqlite.helpers import (
    Checkpointer,
    ReaderPool,
    switch_to_wal,
    write_lock,
)
from runstream.backends.sqlite.migrate import migrate
from runstream.backends.sqlite.space import SpaceMixin
from runstream.backends.sqlite.sql import (
    _INFO_COLUMNS,
    _INFO_MANY_CHUNK,
    _SELECT_STREAM,
    _SYNCHRONOUS_VALUES,
    CHECKPOINT_INTERVAL,
    DECODE_CHUNK,
    DEFAULT_BUSY_TIMEOUT,
    JOURNAL_SIZE_LIMIT,
    MAX_EVENT_ID,
    MAX_GROUP_REQUESTS,
    POLL_CHUNK,
    POLL_INTERVAL,
    READER_THREADS,
    Synchronous,
    _as_list,
    _base,
    _chunks,
    _encode_text_array,
    _fetch_events,
    _has_json_each,
    _info,
    _resolve,
    _translate,
    parse_url,
)
from runstream.backends.sqlite.writes import (
    op_append,
    op_append_encoded,
    op_close,
)
from runstream.core.jsonbody import is_utf8
from runstream.core.model import (
    AppendResult,
    EncodedEvents,
    Event,
    NewEvent,
    Producer,
    StreamInfo,
    validate_stream_name,
)
from runstream.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    RunstreamError,
    StreamNotFound,
    ValidationError,
)

__all__ = ["SQLiteEventLog"]

T = TypeVar("T")


@dataclass(slots=True)
class _Request(Generic[T]):
    """One write for the writer thread: ``op`` runs inside the group transaction."""

    op: Callable[[sqlite3.Connection], T]
    stream: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    bulk: bool = False
    also: tuple[str, ...] = ()
    """Other streams the op changes (their followers are woken too)."""


class _Wake:
    """Queue item that only wakes the writer (to probe for other processes' commits)."""


_WAKE = _Wake()
_QueueItem: TypeAlias = "_Request[Any] | _Wake | None"
"""What the writer's queue carries; ``None`` asks it to stop."""


@dataclass(slots=True)
class _Outcome:
    request: _Request[Any]
    value: Any = None
    error: BaseException | None = None


class SQLiteEventLog(SpaceMixin, EventLog):
    """Streams stored in one SQLite file (WAL mode), shareable by processes on one machine.

    Create it with :meth:`from_url` or directly, then ``async with`` it (or
    call :meth:`start` / :meth:`aclose`). Methods called before :meth:`start`
    start it on first use; after :meth:`aclose` they raise
    :class:`~runstream.errors.BackendError` until :meth:`start` is called again.

    ``commits`` counts write transactions this instance committed; a burst of
    ``n`` concurrent appends typically needs far fewer than ``n``.
    """

    scheme = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "full",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
        readers: int = READER_THREADS,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        super().__init__()
        if synchronous not in _SYNCHRONOUS_VALUES:
            raise ConfigError(f"sqlite synchronous must be one of {', '.join(_SYNCHRONOUS_VALUES)}")
        if busy_timeout < 0 or poll_interval <= 0 or readers < 1 or checkpoint_interval <= 0:
            raise ConfigError(
                "sqlite busy_timeout >= 0, poll_interval > 0, readers >= 1"
                " and checkpoint_interval > 0"
            )
        self.path = os.fspath(path)
        self.synchronous: Synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.poll_interval = poll_interval
        self.readers = readers
        self.checkpoint_interval = checkpoint_interval
        self._write_lock = write_lock(self.path)
        self.commits = 0
        self.json_each = False
        """Whether this SQLite has ``json_each`` (checked by :meth:`start`): encoded
        appends insert a run in one statement; without it, row by row."""
        self._state: Literal["new", "running", "closed"] = "new"
        self._start_lock = asyncio.Lock()
        self._queue: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        self._queue_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._pool: ReaderPool | None = None
        self.checkpointer: Checkpointer | None = None
        """Copies the WAL into the file off the writer thread (see :mod:`.helpers`)."""
        self._read_executor: ThreadPoolExecutor | None = None
        self._poll_executor: ThreadPoolExecutor | None = None
        self._poll_conn: sqlite3.Connection | None = None
        self._poll_task: asyncio.Task[None] | None = None
        # Set (on the loop) when the writer saw another connection's commit.
        self._foreign_pending = False
        self._poll_waiter: asyncio.Future[None] | None = None
        self._foreign_version: int | None = None
        self._watching = False
        # stream -> (epoch, status, first_id, last_id) last seen by the poller; None = absent.
        self._seen: dict[str, tuple[str, str, int, int] | None] = {}

    # -- construction --------------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> SQLiteEventLog:
        """Parse ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

        Query parameters: ``synchronous`` (``off|normal|full|extra``, default
        ``full``), ``busy_timeout`` (seconds, default 5). Raises
        :class:`ConfigError` for anything else. Parent directories are created
        by :meth:`start`, not here.
        """
        path, kwargs = parse_url(url)
        return cls(path, **kwargs)

    def __repr__(self) -> str:
        return f"SQLiteEventLog({self.path!r}, synchronous={self.synchronous!r})"

    # -- connections ---------------------------------------------------------

    def _error(self, exc: sqlite3.Error) -> BackendError:
        return _translate(exc, self.path, self.busy_timeout)

    def _connect(self, *, writer: bool = False) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. Connections move
        # between pool threads but are never used by two threads at once.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if writer:  # the writer's and the checkpointer's
                conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
                # Without a limit, the WAL file keeps the size of its largest burst.
                conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_and_migrate(self) -> sqlite3.Connection:
        """Create the file, switch it to WAL and create/check the schema (blocking)."""
        parent = Path(self.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot create directory {str(parent)!r} for sqlite database: {exc}"
            ) from exc
        try:
            conn = self._connect(writer=True)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            mode = switch_to_wal(conn, self.busy_timeout)
            if str(mode).lower() != "wal":
                raise BackendError(
                    f"sqlite database {self.path!r} could not switch to WAL mode (got {mode!r})"
                )
            migrate(conn, self.path)
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
            self.json_each = _has_json_each(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the file (creating it and its directory), start the writer and poller.

        Idempotent. Raises :class:`BackendError` if the file is not a usable
        database or cannot be created.
        """
        async with self._start_lock:
            if self._state == "running":
                return
            conn = await asyncio.to_thread(self._open_and_migrate)
            try:
                self._poll_conn = await asyncio.to_thread(self._connect)
                checkpoint_conn = await asyncio.to_thread(self._connect, writer=True)
            except sqlite3.Error as exc:
                conn.close()
                if self._poll_conn is not None:
                    self._poll_conn.close()
                    self._poll_conn = None
                raise self._error(exc) from exc
            self.checkpointer = Checkpointer(
                checkpoint_conn,
                lambda: self.commits,
                interval=self.checkpoint_interval,
                name=f"runstream-sqlite-checkpoint:{self.path}",
            )
            self.checkpointer.start()
            self._writer_conn = conn
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(
                target=self._writer_main,
                args=(conn, self._queue, asyncio.get_running_loop()),
                name=f"runstream-sqlite-writer:{self.path}",
                daemon=True,
            )
            self._writer.start()
            self._pool = ReaderPool(self._connect)
            self._read_executor = ThreadPoolExecutor(
                self.readers, thread_name_prefix="runstream-sqlite-read"
            )
            self._poll_executor = ThreadPoolExecutor(1, thread_name_prefix="runstream-sqlite-poll")
            self._foreign_pending = False
            self._foreign_version = None
            self._watching = False
            self._seen.clear()
            self._state = "running"
            self._poll_task = asyncio.get_running_loop().create_task(
                self._poll_loop(), name="runstream-sqlite-poller"
            )

    async def aclose(self) -> None:
        """Finish queued writes, stop the threads and close every connection. Idempotent.

        Followers waiting on this backend wake up and end with :class:`BackendError`.
        """
        async with self._start_lock:
            if self._state != "running":
                self._state = "closed"
                return
            with self._queue_lock:
                self._state = "closed"
                self._queue.put(None)
            if self._poll_task is not None:
                self._poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._poll_task
                self._poll_task = None
            writer, pool = self._writer, self._pool
            read_executor, poll_executor = self._read_executor, self._poll_executor
            poll_conn, checkpointer = self._poll_conn, self.checkpointer
            self._writer = self._pool = self._writer_conn = self._poll_conn = None
            self.checkpointer = None
            self._read_executor = self._poll_executor = None

            def shutdown() -> None:
                if writer is not None:
                    writer.join()
                if checkpointer is not None:
                    checkpointer.close()
                for executor in (read_executor, poll_executor):
                    if executor is not None:
                        executor.shutdown(wait=True)
                if pool is not None:
                    pool.close()
                if poll_conn is not None:
                    poll_conn.close()

            await asyncio.to_thread(shutdown)
        self.notifier.notify_all()

    async def _ensure_running(self) -> None:
        if self._state == "running":
            return
        if self._state == "closed":
            raise BackendError(f"sqlite backend {self.path!r} is closed")
        await self.start()

    async def ping(self) -> None:
        """Raise :class:`BackendError` if the database file cannot be read."""
        await self._reader(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- writer thread -------------------------------------------------------

    async def _write(
        self,
        stream: str,
        op: Callable[[sqlite3.Connection], T],
        *,
        bulk: bool = False,
        also: tuple[str, ...] = (),
    ) -> T:
        """Queue ``op`` for the writer; return its result once its transaction committed.

        A ``bulk`` op (a step of a large deletion) gets a transaction of its own, after
        the writes queued with it. Followers of ``stream`` and of ``also`` are woken
        after the commit. If the caller is cancelled while waiting, the write may
        still be committed.
        """
        await self._ensure_running()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._queue_lock:
            if self._state != "running":
                raise BackendError(f"sqlite backend {self.path!r} is closed")
            self._queue.put(_Request(op, stream, loop, fut, bulk, also))
        return await fut

    def _writer_main(
        self,
        conn: sqlite3.Connection,
        requests: queue.SimpleQueue[_QueueItem],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        bulk: deque[_Request[Any]] = deque()  # waiting for a transaction of their own
        try:
            stopping = False
            while not stopping:
                try:
                    # While someone follows, wake up regularly to look for other
                    # processes' commits even when this one writes nothing.
                    if bulk:
                        first = requests.get_nowait()
                    else:
                        first = requests.get(timeout=self.poll_interval if self._watching else None)
                except queue.Empty:
                    first = _WAKE
                if first is None:
                    break
                batch: list[_Request[Any]] = []
                # Everything that queued up while the previous commit was syncing
                # goes into this transaction: that is the group commit.
                item: _QueueItem = first
                while True:
                    if isinstance(item, _Request):
                        (bulk if item.bulk else batch).append(item)
                        if len(batch) >= MAX_GROUP_REQUESTS:
                            break
                    try:
                        item = requests.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                if batch:
                    self._run_group(conn, batch)
                if bulk:  # one bulk step per group: it neither waits forever nor holds many
                    self._run_group(conn, [bulk.popleft()])
                if self._watching:
                    self._probe_foreign_commits(conn, loop)
            while bulk:
                self._run_group(conn, [bulk.popleft()])
        finally:
            leftovers: list[_Request[Any]] = list(bulk)
            while True:
                try:
                    item = requests.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Request):
                    leftovers.append(item)
            closed = f"sqlite backend {self.path!r} is closed"
            self._deliver_outcomes([_Outcome(r, error=BackendError(closed)) for r in leftovers])
            conn.close()

    def _probe_foreign_commits(
        self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Tell the poller if any other connection committed since the last probe.

        The writer's connection is the only one whose ``data_version`` ignores
        this backend's own commits (their followers were woken directly), so
        the poller compares stream states only when another process wrote.
        """
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            return  # the next probe will see it; followers also re-read on their own
        if version != self._foreign_version:
            self._foreign_version = version
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to wake
                loop.call_soon_threadsafe(self._on_foreign_commit)

    def _run_group(self, conn: sqlite3.Connection, batch: list[_Request[Any]]) -> None:
        """Run ``batch`` in one transaction and deliver every request's outcome.

        Never raises: whatever goes wrong is delivered to the waiting callers,
        so the writer thread survives to serve the next group.
        """
        outcomes: list[_Outcome] = []
        with self._write_lock:  # shared with this process's run store (see .helpers)
            try:
                failed = self._run_requests(conn, batch, outcomes)
                if failed is None and conn.in_transaction:
                    conn.execute("COMMIT")
                    self.commits += 1
            except Exception as exc:
                failed = self._wrap(exc)
            if failed is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        if failed is not None:
            for outcome in outcomes:
                if outcome.error is None:
                    outcome.error = failed
            done = {id(o.request) for o in outcomes}
            outcomes += [_Outcome(r, error=failed) for r in batch if id(r) not in done]
        self._deliver_outcomes(outcomes)

    def _run_requests(
        self, conn: sqlite3.Connection, batch: list[_Request[Any]], outcomes: list[_Outcome]
    ) -> Exception | None:
        """Run each request in its own savepoint; return an error that voids the whole group.

        A lone request needs no savepoint (its failure rolls back the whole
        transaction): every statement saved matters, since each one hands the
        GIL back and forth with reader threads.
        """
        savepoints = len(batch) > 1
        conn.execute("BEGIN IMMEDIATE")
        for request in batch:
            if savepoints:
                conn.execute("SAVEPOINT request")
            try:
                value = request.op(conn)
            except Exception as exc:
                error = self._wrap(exc)
                outcomes.append(_Outcome(request, error=error))
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (I/O error, disk
                    # full): nothing of this group is stored.
                    return error
                if savepoints:
                    conn.execute("ROLLBACK TO request")
                    conn.execute("RELEASE request")
                else:
                    conn.execute("ROLLBACK")
            else:
                if savepoints:
                    conn.execute("RELEASE request")
                outcomes.append(_Outcome(request, value=value))
        return None

    def _wrap(self, exc: Exception) -> Exception:
        """The exception a caller should see for ``exc`` raised on the writer thread."""
        if isinstance(exc, RunstreamError):
            return exc
        error = (
            self._error(exc)
            if isinstance(exc, sqlite3.Error)
            else BackendError(f"sqlite backend failed: {exc!r}")
        )
        error.__cause__ = exc
        return error

    def _deliver_outcomes(self, outcomes: list[_Outcome]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome.request.loop, []).append(outcome)
        for loop, items in by_loop.items():
            # The loop may be gone if its owner gave up waiting.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._resolve, items)

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        touched: set[str] = set()
        for outcome in outcomes:
            fut = outcome.request.future
            if outcome.error is None:
                touched.add(outcome.request.stream)
                touched.update(outcome.request.also)
            if fut.done():
                continue
            if outcome.error is not None:
                fut.set_exception(outcome.error)
            else:
                fut.set_result(outcome.value)
        for stream in touched:
            self.notifier.notify(stream)

    # -- write operations (run on the writer thread, inside a savepoint) -----

    # -- primitives ----------------------------------------------------------

    async def _append(
        self, stream: str, events: Sequence[NewEvent], producer: Producer | None
    ) -> AppendResult:
        batch = list(events)
        return await self._write(stream, lambda conn: op_append(conn, stream, batch, producer))

    async def _append_encoded(self, stream: str, runs: Sequence[EncodedEvents]) -> AppendResult:
        await self._ensure_running()
        # Encoded here, on the caller's thread: the writer thread then holds the GIL
        # only briefly per run and SQLite inserts the rows while others run Python.
        parts = [
            (
                run.type,
                run.data_json,
                _encode_text_array(_as_list(run.data_json)) if self.json_each else None,
            )
            for run in runs
        ]
        return await self._write(stream, lambda conn: op_append_encoded(conn, stream, parts))

    async def _close(self, stream: str, status: str | None, reason: str | None) -> StreamInfo:
        return await self._write(stream, lambda conn: op_close(conn, stream, status, reason))

    # -- reads ---------------------------------------------------------------

    async def _reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        await self._ensure_running()
        pool, executor = self._pool, self._read_executor
        assert pool is not None and executor is not None

        def run() -> T:
            try:
                return pool.run(fn)
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

        try:
            return await asyncio.get_running_loop().run_in_executor(executor, run)
        except RuntimeError as exc:  # the executor was shut down under us
            if self._state != "running":
                raise BackendError(f"sqlite backend {self.path!r} is closed") from exc
            raise

    async def _read(
        self, stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> tuple[StreamInfo, list[Event]]:
        def read(conn: sqlite3.Connection) -> tuple[StreamInfo, list[Event]]:
            # One read transaction: the state and the events are the same snapshot.
            conn.execute("BEGIN")
            try:
                row = conn.execute(_SELECT_STREAM, (stream,)).fetchone()
                if row is None:
                    raise StreamNotFound(stream)
                base = _base(row[0])
                rows = _fetch_events(conn, (base + after, base + MAX_EVENT_ID, limit), max_bytes)
            finally:
                conn.execute("COMMIT")
            # Decoded here, off the event loop: a large page would stall every
            # other task (and so every append's acknowledgement) for its duration.
            events: list[Event] = []
            for i in range(0, len(rows), DECODE_CHUNK):
                chunk = [(k - base, t, text, tm) for k, t, text, tm in rows[i : i + DECODE_CHUNK]]
                events += events_from_rows(stream, chunk, self)
                # Hand the GIL over between chunks. Otherwise the writer thread,
                # which needs it briefly between each of its SQLite calls, waits a
                # full switch interval for every one of them while pages decode.
                time.sleep(0)
            return _info(row[1:]), events

        return await self._reader(read)

    async def info(self, stream: str) -> StreamInfo:
        def read(conn: sqlite3.Connection) -> StreamInfo:
            row = conn.execute(_SELECT_STREAM, (stream,)).fetchone()
            if row is None:
                raise StreamNotFound(stream)
            return _info(row[1:])

        return await self._reader(read)

    async def info_many(self, streams: Sequence[str]) -> dict[str, StreamInfo | None]:
        for stream in streams:
            validate_stream_name(stream)

        def read(conn: sqlite3.Connection) -> dict[str, StreamInfo | None]:
            found: dict[str, StreamInfo | None] = dict.fromkeys(streams)
            for start in range(0, len(streams), _INFO_MANY_CHUNK):
                names = streams[start : start + _INFO_MANY_CHUNK]
                marks = ",".join("?" * len(names))
                query = f"SELECT name, {_INFO_COLUMNS} FROM streams WHERE name IN ({marks})"
                for row in conn.execute(query, tuple(names)):
                    found[row[0]] = _info(row[1:])
            return found

        # One reader call for all of them: a snapshot, and no thread hop per stream.
        return await self._reader(read)

    async def list_streams(
        self, *, prefix: str = "", start_after: str = "", limit: int = 100, end_before: str = ""
    ) -> list[StreamInfo]:
        if limit <= 0:
            return []
        checked = (("prefix", prefix), ("start_after", start_after), ("end_before", end_before))
        for label, value in checked:
            if not isinstance(value, str) or "\0" in value or not is_utf8(value):
                raise ValidationError(f"{label} must be a text string", field=label)
        # Names compare as UTF-8 bytes in SQLite, which is code point order, like Python.
        sql = f"SELECT {_INFO_COLUMNS} FROM streams WHERE name > ? AND name >= ?"
        params: list[Any] = [start_after, prefix]
        if prefix:
            sql += " AND substr(name, 1, ?) = ?"
            params += [len(prefix), prefix]
            if prefix.isascii():
                # Lets the index scan stop right after the last match.
                sql += " AND name < ?"
                params.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        if end_before:
            sql += " AND name < ?"
            params.append(end_before)
        sql += " ORDER BY name LIMIT ?"
        params.append(limit)

        def read(conn: sqlite3.Connection) -> list[StreamInfo]:
            return [_info(r) for r in conn.execute(sql, params)]

        return await self._reader(read)

    # -- cross-process wake-ups ----------------------------------------------

    def _on_foreign_commit(self) -> None:
        """Called on the loop when the writer saw another connection's commit."""
        self._foreign_pending = True
        waiter = self._poll_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._foreign_pending:
                # Sleep one interval, or less if the writer reports a foreign commit.
                waiter: asyncio.Future[None] = loop.create_future()
                timer = loop.call_later(self.poll_interval, _resolve, waiter)
                self._poll_waiter = waiter
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._poll_waiter = None
            watched = self.notifier.watched()
            if watched and not self._watching:
                self._watching = True
                self._queue.put(_WAKE)  # the writer may be parked without a timeout
            elif not watched:
                self._watching = False
            executor = self._poll_executor
            if not self._foreign_pending:
                continue
            # Cleared before comparing (or when nobody follows: a later follower
            # reads the current state anyway), so the next tick really waits.
            self._foreign_pending = False
            if not watched or executor is None:
                continue
            try:
                changed = await loop.run_in_executor(executor, self._poll_once, watched)
            except (sqlite3.Error, RunstreamError):
                # Transient (e.g. a lock during recovery): look again a tick later;
                # followers' safety re-read covers the rest.
                await asyncio.sleep(self.poll_interval)
                self._foreign_pending = True
                continue
            for stream in changed:
                self.notifier.notify(stream)

    def _poll_once(self, watched: list[str]) -> list[str]:
        """Streams among ``watched`` whose state changed since last seen (blocking)."""
        conn = self._poll_conn
        if conn is None:  # closing
            return []
        current: dict[str, tuple[str, str, int, int] | None] = dict.fromkeys(watched)
        # Durable Streams readers watch prefixed keys (backends/durable.KEY_PREFIX).
        ds = [w[len(KEY_PREFIX) :] for w in watched if w.startswith(KEY_PREFIX)]
        conn.execute("BEGIN")
        try:
            for chunk in _chunks(ds, POLL_CHUNK):
                marks = ",".join("?" * len(chunk))
                for name, state in conn.execute(
                    f"SELECT name, state FROM ds_streams WHERE name IN ({marks})", chunk
                ):
                    current[KEY_PREFIX + name] = ("ds", state, 0, 0)
            for chunk in _chunks(watched, POLL_CHUNK):
                marks = ",".join("?" * len(chunk))
                for name, epoch, status, first_id, last_id in conn.execute(
                    "SELECT name, epoch, status, first_id, last_id FROM streams "
                    f"WHERE name IN ({marks})",
                    chunk,
                ):
                    current[name] = (epoch, status, first_id, last_id)
        finally:
            conn.execute("COMMIT")
        # A stream seen for the first time is reported too: its follower may have
        # read an older state than the one recorded now.
        changed = [
            s for s, state in current.items() if s not in self._seen or self._seen[s] != state
        ]
        self._seen.update(current)
        if len(self._seen) > 4 * max(len(watched), 1000):
            self._seen = {s: self._seen[s] for s in watched}
        return changed
