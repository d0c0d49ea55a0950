"""Durable listener positions: where a listener resumes after a restart or a crash.

A *checkpoint* is a follower position (``"<epoch>:<id>"``, what
``follower.position`` returns and ``follow(after=...)`` accepts) stored under
a name. ``client.run_forever(stream, checkpoint=store)`` loads it when it
starts and moves it forward only past items whose handlers all finished
(:class:`Watermark`), saving in the background (:class:`CheckpointWriter`).
Delivery to handlers is therefore *at least once*: an event whose handlers
finished but whose checkpoint was not saved yet when the process died is
handled again after the restart. Key side effects with
``event.idempotency_key(stream)`` to make that harmless.

Stores (all implement :class:`CheckpointStore`):

* :class:`FileCheckpointStore` — one JSON file, replaced atomically
  (write, fsync, rename); one process at a time per file;
* :class:`SQLiteCheckpointStore` — a table in a SQLite file (WAL,
  ``synchronous=FULL``); several processes may share it;
* :class:`MemoryCheckpointStore` — for tests;
* anything else with async ``load(name)`` / ``save(name, position)`` (Redis,
  your database: save the checkpoint in the same transaction as your side
  effects and duplicates disappear altogether).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from runstream.client.metrics import Metrics
from runstream.client.policy import GiveUp, ReconnectState, RetryPolicy
from runstream.errors import ConfigError

log = logging.getLogger("runstream.client")

SAVE_RETRY = RetryPolicy(base_delay=0.2, max_delay=5.0, max_attempts=None, max_elapsed=None)
"""Between two failed background saves (the next update or flush tries again anyway)."""
SQLITE_TABLE = "runstream_checkpoints"
SQLITE_BUSY_MS = 5000


@runtime_checkable
class CheckpointStore(Protocol):
    """Where listener positions live. Implementations must be safe to call from one event loop.

    ``load`` returns the position saved under ``name`` (``None`` if none);
    ``save`` must be durable when it returns (the listener treats a returned
    save as done) and may raise to report a failure (the listener logs it and
    tries again later; handling goes on).
    """

    async def load(self, name: str) -> str | None: ...

    async def save(self, name: str, position: str) -> None: ...


class MemoryCheckpointStore:
    """Positions in a dict: for tests and for listeners that only need in-process restarts."""

    def __init__(self) -> None:
        self.positions: dict[str, str] = {}
        self.saves = 0

    async def load(self, name: str) -> str | None:
        return self.positions.get(name)

    async def save(self, name: str, position: str) -> None:
        self.positions[name] = position
        self.saves += 1


class FileCheckpointStore:
    """Positions in one JSON file ``{name: {"position": ..., "updated_at": ...}}``.

    Each save writes a temporary file next to it, fsyncs it, renames it over
    the old one and fsyncs the directory, so a crash leaves either the old or
    the new file, never half of one. Several listeners of one process may
    share a store; several *processes* must not share a file (the last writer
    would win for every name): give each its own file or use
    :class:`SQLiteCheckpointStore`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    async def load(self, name: str) -> str | None:
        return await asyncio.to_thread(self._load, name)

    async def save(self, name: str, position: str) -> None:
        await asyncio.to_thread(self._save, name, position)

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"checkpoint file {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"checkpoint file {self.path} does not hold a JSON object")
        return data

    def _load(self, name: str) -> str | None:
        with self._lock:
            entry = self._read().get(name)
        position = entry.get("position") if isinstance(entry, dict) else None
        return position if isinstance(position, str) else None

    def _save(self, name: str, position: str) -> None:
        with self._lock:
            data = self._read()
            data[name] = {"position": position, "updated_at": time.time()}
            directory = self.path.parent
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class SQLiteCheckpointStore:
    """Positions in a table of a SQLite file (created if missing); safe across processes.

    WAL journal, ``synchronous=FULL``: a save that returned survives a crash
    of the process or of the machine. The file may be the one your handlers
    write their results to, or a separate one. Call :meth:`close` when done
    (or let the process end).
    """

    def __init__(self, path: str | os.PathLike[str], *, table: str = SQLITE_TABLE) -> None:
        if not table.isidentifier():
            raise ConfigError(f"invalid checkpoint table name {table!r}")
        self.path = Path(path)
        self.table = table
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=SQLITE_BUSY_MS / 1000, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} "
                "(name TEXT PRIMARY KEY, position TEXT NOT NULL, updated_at REAL NOT NULL)"
            )
            conn.commit()
            self._conn = conn
        return self._conn

    async def load(self, name: str) -> str | None:
        return await asyncio.to_thread(self._load, name)

    async def save(self, name: str, position: str) -> None:
        await asyncio.to_thread(self._save, name, position)

    def _load(self, name: str) -> str | None:
        with self._lock:
            row = (
                self._connect()
                .execute(f"SELECT position FROM {self.table} WHERE name = ?", (name,))
                .fetchone()
            )
        return str(row[0]) if row is not None else None

    def _save(self, name: str, position: str) -> None:
        with self._lock:
            conn = self._connect()
            with conn:
                conn.execute(
                    f"INSERT INTO {self.table} (name, position, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET position = excluded.position, "
                    "updated_at = excluded.updated_at",
                    (name, position, time.time()),
                )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass(slots=True)
