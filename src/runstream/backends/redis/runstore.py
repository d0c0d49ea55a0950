"""Run records on Redis, shared by every API server and worker that uses one Redis.

Layout (``P`` = the key prefix from the backend URL, default ``rs``; ``{id}``
is the run id as hash tag, the same tag as the run's own stream, so a run's
record, lease and event log live in one Redis Cluster slot)::

    P:{id}:run     hash: the RunRecord; ``status`` as plain text, every other
                   field JSON-encoded (``null`` for None)
    P:{id}:lease   string: name of the worker running the run (see dispatch.py)
    P:runs         sorted set: run ids scored by created_at, for listing
                   (the one cross-slot key; written after the record)
    P:cancel       pub/sub channel: run id whose cancellation was requested

Every status change is one Lua compare-and-set on the run hash. The statuses
it may start from are computed from :data:`runstream.runs.lifecycle.TRANSITIONS`
and passed to the script, so the table stays the only place that knows the
lifecycle. Cancellation sets ``cancel_requested`` and publishes the run id in
the same script: the flag is the truth, the message only a wake-up for the
worker that runs it.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.maint_notifications import MaintNotificationsConfig

from runstream.backends.redis.errors import translated
from runstream.backends.redis.log import RedisOptions, parse_url
from runstream.errors import (
    BackendError,
    ConfigError,
    IllegalTransition,
    RunNotFound,
    ValidationError,
)
from runstream.runs.lifecycle import (
    FINISHED,
    TRANSITIONS,
    RunStatus,
    check_transition,
    is_status,
)
from runstream.runs.model import RunRecord
from runstream.runs.store import (
    NUMBER_FIELDS,
    RUN_FIELDS,
    EndedRun,
    RunStore,
    check_deletable,
    check_ended_args,
    check_ids,
    check_list_args,
    check_new_record,
    decode_cursor,
    encode_cursor,
)

__all__ = ["RedisRunKeys", "RedisRunStore"]

P = TypeVar("P", RunRecord, EndedRun)

NO_MAINT_NOTIFICATIONS = MaintNotificationsConfig(enabled=False)
"""redis-py 8 turns maintenance notifications on ("auto") for RESP3, and with them on
its pool skips the check that drops a pooled connection the server closed: after a
Redis restart the first command on every idle connection would fail. Off, a stale
connection is noticed and replaced when it is taken from the pool."""

RUN_STORE_MAX_CONNECTIONS = 8
LIST_SCAN_BATCH = 200
"""Index entries fetched per round trip while filling a filtered page."""


_CREATE = """
-- KEYS[1] run hash. ARGV: field, value pairs.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

_TRANSITION = """
-- KEYS[1] run hash. ARGV[1] new status, ARGV[2] n = number of statuses the move may
-- start from, ARGV[3 .. 2+n] those statuses, ARGV[3+n] m = number of field guards,
-- then m (field, JSON value) guards that must match, then (field, JSON value) pairs to set.
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing'} end
local n = tonumber(ARGV[2])
local allowed = false
for i = 3, 2 + n do
  if ARGV[i] == cur then allowed = true; break end
end
if not allowed then return {'refused', cur} end
local m = tonumber(ARGV[3 + n])
local i = 4 + n
for _ = 1, m do
  local have = redis.call('HGET', KEYS[1], ARGV[i])
  if have ~= ARGV[i + 1] then return {'fenced', cur, ARGV[i], have or 'null'} end
  i = i + 2
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if i <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, i)) end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

_REQUEST_CANCEL = """
-- KEYS[1] run hash. ARGV[1] cancel channel, ARGV[2] run id.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

_DELETE = """
-- KEYS[1] run hash, KEYS[2] lease. ARGV: the statuses the run may be deleted in.
local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then return {'missing'} end
local cur = redis.call('HGET', KEYS[1], 'status')
for i = 1, #ARGV do
  if ARGV[i] == cur then
    redis.call('DEL', KEYS[1], KEYS[2])
    return {'ok', flat}
  end
end
return {'refused', flat}
"""

_SET_EXTRA = """
-- KEYS[1] run hash. ARGV[1] the extra JSON read, ARGV[2] the extra JSON to write,
-- ARGV[3..] the statuses the run must be in.
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing'} end
local ok = false
for i = 3, #ARGV do
  if ARGV[i] == cur then ok = true; break end
end
if not ok then return {'refused'} end
if redis.call('HGET', KEYS[1], 'extra') ~= ARGV[1] then return {'changed'} end
redis.call('HSET', KEYS[1], 'extra', ARGV[2])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

SET_EXTRA_ATTEMPTS = 5
"""Tries of :meth:`RedisRunStore.set_extra`'s compare-and-set before giving up."""


