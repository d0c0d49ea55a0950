"""``redis://`` / ``rediss://`` — Redis Streams, for many servers and workers on many hosts.

Layout (``P`` = key prefix, default ``rs``; ``{name}`` is the hash tag, so the
keys of one stream live in one Cluster slot)::

    P:{name}:log    stream; entry id "<offset>-0", fields t=type d=data JSON ts=time
    P:{name}:meta   hash: epoch status first_id last_id created_at closed_at
                    close_status close_reason
    P:{name}:prod   hash: producer id -> "seq:first_id:last_id"
    P:streams       sorted set of names, for list_streams (the one cross-slot key)
    P:wake          pub/sub channel; message = stream name (a wake-up only)

Every write is one Lua script (see :mod:`.lua`): appending, closing,
trimming and deleting are atomic and a batch is one round trip.

Followers: each process holds ONE pub/sub connection per Redis server (the
listener of :mod:`.redis_pubsub`, shared with the workers' cancel notices;
this log subscribes ``P:wake``) and a small bounded pool for commands. Wake-ups fan out in memory
through :attr:`notifier`; concurrent identical reads of a stream are merged
into one request, so a thousand local followers of one stream cost one read
per wake-up, not a thousand, and never more connections than the pool holds.
If Redis is unreachable, commands fail fast with
:class:`~runstream.errors.BackendUnavailable` while followers back off and
resume from the last id they delivered once Redis is back.

``?cluster=1`` switches to redis-py's Cluster client: the scripts and reads
touch one slot each, and ``PUBLISH`` reaches subscribers on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from runstream.backends.base import EventLog, events_from_rows
from runstream.backends.redis import lua
from runstream.backends.redis.batch import AppendBatcher
from runstream.backends.redis.errors import translated
from runstream.backends.redis.pubsub import (
    LISTEN_HEALTH_SECONDS,
    RedisListener,
    Subscription,
    listen_client_like,
    target,
)
from runstream.core.backoff import RECONNECT, BackoffState
from runstream.core.model import (
    AppendResult,
    EncodedEvents,
    Event,
    NewEvent,
    Producer,
    Reset,
    StreamInfo,
    encode_data,
    new_epoch,
    validate_stream_name,
)
from runstream.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    StaleProducerSeq,
    StreamClosed,
    StreamDeleted,
    StreamNotFound,
    ValidationError,
)
from runstream.protocol.cursor import Position
from runstream.redact import mask_secrets

__all__ = ["RedisEventLog", "RedisOptions"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "rs"
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_POOL_TIMEOUT = 10.0
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 2.0
FOLLOW_RECOVERY_WAIT = 10.0
"""Longest a follower waits for the wake-up reader to reconnect before probing Redis itself."""
INFO_MANY_CHUNK = 100
"""Streams per pipelined request in :meth:`RedisEventLog.info_many`."""

_ReadResult = tuple[StreamInfo, tuple[Event, ...]]
_ReadKey = tuple[int, int, int | None]


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Backend options, all settable in the URL query string.

    ``prefix`` namespaces every key (tenants or test runs can share a server).
    ``closed_ttl`` (seconds, 0 = keep) expires a closed stream with its metadata.
    ``max_len`` (0 = unbounded) trims each stream to its newest ``max_len``
    entries on append. ``max_connections`` bounds the command pool per process
    (the pub/sub connection is one more); callers wait up to ``pool_timeout``
    seconds for a free connection. ``socket_timeout``/``socket_connect_timeout``
    bound how long a command can hang on an unreachable server. ``cluster``
    connects with redis-py's Cluster client (the URL names any one node).
    """

    prefix: str = DEFAULT_PREFIX
    closed_ttl: float = 0.0
    max_len: int = 0
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    cluster: bool = False

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "{} \r\n"):
            raise ConfigError(f"redis key prefix {self.prefix!r} must be non-empty, without braces")
        for name in ("closed_ttl", "pool_timeout", "socket_timeout", "socket_connect_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"redis option {name} must be >= 0")
        if self.max_len < 0 or self.max_connections < 1:
            raise ConfigError("redis options need max_len >= 0 and max_connections >= 1")


def _flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


_OPTION_PARSERS: dict[str, Callable[[str], object]] = {
    "prefix": str,
    "closed_ttl": float,
    "max_len": int,
    "max_connections": int,
    "pool_timeout": float,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "cluster": _flag,
}


def parse_url(url: str) -> tuple[str, RedisOptions]:
    """Split ``url`` into the URL redis-py connects to and runstream's options.

    Raises :class:`ConfigError` for a bad scheme or option value. Query
    parameters runstream does not know are left for redis-py.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a redis URL: {mask_secrets(url)!r}")
    values: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        parser = _OPTION_PARSERS.get(key)
        if parser is None:
            rest.append((key, value))
            continue
        try:
            values[key] = parser(value)
        except ValueError as exc:
            raise ConfigError(f"invalid redis URL option {key}={value!r}") from exc
    return urlunsplit(parts._replace(query=urlencode(rest))), RedisOptions(**values)


def _as_info(name: str, meta: dict[str, str]) -> StreamInfo:
    def opt_float(key: str) -> float | None:
        value = meta.get(key)
        return float(value) if value else None

    status = meta["status"]
    return StreamInfo(
        name=name,
        epoch=meta["epoch"],
        status="closed" if status == "closed" else "open",
        first_id=int(meta["first_id"]),
        last_id=int(meta["last_id"]),
        created_at=float(meta["created_at"]),
        closed_at=opt_float("closed_at"),
        close_status=meta.get("close_status"),
        close_reason=meta.get("close_reason"),
    )


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisEventLog(EventLog):
    """Event log on Redis Streams. Create with :meth:`from_url`, use with ``async with``."""

    scheme = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", options: RedisOptions | None = None):
        super().__init__()
        self.options = options or RedisOptions()
        opts = self.options
        prefix = opts.prefix
        self._index_key = f"{prefix}:streams"
        self._channel = f"{prefix}:wake"
        common: dict[str, Any] = {
            "socket_timeout": opts.socket_timeout or None,
            "socket_connect_timeout": opts.socket_connect_timeout or None,
            "decode_responses": True,
            # Input is checked to be valid UTF-8 text, but an entry written by another
            # program may not be: its bytes decode to lone surrogates, and the read
            # serves that entry as an "unreadable" item instead of failing the page.
            "encoding_errors": "surrogateescape",
            # No silent retries: a timed-out script may have run, and re-running an append
            # would store it twice. Callers see BackendUnavailable and decide.
            "retry": None,
            # With maintenance notifications on ("auto"), redis-py skips its check for
            # connections the server closed, so after a Redis restart the first command
            # on each pooled connection would fail. We need the check more than the hints.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        self._url = url
        self._cluster_kwargs: dict[str, Any] = {}
        self._redis: aioredis.Redis | RedisCluster
        self._pool: aioredis.BlockingConnectionPool | None = None
        try:
            if opts.cluster:
                # Cluster pools raise instead of waiting when full: the semaphore below
                # does the waiting. No retries, as above (MOVED/ASK are still followed).
                self._cluster_kwargs = {**common, "retry": Retry(NoBackoff(), 0)}
                self._redis = RedisCluster.from_url(
                    url, max_connections=opts.max_connections, **self._cluster_kwargs
                )
            else:
                self._pool = aioredis.BlockingConnectionPool.from_url(
                    url, max_connections=opts.max_connections, timeout=opts.pool_timeout, **common
                )
                self._redis = aioredis.Redis(connection_pool=self._pool)
        except ValueError as exc:
            raise ConfigError(f"invalid redis URL: {exc}") from exc
        # At most this many commands in flight per process, whatever the client type.
        self._slots = asyncio.Semaphore(opts.max_connections)
        self._ready = not opts.cluster
        self._ready_lock = asyncio.Lock()
        self._append_script = self._redis.register_script(lua.APPEND)
        self._close_script = self._redis.register_script(lua.CLOSE)
        self._delete_script = self._redis.register_script(lua.DELETE)
        self._trim_script = self._redis.register_script(lua.TRIM)
        self._read_script = self._redis.register_script(lua.READ)
        self._appends: AppendBatcher | None = (
            None
            if isinstance(self._redis, RedisCluster)
            else AppendBatcher(self._redis, self._append_script, self._op)
        )
        """Concurrent appends in one pipelined round trip (not on Cluster: see .batch)."""
        self._wakeups: Subscription | None = None
        self._listening = asyncio.Event()
        """Set while the wake-up channel is subscribed (see :mod:`.redis_pubsub`)."""
        self._closed = False
        # Reads in flight that a new caller may join: stream -> (after, limit, max_bytes) -> task.
        self._shared: dict[str, dict[_ReadKey, asyncio.Task[_ReadResult]]] = {}

    @classmethod
    def from_url(cls, url: str) -> RedisEventLog:
        """``redis://[user:pass@]host:port/db?prefix=rs&closed_ttl=86400&max_len=0&...``.

        See :class:`RedisOptions` for the runstream options; other query
        parameters go to redis-py. Raises :class:`ConfigError` if invalid.
        """
        connect_url, options = parse_url(url)
        return cls(connect_url, options)

    def keys(self, stream: str) -> tuple[str, str, str]:
        """The (log, meta, producers) keys of ``stream``; they share the hash tag ``{stream}``."""
        base = f"{self.options.prefix}:{{{stream}}}"
        return f"{base}:log", f"{base}:meta", f"{base}:prod"

    @property
    def connection_pool(self) -> aioredis.BlockingConnectionPool | None:
        """The bounded command pool (None with ``cluster``; for monitoring only)."""
        return self._pool

    @contextlib.asynccontextmanager
    async def _op(self, what: str) -> AsyncIterator[None]:
        """Run one operation's commands: a free slot, then errors translated."""
        self._check_open()
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.options.pool_timeout or None):
                    await self._slots.acquire()
            except TimeoutError:
                raise BackendUnavailable(
                    f"no free redis connection for {what} within {self.options.pool_timeout}s"
                ) from None
        else:
            await self._slots.acquire()
        try:
            with translated(what):
                if not self._ready:
                    await self._prepare()
                yield
        finally:
            self._slots.release()

    async def _prepare(self) -> None:
        # redis-py's Cluster client loads the slot map lazily, and concurrent first
        # commands each reload it, dropping each other's connections: load it once.
        async with self._ready_lock:
            if not self._ready:
                if isinstance(self._redis, RedisCluster):
                    await self._redis.initialize()
                self._ready = True

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start the pub/sub reader and wait (up to the connect timeout) until it listens.

        Does not fail if Redis is down: commands raise until it is reachable
        and the reader keeps retrying in the background.
        """
        if self._closed:
            raise BackendError("this redis backend was closed; create a new one")
        self._ensure_listener()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._listening.wait(), self.options.socket_connect_timeout or None
            )

    async def __aenter__(self) -> RedisEventLog:
        await self.start()
        return self

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        wakeups, self._wakeups = self._wakeups, None
        if wakeups is not None:
            await wakeups.aclose()
        # Followers blocked on a wake-up read again, find the backend closed and end.
        self.notifier.notify_all()
        await self._redis.aclose()
        if self._pool is not None:
            await self._pool.aclose()

    async def ping(self) -> None:
        async with self._op("PING"):
            await self._redis.ping()

    async def storage_stats(self) -> dict[str, float]:
        """``used_memory`` (bytes, the whole Redis) and ``keys`` (in this database)."""
        async with self._op("INFO memory"):
            info = await self._redis.info("memory")
            keys = await self._redis.dbsize()
        return {"used_memory": float(info.get("used_memory", 0)), "keys": float(keys)}

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this redis backend is closed")

    # -- wake-ups ------------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._wakeups is None and not self._closed:
            listener = RedisListener.shared(
                target(self._url, cluster=self.options.cluster), self._listen_client
            )
            self._wakeups = listener.subscribe(
                self._channel,
                on_message=self._wake,
                on_ready=self._on_listening,
                on_lost=self._on_not_listening,
            )

    def _listen_client(self) -> aioredis.Redis | RedisCluster:
        """A client for the process's pub/sub listener of this server (one connection)."""
        if not isinstance(self._redis, RedisCluster):
            return listen_client_like(self._redis)
        kwargs = {**self._cluster_kwargs, "health_check_interval": LISTEN_HEALTH_SECONDS}
        return RedisCluster.from_url(self._url, max_connections=2, **kwargs)

    def _on_listening(self) -> None:
        # Anything appended while we were not subscribed was not announced: have every
        # follower look again.
        self._listening.set()
        self._wake_all()

    def _on_not_listening(self) -> None:
        # Followers find out about the outage on their next read and back off.
        self._listening.clear()
        self._wake_all()

    def _wake(self, stream: str) -> None:
        # Something changed: reads already in flight may predate it, so later callers
        # must not join them.
        self._shared.pop(stream, None)
        self.notifier.notify(stream)

    def _wake_all(self) -> None:
        self._shared.clear()
        self.notifier.notify_all()

    # -- primitives ----------------------------------------------------------

    async def _append(
        self, stream: str, events: Sequence[NewEvent], producer: Producer | None
    ) -> AppendResult:
        fields: list[str] = []
        for event in events:
            fields.append(event.type)
            fields.append(event.data_json)
        return await self._append_fields(stream, len(events), "\0".join(fields), producer)

    async def _append_encoded(self, stream: str, runs: Sequence[EncodedEvents]) -> AppendResult:
        # The same fields as _append (type, data, ... joined by NUL), built a run at a time.
        parts = [run.type + "\0" + ("\0" + run.type + "\0").join(run.data_json) for run in runs]
        count = sum(len(run.data_json) for run in runs)
        return await self._append_fields(stream, count, "\0".join(parts), None)

    async def _append_fields(
        self, stream: str, count: int, fields: str, producer: Producer | None
    ) -> AppendResult:
        """Append ``count`` events given as type, data, type, data... joined by NUL characters.

        Neither a validated type nor JSON text can contain a NUL.
        """
        self._check_open()
        # Two NUL-separated arguments (see the script): redis-py packs each argument in
        # Python, which would otherwise dominate the cost of an append.
        header = "\0".join(
            (
                new_epoch(),
                str(self.options.max_len),
                str(count),
                str(producer.seq) if producer is not None else "0",
                producer.id if producer is not None else "",
            )
        )
        args = [
            header.encode("utf-8", "surrogateescape"),
            fields.encode("utf-8", "surrogateescape"),
        ]
        if self._appends is not None:
            reply = await self._appends.run(self.keys(stream), args)
        else:
            async with self._op("append"):
                reply = await self._append_script(keys=self.keys(stream), args=args)
        kind = reply[0]
        if kind == "closed":
            raise StreamClosed(stream)
        if kind == "stale":
            assert producer is not None
            raise StaleProducerSeq(stream, producer.id, producer.seq, int(reply[1]))
        epoch, first_id, last_id = str(reply[1]), int(reply[2]), int(reply[3])
        if kind == "dup":
            return AppendResult(stream, epoch, first_id, last_id, duplicate=True)
        if reply[4]:
            await self._index(stream)
        self._wake(stream)
        return AppendResult(stream, epoch, first_id, last_id)

    async def _index(self, stream: str) -> None:
        # The index lives outside the stream's slot, so it cannot be in the script. The
        # append already succeeded: failing it now would invite a duplicate retry.
        try:
            async with self._op("index"):
                await self._redis.zadd(self._index_key, {stream: 0})
        except BackendError as exc:
            log.warning("stream %r stored but not indexed for listing: %s", stream, exc)

    async def _read(
        self, stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> tuple[StreamInfo, list[Event]]:
        info, events = await self._shared_read(stream, after, limit, max_bytes)
        return info, list(events)

    async def _shared_read(
        self, stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> _ReadResult:
        """Read ``stream``, joining an identical read already in flight if nothing changed since.

        A wake-up drops the joinable reads of its stream (:meth:`_wake`), so a
        caller never joins a read that started before a change it was woken for.
        """
        self._check_open()
        joinable = self._shared.setdefault(stream, {})
        key = (after, limit, max_bytes)
        task = joinable.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._read_once(stream, after, limit, max_bytes)
            )
            joinable[key] = task
            task.add_done_callback(lambda t: self._read_done(stream, key, t))
        # Shielded: one caller giving up must not cancel the read for the others.
        return await asyncio.shield(task)

    def _read_done(self, stream: str, key: _ReadKey, task: asyncio.Task[_ReadResult]) -> None:
        joinable = self._shared.get(stream)
        if joinable is not None and joinable.get(key) is task:
            del joinable[key]
            if not joinable:
                del self._shared[stream]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported as lost

    async def _read_once(
        self, stream: str, after: int, limit: int, max_bytes: int | None
    ) -> _ReadResult:
        log_key, meta_key, _ = self.keys(stream)
        meta: dict[str, str]
        entries: list[tuple[str, dict[str, str]]]
        async with self._op("read"):
            if limit == 0:
                meta = await self._redis.hgetall(meta_key)  # type: ignore[assignment]
                entries = []
            elif max_bytes is not None:
                # A script, so that Redis itself stops at the byte budget (XRANGE counts only).
                flat_meta, raw = await self._read_script(
                    keys=[log_key, meta_key], args=[f"{after + 1}-0", limit, max_bytes]
                )
                meta = _pairs(flat_meta)
                entries = [(entry_id, _pairs(fields)) for entry_id, fields in raw]
            else:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hgetall(meta_key)
                    pipe.xrange(log_key, min=f"{after + 1}-0", max="+", count=limit)
                    meta, entries = await pipe.execute()
        if not meta:
            raise StreamNotFound(stream)
        rows = [
            (int(entry_id.partition("-")[0]), f["t"], f["d"], float(f["ts"]))
            for entry_id, f in entries
        ]
        return _as_info(stream, meta), tuple(events_from_rows(stream, rows, self))

    async def info(self, stream: str) -> StreamInfo:
        # A zero-length read: many followers starting at once share one request.
        info, _ = await self._shared_read(stream, 0, 0)
        return info

    async def info_many(self, streams: Sequence[str]) -> dict[str, StreamInfo | None]:
        self._check_open()
        found: dict[str, StreamInfo | None] = {}
        for start in range(0, len(streams), INFO_MANY_CHUNK):
            names = streams[start : start + INFO_MANY_CHUNK]
            for name in names:
                validate_stream_name(name)
            async with self._op("info"), self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys(name)[1])
                metas: list[dict[str, str]] = await pipe.execute()
            for name, meta in zip(names, metas, strict=True):
                found[name] = _as_info(name, meta) if meta else None
        return found

    async def _close(self, stream: str, status: str | None, reason: str | None) -> StreamInfo:
        self._check_open()
        args: list[str | int] = [
            new_epoch(),
            self._channel,
            stream,
            encode_data({"status": status, "reason": reason}),
            int(status is not None),
            status or "",
            int(reason is not None),
            reason or "",
            round(self.options.closed_ttl * 1000),
        ]
        async with self._op("close"):
            created, meta = await self._close_script(keys=self.keys(stream), args=args)
        if created:
            await self._index(stream)
        self._wake(stream)
        return _as_info(stream, _pairs(meta))

    async def delete(self, stream: str) -> None:
        self._check_open()
        async with self._op("delete"):
            # Unlist first: a re-creation can only happen after the keys are gone, so its
            # own ZADD comes after this ZREM and is never undone by it.
            await self._redis.zrem(self._index_key, stream)
            found = await self._delete_script(keys=self.keys(stream), args=[self._channel, stream])
        self._wake(stream)
        if not found:
            raise StreamNotFound(stream)

    async def list_streams(
        self, *, prefix: str = "", start_after: str = "", limit: int = 100, end_before: str = ""
    ) -> list[StreamInfo]:
        self._check_open()
        if limit < 1:
            return []
        low = f"({start_after}" if start_after >= prefix and start_after else f"[{prefix}"
        if low == "[":
            low = "-"
        # Names are ASCII, so U+00FF (two bytes, both > 0x7F) sorts after any name with the prefix.
        high = f"[{prefix}\u00ff" if prefix else "+"
        if end_before and (not prefix or end_before <= f"{prefix}\u00ff"):
            high = f"({end_before}"
        found: list[StreamInfo] = []
        while len(found) < limit:
            async with self._op("list"):
                names: list[str] = await self._redis.zrangebylex(  # type: ignore[assignment]
                    self._index_key, low, high, start=0, num=limit - len(found)
                )
                if not names:
                    break
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.hgetall(self.keys(name)[1])
                    metas: list[dict[str, str]] = await pipe.execute()
            for name, meta in zip(names, metas, strict=True):
                if meta:
                    found.append(_as_info(name, meta))
                else:
                    await self._unlist(name)
            low = f"({names[-1]}"
        return found

    async def _unlist(self, name: str) -> None:
        # The stream expired or was deleted. Re-check after removing: a re-creation that
        # raced with us has already run its ZADD, which our ZREM would otherwise undo.
        async with self._op("list"):
            await self._redis.zrem(self._index_key, name)
            if await self._redis.exists(self.keys(name)[1]):
                await self._redis.zadd(self._index_key, {name: 0})

    async def trim(
        self, stream: str, *, max_len: int | None = None, max_age: float | None = None
    ) -> int:
        self._check_open()
        if (max_len is not None and max_len < 0) or (max_age is not None and max_age < 0):
            raise ValidationError("trim limits must be >= 0")
        args = [
            self._channel,
            stream,
            "" if max_len is None else str(max_len),
            "" if max_age is None else repr(float(max_age)),
        ]
        async with self._op("trim"):
            removed = int(await self._trim_script(keys=self.keys(stream)[:2], args=args))
        if removed < 0:
            raise StreamNotFound(stream)
        if removed:
            self._wake(stream)
        return removed

    # -- following -----------------------------------------------------------

    async def _follow(self, stream: str, position: Position) -> AsyncIterator[Event | Reset]:
        """The shared gap-free follow, made to survive Redis outages.

        When Redis is unreachable the follower backs off and restarts the
        shared loop from the last id it delivered *and its epoch*, so nothing
        is skipped or repeated, and a history lost meanwhile surfaces as a
        :class:`Reset` (or :class:`StreamDeleted` if the stream is gone).
        """
        self._ensure_listener()
        # Fix the start once: "now" is resolved here and the epoch is pinned, so a
        # restart after an outage resumes exactly where this follower was.
        if position.now or position.epoch is None:
            info = await self.info(stream)
            if position.now:
                position = Position(info.tail, info.epoch)
            else:
                position = Position(position.offset, info.epoch)
        offset, epoch = position.offset, position.epoch
        resumed = False
        backoff = BackoffState(RECONNECT)
        while True:
            try:
                async for item in super()._follow(stream, Position(offset, epoch)):
                    if isinstance(item, Reset):
                        offset, epoch = item.after, item.epoch
                    else:
                        offset = item.id
                    backoff.on_success()
                    yield item
                return
            except StreamNotFound as exc:
                if resumed and not isinstance(exc, StreamDeleted):
                    raise StreamDeleted(stream) from exc
                raise
            except BackendUnavailable as exc:
                if self._closed:
                    raise
                resumed = True
                delay = backoff.retry_after(str(exc), time.monotonic())
            # Only the except clause above gets here.
            await asyncio.sleep(delay)  # backoff while Redis is unreachable
            if not self._listening.is_set():
                # The wake-up reader retries the connection for the whole process; rather
                # than every follower probing a dead server, wait until it gets through
                # (bounded, in case only the subscription is failing).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._listening.wait(), FOLLOW_RECOVERY_WAIT)
