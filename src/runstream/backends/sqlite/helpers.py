"""The SQLite log's helpers next to its writer thread: read connections, checkpoints
and the in-process write lock.

* :func:`write_lock` is the lock every writer of one file in this process (the log's
  writer thread, the run store's thread) holds around its write transactions. Without
  it, the second one to ``BEGIN IMMEDIATE`` gets ``SQLITE_BUSY`` and sleeps in SQLite's
  busy handler (1 ms, then 2, then 5 ...) however soon the first commits: an append
  behind a run store transaction of 1.5 ms waited 3 ms or more. Across processes the
  busy handler still decides.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Checkpointer", "ReaderPool", "write_lock"]

T = TypeVar("T")

log = logging.getLogger("runstream.backends")

_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()


def write_lock(path: str | os.PathLike[str]) -> threading.Lock:
    """The lock this process's writers of the SQLite file ``path`` share (see module doc)."""
    key = os.path.realpath(path)
    with _write_locks_guard:
        return _write_locks.setdefault(key, threading.Lock())


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
    ``covered`` is the counter's value when the last finished checkpoint started: every
    commit up to it is in the database file, unless a reader held frames back (then
    the next checkpoint copies them). Errors are logged and retried next time.
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
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
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
        self.covered = seen

    def _main(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()
