"""The write operations of the SQLite event log, run on its writer thread.

Each takes the writer's connection inside the group transaction (a savepoint
per request; see :mod:`.log`) and raises runstream errors for what to refuse.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from runstream.backends.sqlite.sql import (
    _INSERT_EVENT,
    _INSERT_EVENTS_JSON,
    _SELECT_STREAM,
    MAX_EVENT_ID,
    MAX_SID,
    _base,
    _info,
)
from runstream.core.model import (
    END_TYPE,
    AppendResult,
    NewEvent,
    Producer,
    StreamInfo,
    encode_data,
    new_epoch,
    now,
)
from runstream.errors import BackendError, StaleProducerSeq, StreamClosed, StreamNotFound


def _row(conn: sqlite3.Connection, stream: str) -> tuple[int, StreamInfo] | None:
    row = conn.execute(_SELECT_STREAM, (stream,)).fetchone()
    return None if row is None else (row[0], _info(row[1:]))


def _create(conn: sqlite3.Connection, stream: str) -> tuple[int, StreamInfo]:
    info = StreamInfo(stream, new_epoch(), "open", 1, 0, now())
    cur = conn.execute(
        "INSERT INTO streams (name, epoch, status, first_id, last_id, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (info.name, info.epoch, info.status, info.first_id, info.last_id, info.created_at),
    )
    sid = cur.lastrowid
    assert sid is not None
    if sid > MAX_SID:
        raise BackendError(f"the sqlite backend ran out of stream ids (max {MAX_SID})")
    return sid, info


def op_append(
    conn: sqlite3.Connection,
    stream: str,
    events: Sequence[NewEvent],
    producer: Producer | None,
) -> AppendResult:
    found = _row(conn, stream)
    if found is not None:
        sid, info = found
        if info.closed:
            raise StreamClosed(stream)
        if producer is not None:
            prev = conn.execute(
                "SELECT seq, first_id, last_id FROM producers WHERE sid = ? AND producer = ?",
                (sid, producer.id),
            ).fetchone()
            if prev is not None:
                last_seq, first, last = prev
                if producer.seq == last_seq:
                    return AppendResult(stream, info.epoch, first, last, duplicate=True)
                if producer.seq < last_seq:
                    raise StaleProducerSeq(stream, producer.id, producer.seq, last_seq)
    else:
        sid, info = _create(conn, stream)
    t = now()
    first_id = info.last_id + 1
    last_id = first_id + len(events) - 1
    if last_id > MAX_EVENT_ID:
        raise BackendError(
            f"stream {stream!r} would exceed the sqlite backend's limit of "
            f"{MAX_EVENT_ID} events; start a new stream"
        )
    base = _base(sid) + first_id
    conn.executemany(
        _INSERT_EVENT, [(base + i, e.type, e.data_json, t) for i, e in enumerate(events)]
    )
    conn.execute("UPDATE streams SET last_id = ? WHERE sid = ?", (last_id, sid))
    if producer is not None:
        conn.execute(
            "INSERT OR REPLACE INTO producers (sid, producer, seq, first_id, last_id) "
            "VALUES (?, ?, ?, ?, ?)",
            (sid, producer.id, producer.seq, first_id, last_id),
        )
    return AppendResult(stream, info.epoch, first_id, last_id)


def op_append_encoded(
    conn: sqlite3.Connection,
    stream: str,
    runs: Sequence[tuple[str, Sequence[str], str | None]],
) -> AppendResult:
    """Like :meth:`_op_append` (no producer) for ``(type, data texts, JSON array of them)``.

    The array is ``None`` when SQLite has no ``json_each``: rows are then
    inserted one by one, as :meth:`_op_append` does.
    """
    found = _row(conn, stream)
    if found is not None:
        sid, info = found
        if info.closed:
            raise StreamClosed(stream)
    else:
        sid, info = _create(conn, stream)
    t = now()
    first_id = info.last_id + 1
    last_id = first_id + sum(len(datas) for _, datas, _ in runs) - 1
    if last_id > MAX_EVENT_ID:
        raise BackendError(
            f"stream {stream!r} would exceed the sqlite backend's limit of "
            f"{MAX_EVENT_ID} events; start a new stream"
        )
    key = _base(sid) + first_id
    for type_, datas, array in runs:
        if array is None:
            conn.executemany(_INSERT_EVENT, [(key + i, type_, d, t) for i, d in enumerate(datas)])
        else:
            stored = conn.execute(_INSERT_EVENTS_JSON, (key, type_, t, array)).rowcount
            if stored != len(datas):  # cannot happen with a well-formed array
                raise BackendError(f"sqlite stored {stored} of {len(datas)} encoded events")
        key += len(datas)
    conn.execute("UPDATE streams SET last_id = ? WHERE sid = ?", (last_id, sid))
    return AppendResult(stream, info.epoch, first_id, last_id)


def op_close(
    conn: sqlite3.Connection, stream: str, status: str | None, reason: str | None
) -> StreamInfo:
    found = _row(conn, stream) or _create(conn, stream)
    sid, info = found
    if info.closed:
        return info
    t = now()
    end_id = info.last_id + 1
    data = encode_data({"status": status, "reason": reason})
    conn.execute(_INSERT_EVENT, (_base(sid) + end_id, END_TYPE, data, t))
    conn.execute(
        "UPDATE streams SET status = 'closed', last_id = ?, closed_at = ?, "
        "close_status = ?, close_reason = ? WHERE sid = ?",
        (end_id, t, status, reason, sid),
    )
    return StreamInfo(
        info.name,
        info.epoch,
        "closed",
        info.first_id,
        end_id,
        info.created_at,
        t,
        status,
        reason,
    )


def op_delete(conn: sqlite3.Connection, stream: str) -> None:
    found = _row(conn, stream)
    if found is None:
        raise StreamNotFound(stream)
    sid = found[0]
    conn.execute(
        "DELETE FROM events WHERE key > ? AND key <= ?", (_base(sid), _base(sid) + MAX_EVENT_ID)
    )
    conn.execute("DELETE FROM producers WHERE sid = ?", (sid,))
    conn.execute("DELETE FROM streams WHERE sid = ?", (sid,))


def op_trim(
    conn: sqlite3.Connection, stream: str, max_len: int | None, max_age: float | None
) -> int:
    found = _row(conn, stream)
    if found is None:
        raise StreamNotFound(stream)
    sid, info = found
    # Retained ids are contiguous first_id..last_id, so positions are arithmetic.
    new_first = info.first_id
    if max_len is not None:
        new_first = max(new_first, info.last_id - max_len + 1)
    if max_age is not None:
        # Times follow ids, so bisect for the first event young enough: a
        # few point lookups instead of a scan of the whole stream.
        cutoff = now() - max_age
        lo, hi = new_first, info.last_id + 1
        while lo < hi:
            mid = (lo + hi) // 2
            row = conn.execute(
                "SELECT time FROM events WHERE key = ?", (_base(sid) + mid,)
            ).fetchone()
            if row is not None and row[0] < cutoff:
                lo = mid + 1
            else:
                hi = mid
        new_first = lo
    if info.closed:
        new_first = min(new_first, info.last_id)  # the end entry stays
    removed = new_first - info.first_id
    if removed <= 0:
        return 0
    conn.execute(
        "DELETE FROM events WHERE key > ? AND key < ?", (_base(sid), _base(sid) + new_first)
    )
    conn.execute("UPDATE streams SET first_id = ? WHERE sid = ?", (new_first, sid))
    return removed