class _Entry:
    position: str
    jobs: int = 0
    sealed: bool = False


class Watermark:
    """Which items are settled, in stream order (sans I/O).

    Items are opened in stream order (:meth:`open`), get handler jobs
    (:meth:`add_job`), are sealed once every job is submitted (:meth:`seal`)
    and settle when sealed with no job left (:meth:`job_done`). Jobs finish
    in any order (handlers run concurrently); :attr:`position` is the position
    of the last item such that it *and every item before it* settled, which
    is what a checkpoint may safely hold. ``on_advance(position)`` is called
    whenever it moves.
    """

    def __init__(
        self, position: str | None = None, on_advance: Callable[[str], None] | None = None
    ) -> None:
        self.position = position
        self._on_advance = on_advance
        self._items: deque[tuple[int, _Entry]] = deque()
        self._by_seq: dict[int, _Entry] = {}
        self._next = 0

    @property
    def unsettled(self) -> int:
        """Items handed to handlers and not settled yet."""
        return len(self._items)

    def open(self, position: str) -> int:
        """Start tracking the next item (whose position after it is ``position``)."""
        seq = self._next
        self._next += 1
        entry = _Entry(position)
        self._items.append((seq, entry))
        self._by_seq[seq] = entry
        return seq

    def add_job(self, seq: int) -> None:
        self._by_seq[seq].jobs += 1

    def job_done(self, seq: int) -> None:
        entry = self._by_seq[seq]
        entry.jobs -= 1
        self._advance()

    def seal(self, seq: int) -> None:
        """No more jobs will be added to item ``seq``."""
        self._by_seq[seq].sealed = True
        self._advance()

    def _advance(self) -> None:
        moved = False
        while self._items:
            seq, entry = self._items[0]
            if not entry.sealed or entry.jobs > 0:
                break
            self._items.popleft()
            del self._by_seq[seq]
            self.position = entry.position
            moved = True
        if moved and self._on_advance is not None and self.position is not None:
            self._on_advance(self.position)


class CheckpointWriter:
    """Saves the latest settled position under ``name``, in the background, one save at a time.

    :meth:`update` never waits: while a save runs, newer positions replace
    each other and the newest is saved next (so a fast stream costs one save
    per save duration, not one per event). A failed save is logged, counted
    (``metrics.checkpoint_errors``) and tried again after a backoff. Call
    :meth:`aclose` at the end: it saves the last position (within ``grace``
    seconds).
    """

    def __init__(
        self, store: CheckpointStore, name: str, metrics: Metrics, *, saved: str | None = None
    ) -> None:
        self.store = store
        self.name = name
        self.metrics = metrics
        self.saved = saved
        self._latest = saved
        self._wake = asyncio.Event()
        self._saving = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._state = ReconnectState(SAVE_RETRY, allow_fallback=False)

    def update(self, position: str) -> None:
        self._latest = position
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"runstream-checkpoint-{self.name}")

    async def _save_latest(self) -> None:
        position = self._latest
        if position is None or position == self.saved:
            return
        await self.store.save(self.name, position)
        self.saved = position
        self.metrics.checkpoint = position

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with self._saving:
                    await self._save_latest()
            except Exception as exc:
                self.metrics.checkpoint_errors += 1
                decision = self._state.on_failure("checkpoint", loop.time())
                delay = 1.0 if isinstance(decision, GiveUp) else decision.delay
                log.warning(
                    "runstream checkpoint %r: saving %s failed (%r); retrying in %.1fs",
                    self.name,
                    self._latest,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                self._wake.set()
            else:
                self._state.on_event()

    async def aclose(self, grace: float = 5.0) -> bool:
        """Stop the background saver and save the last position; False if that failed."""
        try:
            async with asyncio.timeout(grace), self._saving:
                # A save in flight finished (a cancelled one could land after ours).
                if self._task is not None:
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task
                    self._task = None
                await self._save_latest()
        except Exception as exc:
            self.metrics.checkpoint_errors += 1
            log.error(
                "runstream checkpoint %r: the last position %s was not saved (%r); "
                "a restart resumes from %s and handles the events in between again",
                self.name,
                self._latest,
                exc,
                self.saved,
            )
            return False
        return True
