"""Durable Streams on the Redis engine: per stream a state key and an entry list.

Keys (``P`` the log's prefix; ``{name}`` the hash tag)::

    P:ds:{name}:s    the state, JSON (runstream.core.durable.state_to_json)
    P:ds:{name}:e    list of entries (binary strings); index = position - base - 1
    P:ds:deadlines   sorted set: name -> expiry time, for the sweep

**Appends** are one Lua script (:mod:`.durable_lua`): the closed check, the content type,
the idempotent producer's epoch fencing and sequence, ``Stream-Seq``, the entries, the new
state and the wake-up, atomically in one round trip (§5.2.1).

**Everything else** (create, fork, delete, expiry, reads, and appends the script hands
back) runs the engine-neutral operations of :mod:`runstream.backends.durable` in a worker
thread against what it reads from Redis, buffering its writes; one Lua script then applies
them only if every state it read is unchanged (a compare-and-set over the exact JSON
texts), else the operation runs again on fresh state. Wake-ups go through the log's
pub/sub channel under keys no event stream can have, so readers on every server wake on
any server's write.

Forks span keys of several streams, so DS streams are not served on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

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
    op_head,
    op_read,
    op_sweep,
)
from runstream.backends.redis import durable_lua
from runstream.backends.redis.errors import translated
from runstream.backends.redis.log import RedisEventLog, parse_url
from runstream.core.durable import (
    AppendRequest,
    CreateRequest,
    DsConflict,
    DsError,
    DsStaleEpoch,
    DsState,
    Outcome,
    ProducerClaim,
    entries_for,
    media_type,
    state_from_json,
    state_to_json,
)
from runstream.errors import BackendError, ConfigError, ValidationError

T = TypeVar("T")
MAX_TRIES = 50
LRANGE_CHUNK = 64

COMMIT = """
-- KEYS: every key the plan touches. ARGV[1]: JSON plan {checks, ops}; ARGV[2..]: values.
-- checks: [[key index, expected text or false]]: abort unless each key holds exactly that.
-- ops: [kind, key index, ...]: set (value argv), del, rpush (first argv, count),
--      zadd (score, member argv), zrem (member argv), publish (channel argv, message argv).
local plan = cjson.decode(ARGV[1])
for _, c in ipairs(plan.checks) do
  local v = redis.call('GET', KEYS[c[1]])
  if c[2] == false then
    if v then return 0 end
  elseif v ~= c[2] then
    return 0
  end
end
for _, o in ipairs(plan.ops) do
  local kind, key = o[1], KEYS[o[2]]
  if kind == 'set' then
    redis.call('SET', key, ARGV[o[3]])
  elseif kind == 'del' then
    redis.call('DEL', key)
  elseif kind == 'rpush' then
    for i = o[3], o[3] + o[4] - 1, 500 do
      redis.call('RPUSH', key, unpack(ARGV, i, math.min(i + 499, o[3] + o[4] - 1)))
    end
  elseif kind == 'zadd' then
    redis.call('ZADD', key, o[3], ARGV[o[4]])
  elseif kind == 'zrem' then
    redis.call('ZREM', key, ARGV[o[3]])
  elseif kind == 'publish' then
    redis.call('PUBLISH', ARGV[o[3]], ARGV[o[4]])
  end