@dataclasses.dataclass(frozen=True, slots=True)
class RedisRunKeys:
    """Names of the run-related keys under one prefix (shared with the dispatcher)."""

    prefix: str

    def run(self, run_id: str) -> str:
        return f"{self.prefix}:{{{run_id}}}:run"

    def lease(self, run_id: str) -> str:
        return f"{self.prefix}:{{{run_id}}}:lease"

    @property
    def index(self) -> str:
        return f"{self.prefix}:runs"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:runq"


def _encode(record: RunRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in RUN_FIELDS:
        value = getattr(record, name)
        out[name] = value if name == "status" else _encode_value(name, value)
    return out


def _encode_value(name: str, value: Any) -> str:
    if name in NUMBER_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        # One spelling per number, so a fence on 5 matches the 5.0 stored (as elsewhere).
        value = float(value)
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"run field {name} is not JSON-serialisable: {exc}", field=name
        ) from exc


def _decode(run_id: str, flat: Mapping[str, str] | Sequence[str]) -> RunRecord:
    fields = (
        dict(zip(flat[::2], flat[1::2], strict=True)) if isinstance(flat, Sequence) else dict(flat)
    )
    values: dict[str, Any] = {}
    for name in RUN_FIELDS:
        raw = fields.get(name)
        if raw is None:
            continue
        values[name] = raw if name == "status" else json.loads(raw)
    status = values.get("status")
    if not isinstance(status, str) or not is_status(status):
        raise BackendError(f"run {run_id}: stored record has an invalid status {status!r}")
    values["id"] = run_id
    values.setdefault("params", {})
    values.setdefault("extra", {})
    try:
        return RunRecord(**values)
    except TypeError as exc:
        raise BackendError(f"run {run_id}: stored record is incomplete: {exc}") from exc


_ENDED_FIELDS = ("task", "status", "created_at", "finished_at")


def _ended_run(run_id: str, values: Sequence[str | None]) -> EndedRun:
    task, status, created_at, finished_at = values
    try:
        return EndedRun(
            run_id,
            json.loads(task or "null"),
            cast(RunStatus, status),
            float(json.loads(created_at or "null")),
            None if finished_at is None else json.loads(finished_at),
        )
    except (TypeError, ValueError) as exc:
        raise BackendError(f"run {run_id}: stored record is incomplete: {exc}") from exc


def _allowed_from(new: RunStatus, expect: Iterable[RunStatus] | None) -> list[RunStatus]:
    sources = [s for s, targets in TRANSITIONS.items() if new in targets]
    if expect is not None:
        wanted = set(expect)
        sources = [s for s in sources if s in wanted]
    return sources


