"""The SQLite engine's schema, statements and row helpers (no connection handling).

Shared by the event log (:mod:`.log`), its write operations (:mod:`.writes`)
and the run store. Ids: a stream's events have keys ``sid << ID_BITS | id``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from runstream.backends.base import event_size
from runstream.core.model import StreamInfo
from runstream.errors import BackendError, BackendUnavailable, ConfigError
from runstream.redact import mask_secrets

SCHEMA_VERSION = 3
"""Stored in ``PRAGMA user_version``: the last step of :data:`.migrate.STEPS`."""

JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the WAL file is truncated to after a checkpoint (``PRAGMA journal_size_limit``)."""

PURGE_BATCH = 1000
"""Events removed per write transaction when streams are deleted (a big stream in
several steps, small ones together): appends to other streams wait for one step at
most, not for the whole deletion. A step of 1,000 events takes about 0.85 ms here
(commit included), one of 5,000 1.6 ms; deleting ten streams of 200 events in steps
of 2,000 or 5,000 left the appends meanwhile with a longer tail (p99 2.0-3.0 ms
against 1.0-1.5 ms)."""

RECLAIM_STEP = 64
"""Free pages returned to the file system per write transaction (``incremental_vacuum``).

Small because an append queued behind a step waits for all of it: in the soak bench a
step of 256 pages took 6-7 ms; one of 64 takes 1.2 ms (p50, commit included), 2.9 ms at
p99."""

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a connection waits for another process's lock before giving up."""

CHECKPOINT_INTERVAL = 0.5
"""Seconds between the checkpointer's passive checkpoints (when something was committed).

The WAL holds at most about this long's worth of writes beyond what readers pin."""

POLL_INTERVAL = 0.025
"""Seconds between checks for commits made by other processes (while followers wait)."""

READER_THREADS = 4
"""Threads (each with its own connection) serving reads."""

ID_BITS = 32
MAX_EVENT_ID = (1 << ID_BITS) - 1
"""Largest event id a stream can reach in this backend (about 4.3 billion)."""
MAX_SID = (1 << (63 - ID_BITS)) - 1
"""Largest stream row id, so that ``sid << ID_BITS | id`` fits a signed 64-bit key."""

MAX_GROUP_REQUESTS = 1000
"""Upper bound of requests folded into one transaction, to bound commit latency."""

DECODE_CHUNK = 200
"""Events decoded per ``json.loads`` call when reading a page."""

POLL_CHUNK = 500
"""Stream names per query when the poller compares watched streams' state."""

