"""The SQLite log's helpers next to its writer thread: read connections, checkpoints
and the in-process write lock.

* :func:`write_lock` is the lock every writer of one file in this process (the log's
  writer thread, the run store's thread) holds around its write transactions. Without
  it, the second one to ``BEGIN IMMEDIATE`` gets ``SQLITE_BUSY`` and sleeps in SQLite's
  busy handler (1 ms, then 2, then 5 ...) however soon the first commits: an append
  behind a run store transaction of 1.5 ms waited 3 ms or more. Across processes the
  busy handler still decides.
* :func:`switch_to_wal` puts a file in WAL mode, waiting for the other connections
  that hold it as the busy timeout says (SQLite itself refuses at once).
* :class:`ReaderPool` hands read connections to pool threads, one thread at a time.
* :class:`Checkpointer` copies the WAL into the database file on a thread of its own.
  SQLite's automatic checkpoint runs inside a commit, on the writer thread, after
  whichever commit pushes the WAL past 1,000 pages: the appends queued behind that
  commit wait for the whole copy and its fsync (in the soak bench, 3.6-5.7 ms instead
  of under 1 ms, mostly during retention passes, whose deletions fill the WAL fast).
  The writer's connection therefore has ``wal_autocheckpoint = 0``, and this thread
  runs a ``PASSIVE`` checkpoint every :data:`~.sql.CHECKPOINT_INTERVAL` seconds when
  something was committed since. A passive checkpoint never blocks the writer nor
  waits for readers; frames a reader still needs are copied by a later one, and once
  the whole WAL is copied, the writer's next transaction starts it over (then
  ``journal_size_limit`` truncates the file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Checkpointer", "ReaderPool", "switch_to_wal", "write_lock"]

T = TypeVar("T")

log = logging.getLogger("runstream.backends")

_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()


def write_lock(path: str | os.PathLike[str]) -> threading.Lock:
    """The lock this process's writers of the SQLite file ``path`` share (see module doc)."""
    key = os.path.realpath(path)
    with _write_locks_guard:
        return _write_locks.setdefault(key, threading.Lock())


def switch_to_wal(conn: sqlite3.Connection, timeout: float) -> str:
    """``PRAGMA journal_mode = WAL`` on ``conn``; the journal mode now in effect.

    Switching a file that is not yet in WAL mode needs it to itself, and while another
    connection holds a write lock on it SQLite answers ``database is locked`` at once,
    without calling the busy handler: two server processes starting on one new file
    (``serve --processes``) made one of them fail. Retried every few milliseconds
    until ``timeout`` seconds have passed, then the error is raised.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            )
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@dataclass(slots=True)
class ReaderPool:
    """Read connections handed to pool threads one at a time."""

    open_conn: Callable[[], sqlite3.Connection]
    free: queue.SimpleQueue[sqlite3.Connection] = field(default_factory=queue.SimpleQueue)
    all: list[sqlite3.Connection] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self.free.get_nowait()
        except queue.Empty:
            conn = self.open_conn()
            with self.lock:
                self.all.append(conn)
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self.free.put(conn)

    def close(self) -> None:
        with self.lock:
            conns, self.all = self.all, []
        for conn in conns:
            conn.close()


class Checkpointer:
    """A thread running ``PRAGMA wal_checkpoint(PASSIVE)`` after commits; see the module doc.

    ``commits`` reads the writer's commit counter; a checkpoint runs only when it moved.
    ``covered`` is the counter's value when the last complete checkpoint started: every
    commit up to it is in the database file. A checkpoint a reader held back (it could
    not copy the frames the reader's snapshot predates) leaves it, so the next interval
    tries again even if nothing was committed since. Errors are logged and retried.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        commits: Callable[[], int],
        *,
        interval: float,
        name: str,
    ) -> None:
        self.conn = conn
        self.commits = commits
        self.interval = interval
        self.checkpoints = 0
        self.covered = 0
        self.failures = 0
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (blocking until it has) and close its connection."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.conn.close()

    def run_once(self) -> None:
        """One passive checkpoint if anything was committed since the last one."""
        seen = self.commits()
        if seen == self.covered:
            return
        try:
            # (busy, frames in the WAL, frames copied); -1s when the file is not in WAL mode
            _busy, frames, copied = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self.failures += 1
            if not self._failing:  # once per spell of failures, not every interval
                log.warning("sqlite checkpoint failed, retried every %gs: %s", self.interval, exc)
            self._failing = True
            return
        if self._failing:
            log.warning("sqlite checkpoint works again after %d failures", self.failures)
        self._failing = False
        self.checkpoints += 1
        if copied >= frames:  # else a reader held frames back: try again next interval
            self.covered = seen

    def _main(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()