class RedisRunStore(RunStore):
    """:class:`RunStore` on Redis hashes; many processes may share it.

    Create with :meth:`from_url` (the same URL as the Redis EventLog, including
    ``?prefix=``), then ``await start()`` (optional: connecting is lazy) and
    ``await aclose()`` when done. Every method raises runstream errors only:
    :class:`RunNotFound`, :class:`IllegalTransition`, :class:`ValidationError`,
    or :class:`BackendError` / :class:`BackendUnavailable` when Redis fails.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", options: RedisOptions | None = None):
        self.options = options or RedisOptions()
        if self.options.cluster:
            # The keys are laid out for Cluster (one hash tag per run, single-key scripts),
            # but the store, queue and workers still talk to one endpoint.
            raise ConfigError(
                "runs on Redis Cluster (?cluster=1) are not supported yet: use a standalone "
                "Redis, a primary behind Sentinel, or a Cluster-aware proxy"
            )
        self.keys = RedisRunKeys(self.options.prefix)
        self.url = url  # what redis-py connects to; the process's pub/sub listener is keyed by it
        try:
            self._pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=min(self.options.max_connections, RUN_STORE_MAX_CONNECTIONS),
                timeout=self.options.pool_timeout,
                socket_timeout=self.options.socket_timeout or None,
                socket_connect_timeout=self.options.socket_connect_timeout or None,
                decode_responses=True,
                # Strings in params round-trip exactly, unpaired surrogates included
                # (as in the EventLog, and as SQLite's escaped JSON does).
                encoding_errors="surrogatepass",
                # A timed-out script may have run: never resend a write behind the caller's back.
                retry=None,
                maint_notifications_config=NO_MAINT_NOTIFICATIONS,
            )
        except ValueError as exc:
            raise ConfigError(f"invalid redis URL: {exc}") from exc
        self.redis = aioredis.Redis(connection_pool=self._pool)
        self._create = self.redis.register_script(_CREATE)
        self._transition = self.redis.register_script(_TRANSITION)
        self._cancel = self.redis.register_script(_REQUEST_CANCEL)
        self._delete_script = self.redis.register_script(_DELETE)
        self._set_extra_script = self.redis.register_script(_SET_EXTRA)

    @classmethod
    def from_url(cls, url: str) -> RedisRunStore:
        """``redis://host:port/db?prefix=rs``; raises :class:`ConfigError` if invalid."""
        connect_url, options = parse_url(url)
        return cls(connect_url, options)

    async def start(self) -> None:
        with translated("PING"):
            await self.redis.ping()

    async def aclose(self) -> None:
        await self.redis.aclose()
        await self._pool.aclose()

    async def create(self, record: RunRecord) -> RunRecord:
        check_new_record(record)
        args = [item for pair in _encode(record).items() for item in pair]
        with translated("create run"):
            created = await self._create(keys=[self.keys.run(record.id)], args=args)
            if not created:
                raise ValidationError(f"run {record.id} already exists", field="id")
            # Cross-slot, so not in the script: a crash here leaves a record that get()
            # finds but list() does not, never the reverse.
            await self.redis.zadd(self.keys.index, {record.id: record.created_at})
        return record

    async def get(self, run_id: str) -> RunRecord:
        with translated("get run"):
            flat = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        if not flat:
            raise RunNotFound(f"run {run_id!r} does not exist")
        return _decode(run_id, flat)

    async def _move(
        self,
        run_id: str,
        new: RunStatus,
        expect: list[RunStatus] | None,
        match: Mapping[str, Any],
        fields: Mapping[str, Any],
    ) -> RunRecord:
        args: list[str | int] = [new]
        sources = _allowed_from(new, expect)
        args.append(len(sources))
        args.extend(sources)
        args.append(len(match))
        for name, value in match.items():
            args.extend((name, _encode_value(name, value)))
        for name, value in fields.items():
            args.extend((name, _encode_value(name, value)))
        with translated("transition run"):
            reply = await self._transition(keys=[self.keys.run(run_id)], args=args)
        kind = reply[0]
        if kind == "missing":
            raise RunNotFound(f"run {run_id!r} does not exist")
        if kind == "refused":
            current: RunStatus = reply[1]
            check_transition(run_id, current, new)  # raises with the table's message
            raise IllegalTransition(
                f"run {run_id}: is {current!r}, expected one of {sorted(expect or ())} "
                f"to move to {new!r}"
            )
        if kind == "fenced":
            raise IllegalTransition(
                f"run {run_id}: not moved to {new!r}; {reply[2]} is {reply[3]}, "
                f"not {_encode_value(reply[2], match[reply[2]])}"
            )
        return _decode(run_id, reply[1])

    async def stats(self) -> dict[str, float]:
        with translated("count runs"):
            return {"runs": float(await self.redis.zcard(self.keys.index))}

    async def _delete(self, run_id: str, expect: frozenset[RunStatus]) -> RunRecord:
        with translated("delete run"):
            reply = await self._delete_script(
                keys=[self.keys.run(run_id), self.keys.lease(run_id)], args=sorted(expect)
            )
            if reply[0] == "missing":
                raise RunNotFound(f"run {run_id!r} does not exist")
            record = _decode(run_id, reply[1])
            if reply[0] == "refused":
                check_deletable(record, expect)
            # Cross-slot, so after the script: list() skips index entries without a record.
            await self.redis.zrem(self.keys.index, run_id)
        return record

    async def _set_extra(
        self, run_id: str, key: str, value: Any, expect: frozenset[RunStatus]
    ) -> RunRecord | None:
        for _ in range(SET_EXTRA_ATTEMPTS):
            with translated("read run extra"):
                old = cast(str | None, await self.redis.hget(self.keys.run(run_id), "extra"))
            if old is None:
                raise RunNotFound(f"run {run_id!r} does not exist")
            extra = dict(json.loads(old))
            if value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
            with translated("set run extra"):
                reply = await self._set_extra_script(
                    keys=[self.keys.run(run_id)],
                    args=[old, _encode_value("extra", extra), *sorted(expect)],
                )
            if reply[0] == "missing":
                raise RunNotFound(f"run {run_id!r} does not exist")
            if reply[0] == "refused":
                return None
            if reply[0] == "ok":
                return _decode(run_id, reply[1])
        raise BackendError(f"run {run_id}: its extra kept changing; not updated")

    async def request_cancel(self, run_id: str) -> RunRecord:
        with translated("request cancel"):
            reply = await self._cancel(
                keys=[self.keys.run(run_id)], args=[self.keys.cancel_channel, run_id]
            )
        if reply[0] == "missing":
            raise RunNotFound(f"run {run_id!r} does not exist")
        return _decode(run_id, reply[1])

    async def list(
        self,
        *,
        status: RunStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """See :meth:`RunStore.list`.

        The index is scanned newest first and filters are applied to the
        records, so a rare status among many runs costs a longer scan (a full
        page also looks for one more match, to know whether there is a next
        page); the cursor is ``"<created_at>|<id>"`` of the last run returned.
        """
        check_list_args(status, limit)

        def select(rid: str, flat: dict[str, str]) -> RunRecord | None:
            if not flat:
                return None  # the record expired or was removed; the index lags behind
            record = _decode(rid, flat)
            if (status is not None and record.status != status) or (
                task is not None and record.task != task
            ):
                return None
            return record

        return await self._page(cursor, limit, None, select)

    async def ended(
        self,
        *,
        task: str | None = None,
        finished_before: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[builtins.list[EndedRun], str | None]:
        """See :meth:`RunStore.ended`: the index scanned as by :meth:`list`, reading the
        four fields retention needs of each run (no index by end time: Redis retention
        is mostly ``max_len``/``closed_ttl``, and the scan costs round trips, not GIL)."""
        check_ended_args(task, finished_before, limit)

        def select(rid: str, values: builtins.list[str | None]) -> EndedRun | None:
            if values[1] not in FINISHED:  # also a record gone since (all None)
                return None
            run = _ended_run(rid, values)
            if (task is not None and run.task != task) or (
                finished_before is not None and run.ended_at >= finished_before
            ):
                return None
            return run

        return await self._page(cursor, limit, _ENDED_FIELDS, select)

    async def missing(self, ids: Iterable[str]) -> set[str]:
        """See :meth:`RunStore.missing`: one pipelined ``EXISTS`` per id."""
        wanted = check_ids(ids)
        if not wanted:
            return set()
        with translated("check runs exist"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id in wanted:
                    pipe.exists(self.keys.run(run_id))
                found: list[int] = await pipe.execute()
        return {run_id for run_id, n in zip(wanted, found, strict=True) if not n}

    async def _page(
        self,
        cursor: str | None,
        limit: int,
        fields: Sequence[str] | None,
        select: Callable[[str, Any], P | None],
    ) -> tuple[builtins.list[P], str | None]:
        """What ``select`` makes of each run after ``cursor`` (newest first; None: skip
        it), given its id and its hash or ``fields`` as :meth:`_scan` reads them: a page
        and the cursor after it, None when no further run matches (a full page also
        looks for one more match)."""
        page: builtins.list[P] = []
        last: tuple[float, str] = (0.0, "")
        async for rid, score, reply in self._scan(cursor, limit, fields):
            item = select(rid, reply)
            if item is None:
                continue
            if len(page) == limit:
                return page, encode_cursor(*last)
            page.append(item)
            last = (score, rid)
        return page, None

    async def _scan(
        self, cursor: str | None, limit: int, fields: Sequence[str] | None
    ) -> AsyncIterator[tuple[str, float, Any]]:
        """Index entries after ``cursor``, newest first, with each run's hash (``HGETALL``;
        empty if gone) or its ``fields`` (``HMGET``; all None if gone)."""
        after = decode_cursor(cursor) if cursor is not None else None
        max_score: str = "+inf" if after is None else repr(after[0])
        offset = 0
        batch = max(LIST_SCAN_BATCH, limit + 1)
        while True:
            with translated("list runs"):
                entries = cast(
                    list[tuple[str, float]],
                    await self.redis.zrevrangebyscore(
                        self.keys.index, max_score, "-inf", start=offset, num=batch, withscores=True
                    ),
                )
                if not entries:
                    return
                offset += len(entries)
                if after is not None:
                    # Same score as the cursor: ZREVRANGE orders ties by id, descending.
                    entries = [
                        (rid, score) for rid, score in entries if score < after[0] or rid < after[1]
                    ]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for rid, _ in entries:
                        if fields is None:
                            pipe.hgetall(self.keys.run(rid))
                        else:
                            pipe.hmget(self.keys.run(rid), list(fields))
                    replies: list[Any] = await pipe.execute()
            for (rid, score), reply in zip(entries, replies, strict=True):
                yield rid, score, reply

    async def fence_state(self, run_id: str) -> tuple[RunStatus | None, str | None, int, bool]:
        """``(status, worker, attempt, cancel_requested)`` in one round trip.

        ``status`` is None if the run does not exist.
        """
        with translated("read run state"):
            values = cast(
                list[str | None],
                await self.redis.hmget(
                    self.keys.run(run_id), ["status", "worker", "attempt", "cancel_requested"]
                ),
            )
        status, worker, attempt, cancel = values
        if status is None or not is_status(status):
            return None, None, 0, False
        return (
            cast(RunStatus, status),
            json.loads(worker) if worker else None,
            int(json.loads(attempt)) if attempt else 1,
            bool(json.loads(cancel)) if cancel else False,
        )