Synchronous = Literal["off", "normal", "full", "extra"]
_SYNCHRONOUS_VALUES: tuple[Synchronous, ...] = ("off", "normal", "full", "extra")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS streams (
        sid INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        epoch TEXT NOT NULL,
        status TEXT NOT NULL,
        first_id INTEGER NOT NULL,
        last_id INTEGER NOT NULL,
        created_at REAL NOT NULL,
        closed_at REAL,
        close_status TEXT,
        close_reason TEXT
    )
    """,
    # key = sid << ID_BITS | id: one B-tree clustered by stream then id, so a
    # read is one range scan. (Measured against PRIMARY KEY (sid, id) WITHOUT
    # ROWID: equal for ~100-byte events, but 2 KB events made the file 2.3x
    # larger and reads slower, since such rows spill to overflow pages.)
    """
    CREATE TABLE IF NOT EXISTS events (
        key INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        time REAL NOT NULL
    )
    """,
    # For people inspecting the file with the sqlite3 shell.
    f"""
    CREATE VIEW IF NOT EXISTS stream_events AS
    SELECT s.name AS stream, e.key & {MAX_EVENT_ID} AS id, e.type, e.data, e.time
    FROM events AS e JOIN streams AS s ON s.sid = e.key >> {ID_BITS}
    """,
    """
    CREATE TABLE IF NOT EXISTS producers (
        sid INTEGER NOT NULL,
        producer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        first_id INTEGER NOT NULL,
        last_id INTEGER NOT NULL,
        PRIMARY KEY (sid, producer)
    ) WITHOUT ROWID
    """,
)

_DS_SCHEMA = (
    # Durable Streams (/v1/stream/...): one record per stream, its state as JSON
    # (runstream.core.durable.state_to_json); ``deadline`` is when it expires.
    """
    CREATE TABLE IF NOT EXISTS ds_streams (
        dsid INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        source INTEGER,
        state TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        deadline REAL
    )
    """,
    "CREATE INDEX IF NOT EXISTS ds_streams_deadline ON ds_streams (deadline) "
    "WHERE deadline IS NOT NULL",
    # key = dsid << ID_BITS | position: one range scan per read, as for events.
    """
    CREATE TABLE IF NOT EXISTS ds_entries (
        key INTEGER PRIMARY KEY,
        data BLOB NOT NULL
    )
    """,
)

_INFO_COLUMNS = (
    "name, epoch, status, first_id, last_id, created_at, closed_at, close_status, close_reason"
)
_SELECT_STREAM = f"SELECT sid, {_INFO_COLUMNS} FROM streams WHERE name = ?"
_INFO_MANY_CHUNK = 500
"""Names per ``IN (...)`` query in :meth:`SQLiteEventLog.info_many` (SQLite allows 32,766
parameters per statement; older builds 999)."""
_INSERT_EVENT = "INSERT INTO events (key, type, data, time) VALUES (?, ?, ?, ?)"
# One statement for a whole run of encoded events: their data texts travel as one
# JSON array of strings, and SQLite inserts the rows without coming back to Python.
_INSERT_EVENTS_JSON = (
    "INSERT INTO events (key, type, data, time) "
    "SELECT ?1 + j.key, ?2, j.value, ?3 FROM json_each(?4) AS j"
)
_JSON_EACH_PROBE = ('["\\"\\\\é😀"]', '"\\é😀')
"""A JSON array and the text ``json_each`` must give for its element."""

_encode_text_array = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), check_circular=False
).encode
"""Encodes a list of str as a JSON array; non-ASCII stays as it is (UTF-8 for SQLite)."""


def _base(sid: int) -> int:
    """Key of the (never stored) event 0 of stream ``sid``; event ``i`` is at ``base + i``."""
    return sid << ID_BITS


def _info(row: Sequence[Any]) -> StreamInfo:
    """Build a :class:`StreamInfo` from the columns of :data:`_INFO_COLUMNS`."""
    return StreamInfo(
        name=row[0],
        epoch=row[1],
        status=cast(Literal["open", "closed"], row[2]),
        first_id=row[3],
        last_id=row[4],
        created_at=row[5],
        closed_at=row[6],
        close_status=row[7],
        close_reason=row[8],
    )


def _translate(exc: sqlite3.Error, path: str, busy_timeout: float) -> BackendError:
    """Map a :mod:`sqlite3` error to a runstream error (the caller raises it ``from exc``)."""
    message = str(exc)
    if "locked" in message or "busy" in message:
        return BackendError(
            f"sqlite database {path!r} stayed locked by another connection for more than "
            f"busy_timeout={busy_timeout:g}s ({message}): another process holds a long write "
            "transaction; if that is expected, raise ?busy_timeout= in the backend URL"
        )
    if "not a database" in message or "malformed" in message:
        return BackendError(f"sqlite file {path!r} is not a usable runstream database: {message}")
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in message:
        return BackendUnavailable(f"cannot open sqlite database {path!r}: {message}")
    return BackendError(f"sqlite error on {path!r}: {message}")


def _has_json_each(conn: sqlite3.Connection) -> bool:
    """True if ``json_each`` exists and decodes a string exactly (escapes, non-ASCII)."""
    array, text = _JSON_EACH_PROBE
    try:
        rows = conn.execute("SELECT value FROM json_each(?)", (array,)).fetchall()
    except sqlite3.Error:
        return False
    return rows == [(text,)]


def _as_list(items: Sequence[str]) -> list[str] | tuple[str, ...]:
    return items if isinstance(items, (list, tuple)) else list(items)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_SELECT_EVENTS = (
    "SELECT key, type, data, time FROM events WHERE key > ? AND key <= ? ORDER BY key LIMIT ?"
)
_SELECT_EVENTS_AS_BYTES = (
    "SELECT key, CAST(type AS BLOB), CAST(data AS BLOB), time FROM events "
    "WHERE key > ? AND key <= ? ORDER BY key LIMIT ?"
)


def _fetch_events(
    conn: sqlite3.Connection, params: tuple[int, int, int], max_bytes: int | None
) -> list[Any]:
    """Rows ``(key, type, data, time)`` of one page, within ``max_bytes`` if given.

    Whatever bytes another program stored: sqlite3 fails a whole fetch on text
    that is not UTF-8. Then the page is read again as bytes and decoded here,
    keeping undecodable bytes as surrogates, so that :func:`events_from_rows`
    serves those rows as unreadable items instead of the page failing on every read.
    """
    try:
        cursor = conn.execute(_SELECT_EVENTS, params)
        try:
            if max_bytes is not None:
                return _rows_within(cursor, max_bytes)
            rows: list[Any] = []
            while chunk := cursor.fetchmany(DECODE_CHUNK):
                rows += chunk
                time.sleep(0)  # as in the decoding: let the writer have the GIL
            return rows
        finally:
            cursor.close()
    except sqlite3.OperationalError as exc:
        if "decode" not in str(exc):
            raise
    decoded = (
        (
            key,
            bytes(t).decode("utf-8", "surrogateescape"),
            bytes(d).decode("utf-8", "surrogateescape"),
            tm,
        )
        for key, t, d, tm in conn.execute(_SELECT_EVENTS_AS_BYTES, params)
    )
    return list(decoded) if max_bytes is None else _rows_within(decoded, max_bytes)


def _lenient(raw: bytes) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


def _rows_within(cursor: Iterable[Any], max_bytes: int) -> list[Any]:
    """Rows ``(key, type, data, time)`` fetched one at a time while within ``max_bytes``.

    The same cut as :func:`~runstream.backends.base.within_budget`. Row by row,
    so that at most one event past the budget is ever loaded (a ``fetchmany``
    of large events would load them all before any could be dropped).
    """
    rows: list[Any] = []
    total = 0
    for row in cursor:
        total += event_size(row[1], row[2])
        if rows and total > max_bytes:
            break
        rows.append(row)
        if total >= max_bytes:
            break
        if len(rows) % DECODE_CHUNK == 0:
            time.sleep(0)  # let the writer have the GIL
    return rows


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """The file path and the options (``synchronous``, ``busy_timeout``) of a ``sqlite:///`` URL.

    Raises :class:`ConfigError` for anything else.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise ConfigError(f"not a sqlite URL: {mask_secrets(url)!r}")
    if parts.netloc:
        raise ConfigError(
            f"invalid sqlite URL {mask_secrets(url)!r}: use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db (three slashes before a relative path)"
        )
    # The first "/" separates the empty authority from the path.
    path = unquote(parts.path[1:])
    if not path or path.endswith("/") or path == ":memory:":
        raise ConfigError(
            f"invalid sqlite URL {mask_secrets(url)!r}: name a database file, e.g. "
            "sqlite:///./.runstream/runstream.db (in-memory databases are not supported; "
            "use memory://)"
        )
    kwargs: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "synchronous":
            if value.lower() not in _SYNCHRONOUS_VALUES:
                raise ConfigError(
                    f"sqlite synchronous={value!r}: use one of {', '.join(_SYNCHRONOUS_VALUES)}"
                )
            kwargs["synchronous"] = value.lower()
        elif key == "busy_timeout":
            try:
                kwargs["busy_timeout"] = float(value)
            except ValueError:
                raise ConfigError(f"sqlite busy_timeout={value!r} is not a number") from None
        else:
            raise ConfigError(
                f"unknown sqlite URL parameter {key!r}: known are synchronous, busy_timeout"
            )
    return path, kwargs