end
return 1
"""


def _fast_entries(req: AppendRequest) -> list[bytes] | None:
    """The entries of a well-formed append for the script; ``None``: the general path decides."""
    if not req.body:
        return [] if req.close else None
    if req.content_type is None:
        return None
    try:
        return entries_for(req.content_type, req.body, allow_empty=False)
    except (DsError, ValidationError):
        return None


def _refusal(kind: str, reply: list[Any], claim: ProducerClaim | None) -> DsError:
    """The error of one of the script's refusals (the same as decide_append's)."""
    if kind == "closed":
        tail = int(reply[1])
        return DsConflict("the stream is closed", {"Stream-Closed": "true"}, tail=tail)
    if kind == "stale":
        assert claim is not None
        current = int(reply[1])
        return DsStaleEpoch(
            f"producer epoch {claim.epoch} is stale (current {current})",
            {"Producer-Epoch": str(current)},
        )
    if kind == "gap":
        expected, received = int(reply[1]), int(reply[2])
        return DsConflict(
            f"producer sequence gap: expected {expected}, received {received}",
            {"Producer-Expected-Seq": str(expected), "Producer-Received-Seq": str(received)},
        )
    if kind == "badepoch":
        return DsError("a new producer epoch must start at Producer-Seq 0")
    if kind == "ctype":
        return DsConflict(f"Content-Type does not match the stream's {reply[1]!r}")
    if kind == "seq":
        return DsConflict(f"Stream-Seq is not above the last one ({str(reply[1])[:40]!r})")
    return DsError(f"unexpected reply from the append script: {kind[:40]!r}")


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise BackendError(f"durable streams: unexpected reply from Redis: {type(value).__name__}")


@dataclass(eq=False, slots=True)
class _Node:
    state: DsState


@dataclass(slots=True)
class _Plan:
    keys: list[str] = field(default_factory=list)
    checks: list[list[Any]] = field(default_factory=list)
    ops: list[list[Any]] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)

    def key(self, name: str) -> int:
        if name not in self.keys:
            self.keys.append(name)
        return self.keys.index(name) + 1

    def value(self, data: bytes | str) -> int:
        self.values.append(data.encode() if isinstance(data, str) else data)
        return len(self.values) + 1


class _Repo(DsRepo[_Node]):
    """Reads go to Redis (state texts remembered for the check); writes are planned."""

    def __init__(self, client: redis.Redis, prefix: str, channel: str) -> None:
        self.r = client
        self.prefix = prefix
        self.channel = channel
        self.seen: dict[str, str | None] = {}
        self.written: dict[str, DsState | None] = {}
        self.plan = _Plan()
        self.touched: set[str] = set()

    def skey(self, name: str) -> str:
        return f"{self.prefix}:ds:{{{name}}}:s"

    def ekey(self, name: str) -> str:
        return f"{self.prefix}:ds:{{{name}}}:e"

    def get(self, name: str) -> _Node | None:
        if name in self.written:
            state = self.written[name]
            return None if state is None else _Node(state)
        key = self.skey(name)
        if key not in self.seen:
            raw = self.r.get(key)
            self.seen[key] = None if raw is None else _bytes(raw).decode()
        text = self.seen[key]
        return None if text is None else _Node(state_from_json(text))

    def state(self, node: _Node) -> DsState:
        return node.state

    def source(self, node: _Node) -> _Node | None:
        fork = node.state.fork
        return None if fork is None else self.get(fork.source)

    def entries(self, node: _Node, lo: int, hi: int, budget: int, used: int) -> list[bytes]:
        base = node.state.base
        out: list[bytes] = []
        index, stop = lo - base, hi - base - 1  # list indexes of positions lo + 1 .. hi
        key = self.ekey(node.state.name)
        while index <= stop:
            chunk = self.r.lrange(key, index, min(stop, index + LRANGE_CHUNK - 1))
            if not chunk:
                break
            for data in chunk:
                if (out or used) and used + len(data) > budget:
                    return out
                out.append(_bytes(data))
                used += len(data)
            index += len(chunk)
        return out

    def touch(self, node: _Node, state: DsState) -> None:
        self._write_state(state, wake=False)
        node.state = state

    def _write_state(self, state: DsState, *, wake: bool = True) -> None:
        plan = self.plan
        name = state.name
        self.written[name] = state
        plan.ops.append(["set", plan.key(self.skey(name)), plan.value(state_to_json(state))])
        deadline = state.deadline()
        index = plan.key(f"{self.prefix}:ds:deadlines")
        if deadline is None or state.deleted:
            plan.ops.append(["zrem", index, plan.value(name)])
        else:
            plan.ops.append(["zadd", index, deadline, plan.value(name)])
        if wake:
            self.touched.add(name)

    def _push(self, name: str, entries: list[bytes]) -> None:
        if entries:
            plan = self.plan
            first = len(plan.values) + 2
            plan.values += entries
            plan.ops.append(["rpush", plan.key(self.ekey(name)), first, len(entries)])

    def insert(self, state: DsState, entries: list[bytes], source: _Node | None) -> None:
        self.plan.ops.append(["del", self.plan.key(self.ekey(state.name))])
        self._write_state(state)
        self._push(state.name, entries)

    def save(self, node: _Node, state: DsState, entries: list[bytes]) -> None:
        self._write_state(state)
        self._push(state.name, entries)
        node.state = state

    def drop(self, node: _Node) -> None:
        plan = self.plan
        name = node.state.name
        self.written[name] = None
        plan.ops.append(["del", plan.key(self.skey(name))])
        plan.ops.append(["del", plan.key(self.ekey(name))])
        plan.ops.append(["zrem", plan.key(f"{self.prefix}:ds:deadlines"), plan.value(name)])
        self.touched.add(name)

    def expired(self, now: float) -> list[str]:
        names = self.r.zrangebyscore(f"{self.prefix}:ds:deadlines", "-inf", now, start=0, num=1000)
        return [_bytes(n).decode() for n in names]

    def commit(self, script: Any) -> bool:
        plan = self.plan
        if not plan.ops:
            return True
        for key, text in self.seen.items():
            plan.checks.append([plan.key(key), False if text is None else text])
        channel = plan.value(self.channel)
        for name in self.touched:
            plan.ops.append(["publish", 1, channel, plan.value(KEY_PREFIX + name)])
        doc = json.dumps({"checks": plan.checks, "ops": plan.ops})
        return bool(script(keys=plan.keys, args=[doc, *plan.values]))


class RedisDurableStore(DurableStore):
    """DS streams in the log's Redis, beside its event streams (same prefix)."""

    def __init__(self, log: RedisEventLog, url: str) -> None:
        super().__init__()
        self.log = log
        self.notifier = KeyedNotifier(log.notifier, KEY_PREFIX)
        clean, options = parse_url(url)
        if options.cluster:
            raise ConfigError("Durable Streams are not served on Redis Cluster yet")
        self._client = redis.Redis.from_url(
            clean,
            socket_timeout=options.socket_timeout or None,
            socket_connect_timeout=options.socket_connect_timeout or None,
            max_connections=options.max_connections,
        )
        self._script = self._client.register_script(COMMIT)
        self._append_lua = log._redis.register_script(durable_lua.APPEND)
        self._prefix = options.prefix
        self._channel = f"{options.prefix}:wake"
        self._threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ds-redis")
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_log(cls, url: str, log: EventLog) -> RedisDurableStore:
        if not isinstance(log, RedisEventLog):
            raise ConfigError("the Redis Durable Streams store needs the Redis event log")
        return cls(log, url)

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._client.close)

    def _run(self, op: Callable[[_Repo], T]) -> T:
        for _ in range(MAX_TRIES):
            repo = _Repo(self._client, self._prefix, self._channel)
            with translated("durable streams"):
                result = op(repo)
                if repo.commit(self._script):
                    loop = self._loop
                    for name in repo.touched:  # this process: wake without the round trip
                        if loop is not None:
                            loop.call_soon_threadsafe(self.notifier.notify, name)
                    return result
        raise BackendError(f"durable streams: gave up after {MAX_TRIES} conflicting writes")

    async def _do(self, op: Callable[[_Repo], T]) -> T:
        self._loop = asyncio.get_running_loop()
        return await self._loop.run_in_executor(self._threads, self._run, op)

    async def create(self, name: str, req: CreateRequest, now: float) -> tuple[DsState, bool]:
        uid = secrets.token_hex(6)
        return await self._do(lambda repo: op_create(repo, name, req, now, uid))

    async def append(self, name: str, req: AppendRequest, now: float) -> DsWrite:
        entries = _fast_entries(req)
        if entries is not None:
            write = await self._append_script_path(name, req, entries, now)
            if write is not None:
                return write
        return await self._do(lambda repo: op_append(repo, name, req, now))

    async def _append_script_path(
        self, name: str, req: AppendRequest, entries: list[bytes], now: float
    ) -> DsWrite | None:
        """One round trip (:data:`durable_lua.APPEND`); ``None``: take the general path."""
        claim = req.producer
        base = f"{self._prefix}:ds:{{{name}}}"
        args: list[bytes | str] = [
            repr(now),
            media_type(req.content_type) if entries and req.content_type else "",
            "1" if req.close else "0",
            claim.id if claim is not None else "",
            str(claim.epoch) if claim is not None else "0",
            str(claim.seq) if claim is not None else "0",
            req.stream_seq or "",
            self._channel,
            KEY_PREFIX + name,
            name,
            *entries,
        ]
        async with self.log._op("durable streams append"):
            reply = await self._append_lua(
                keys=[f"{base}:s", f"{base}:e", f"{self._prefix}:ds:deadlines"], args=args
            )
        kind = str(reply[0])
        if kind == "slow":
            return None
        if kind in ("ok", "closeonly", "dup"):
            state = state_from_json(str(reply[1]).encode("utf-8", "surrogateescape"))
            if kind == "dup":
                return DsWrite(Outcome.DUPLICATE, state)
            self.notifier.notify(name)
            return DsWrite(Outcome.APPENDED if kind == "ok" else Outcome.CLOSED, state)
        raise _refusal(kind, reply, claim)

    async def head(self, name: str, now: float) -> DsState:
        return await self._do(lambda repo: op_head(repo, name, now))

    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead:
        return await self._do(
            lambda repo: op_read(repo, name, position, now, max_bytes, touch=True)
        )

    async def delete(self, name: str, now: float) -> None:
        await self._do(lambda repo: op_delete(repo, name, now))

    async def sweep(self, now: float) -> int:
        return len(await self._do(lambda repo: op_sweep(repo, now)))
