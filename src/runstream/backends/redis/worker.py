"""The Redis worker: takes runs from the queue and executes them, with leases and heartbeats.

See :mod:`runstream.backends.redis.dispatch` for how a run travels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from runstream.backends.base import EventLog
from runstream.backends.redis.errors import translated
from runstream.backends.redis.janitor import Janitor, settle_entry
from runstream.backends.redis.pubsub import RedisListener, listen_client_like, target
from runstream.backends.redis.queue import (
    CLAIM_BATCH,
    DEFAULT_LEASE,
    DEFAULT_MAX_DELIVERIES,
    GROUP,
    RedisRunQueue,
    default_worker_name,
)
from runstream.backends.redis.runstore import (
    NO_MAINT_NOTIFICATIONS,
    RedisRunStore,
)
from runstream.config import RUN_GRACE
from runstream.core.backoff import RECONNECT, BackoffState
from runstream.errors import (
    BackendError,
    ConfigError,
    IllegalTransition,
    RunNotFound,
    RunstreamError,
    ValidationError,
)
from runstream.runs.executor import RunControl, execute_run
from runstream.runs.gates import Gates, WaitNotes
from runstream.runs.lifecycle import TERMINAL
from runstream.runs.model import RunRecord
from runstream.runs.scheduler import Job, Scheduler
from runstream.runs.tasks import TaskRegistry

__all__ = ["RedisWorker", "WorkerOptions"]

log = logging.getLogger("runstream.backends.redis")

HEARTBEAT_FACTOR = 1 / 3
"""Heartbeat every ``lease/3``: two heartbeats may be missed before the lease expires."""
READ_BLOCK_SECONDS = 0.5
"""How long one XREADGROUP waits; also bounds how late a stop request is noticed."""


_CLAIM_NAME = """
-- KEYS[1] name key. ARGV[1] our token, ARGV[2] ttl ms, ARGV[3] holder we may replace ('' = none).
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] or (ARGV[3] ~= '' and v == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ''
end
return v
"""


def _pid_gone(holder: str) -> bool:
    """Whether ``holder`` (``host:pid:token``) names a process on this host that has exited."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Tuning of one worker process. ``lease`` is in seconds; see the module docstring."""

    name: str = field(default_factory=default_worker_name)
    concurrency: int = 4
    lease: float = DEFAULT_LEASE
    shutdown_grace: float = RUN_GRACE
    """On stop: how long running tasks may take to finish before they are cancelled."""
    janitor: bool = True
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValidationError("worker concurrency must be >= 1", field="concurrency")
        if self.lease < 0.1:
            raise ValidationError("lease must be at least 0.1 s", field="lease")
        if self.shutdown_grace < 0:
            raise ValidationError("shutdown grace must be >= 0", field="grace")
        if self.max_deliveries < 1:
            raise ValidationError("max_deliveries must be >= 1", field="max_deliveries")
        if not self.name or any(c.isspace() for c in self.name):
            raise ValidationError("worker name must be non-empty without spaces", field="name")

    @property
    def lease_ms(self) -> int:
        return max(round(self.lease * 1000), 100)


async def _wait(stop: asyncio.Event, delay: float) -> None:
    """Sleep ``delay`` seconds, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


def _entries(reply: Any) -> list[tuple[str, dict[str, str] | None]]:
    """The entries of a one-stream XREADGROUP reply (RESP2 list or RESP3 map form)."""
    if not reply:
        return []
    per_stream = list(reply.values()) if isinstance(reply, dict) else [s[1] for s in reply]
    out: list[tuple[str, dict[str, str] | None]] = []
    for entries in per_stream:
        for entry_id, fields in entries:
            out.append((str(entry_id), cast(dict[str, str] | None, fields)))
    return out


@dataclass
class _Active:
    """A queue entry this worker holds (waiting for a task slot, or running)."""

    entry_id: str
    run_id: str
    attempt: int = 1
    running: bool = False
    control: RunControl = field(default_factory=RunControl)


class RedisWorker:
    """Takes runs from the queue and executes them, with leases, heartbeats and a janitor.

    Usage: ``await RedisWorker(...).run(stop)``; set ``stop`` (e.g. on SIGTERM)
    to stop taking work: running tasks get ``options.shutdown_grace`` seconds
    to finish, then they are cancelled; ``run`` returns when every held entry
    is settled. The caller owns ``store`` and ``log`` (start and close them).
    """

    def __init__(
        self,
        store: RedisRunStore,
        log: EventLog,
        registry: TaskRegistry,
        *,
        options: WorkerOptions | None = None,
        gates: Gates | None = None,
    ) -> None:
        """``gates``: resource gates checked before each run starts (see
        :mod:`runstream.runs.gates`); a gated run stays queued, held by this worker."""
        self.store = store
        self.gates = gates
        self.notes = WaitNotes(store)
        self.log = log
        self.registry = registry
        self.options = options or WorkerOptions()
        self.name = self.options.name
        self.keys = store.keys
        self.queue = RedisRunQueue(store)
        self.janitor = Janitor(
            store,
            log,
            consumer=self.name,
            lease=self.options.lease,
            registry=registry,
            max_deliveries=self.options.max_deliveries,
            queue=self.queue,
        )
        self.active: dict[str, _Active] = {}
        self.ready = asyncio.Event()
        """Set once the worker has settled its own pending entries and listens for work."""
        self.completed = 0
        self._handlers: set[asyncio.Task[None]] = set()
        """Entries being looked at (or handed back); runs themselves are the scheduler's."""
        self._slots_changed = asyncio.Event()
        self.scheduler = Scheduler(
            self.options.concurrency,
            name="run",
            on_change=self._slots_changed.set,
            gate=None if gates is None else (lambda job: gates.reason(job.gate)),
            on_wait=lambda job, reason: self.notes.note(job.run_id or job.key, reason),
            gate_interval=5.0 if gates is None else gates.interval,
        )
        self._token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._claim_name_script = store.redis.register_script(_CLAIM_NAME)
        self._reader = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool(
                connection_class=store.redis.connection_pool.connection_class,
                max_connections=1,
                maint_notifications_config=NO_MAINT_NOTIFICATIONS,
                **{
                    **store.redis.connection_pool.connection_kwargs,
                    # A blocking XREADGROUP must not hit the socket timeout.
                    "socket_timeout": max(
                        READ_BLOCK_SECONDS * 3,
                        store.redis.connection_pool.connection_kwargs.get("socket_timeout") or 0,
                    ),
                },
            )
        )

    # -- main loop -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then shut down gracefully (see the class docstring).

        Redis being unreachable is waited out (with backoff) at any point, also
        at start. Raises :class:`ConfigError` if another live worker uses this name.
        """
        try:
            await self._retry_until(stop, lambda: self._claim_name(stop))
        except BaseException:
            await self._reader.aclose()
            await self._reader.connection_pool.aclose()
            raise
        if stop.is_set():
            await self._reader.aclose()
            await self._reader.connection_pool.aclose()
            return
        inner_stop = asyncio.Event()
        helpers = [
            asyncio.create_task(self._heartbeat(inner_stop), name="runstream-heartbeat"),
            asyncio.create_task(self._cancel_notices(), name="runstream-cancels"),
        ]
        if self.options.janitor:
            helpers.append(asyncio.create_task(self.janitor.run(inner_stop), name="janitor"))
        try:
            await self._retry_until(stop, self._recover_own_pending)
            self.ready.set()
            await self._read_loop(stop)
            await self._drain()
        finally:
            inner_stop.set()
            # A sweep in progress is let finish (it may be between closing a lost run's
            # stream and acknowledging its entry); the other helpers just stop.
            if len(helpers) > 2:
                await asyncio.wait({helpers[2]}, timeout=self.options.lease)
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in list(self._handlers):
                task.cancel()
            self.scheduler.abort()
            await self._forget_self()
            with contextlib.suppress(BackendError):
                await self.janitor.release_lease_key(self._name_key, self._token)
            await self._reader.aclose()
            await self._reader.connection_pool.aclose()

    async def _read_loop(self, stop: asyncio.Event) -> None:
        backoff = BackoffState(RECONNECT)
        await self._retry_until(stop, self.queue.ensure_group)
        while not stop.is_set():
            # Cleared before counting, so a change made after the count wakes the wait.
            self._slots_changed.clear()
            # Runs waiting for their task's limit do not hold up runs of other tasks,
            # but at most ``concurrency`` of them are held, so a worker never hoards.
            busy = len(self.active) - len(self.scheduler.pending)
            free = min(
                self.options.concurrency - busy,
                2 * self.options.concurrency - len(self.active),
            )
            if free <= 0:
                await self._wait_for_slot(stop)
                continue
            try:
                with translated("XREADGROUP"):
                    reply = await self._reader.xreadgroup(
                        GROUP,
                        self.name,
                        {self.keys.queue: ">"},
                        count=free,
                        block=round(READ_BLOCK_SECONDS * 1000),
                    )
            except BackendError as exc:
                if "NOGROUP" in str(exc):
                    await self._retry_until(stop, self.queue.recreate_group)
                    continue
                log.warning("worker %s: cannot read the queue (%s); retrying", self.name, exc)
                await _wait(stop, backoff.retry_after(str(exc), time.monotonic()))
                continue
            backoff.on_success()
            for entry_id, fields in _entries(reply):
                self._spawn(entry_id, fields or {})

    async def _retry_until(self, stop: asyncio.Event, op: Callable[[], Awaitable[None]]) -> None:
        backoff = BackoffState(RECONNECT)
        while not stop.is_set():
            try:
                await op()
                return
            except BackendError as exc:
                log.warning("worker %s: redis not ready (%s); retrying", self.name, exc)
                await _wait(stop, backoff.retry_after(str(exc), time.monotonic()))

    async def _wait_for_slot(self, stop: asyncio.Event) -> None:
        """Until a held entry finishes or starts waiting for its task's slot, or ``stop``."""
        stopper = asyncio.create_task(stop.wait())
        changed = asyncio.create_task(self._slots_changed.wait())
        try:
            await asyncio.wait({stopper, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            changed.cancel()

    def _spawn(self, entry_id: str, fields: dict[str, str]) -> None:
        run_id = fields.get("run", "")
        try:
            attempt = int(fields.get("attempt", "1"))
        except ValueError:
            attempt = 1
        held = _Active(entry_id, run_id, attempt)
        self.active[entry_id] = held
        self._track(self._settle(held, self._handle_entry(held)), name=f"run-{run_id}")

    def _track(self, work: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def describe(self) -> str:
        """Settings for the ready message."""
        opts = self.options
        return f"concurrency {opts.concurrency}; lease {opts.lease:g}s"

    def cancel_all(self, reason: str) -> None:
        """Cancel every run this worker is executing now (e.g. on a second SIGTERM)."""
        for held in self.active.values():
            held.control.cancel(reason)

    async def _drain(self) -> None:
        """Stop: hand back what waits for a slot, let running runs finish within the grace
        period, then cancel them (the scheduler's graceful stop)."""
        for job in self.scheduler.stop_taking():
            held = self.active[job.key]
            self._track(self._settle(held, self._hand_back(held)), name=f"hand-back-{held.run_id}")
        if not self._handlers and not self.scheduler.running:
            return
        log.info(
            "worker %s stopping: waiting up to %gs for %d run(s)",
            self.name,
            self.options.shutdown_grace,
            len(self._handlers) + len(self.scheduler.running),
        )
        await self.scheduler.drain(
            self.options.shutdown_grace,
            f"worker {self.name} shut down before the run finished",
            also=set(self._handlers),
        )

    # -- one entry -------------------------------------------------------------

    async def _settle(self, held: _Active, work: Awaitable[bool | None]) -> None:
        """Do ``work`` for a held entry, logging failures; then forget the entry, unless
        ``work`` returned True (it was handed to the scheduler, which now holds it)."""
        kept = False
        try:
            kept = bool(await work)
        except RunstreamError as exc:
            # The entry stays pending: the janitor (or our restart) settles it later.
            log.error("worker %s: run %s: %s", self.name, held.run_id, exc)
        except Exception:
            log.exception("worker %s: run %s failed unexpectedly", self.name, held.run_id)
        finally:
            if not kept:
                self.active.pop(held.entry_id, None)
                self._slots_changed.set()

    async def _handle_entry(self, held: _Active) -> bool:
        """Ack an entry with nothing to run; submit a runnable one. True if submitted."""
        try:
            record = await self.store.get(held.run_id)
        except RunNotFound:
            await self.janitor.ack(held.entry_id)
            return False
        if record.status != "queued":
            # A duplicate entry (the run was taken through another one), or a run that
            # was cancelled before it started: nothing to do here. (Not closing the
            # stream: its owner may be between storing the outcome and closing it.)
            await self.janitor.ack(held.entry_id)
            return False
        spec = self.registry.get(record.task) if record.task in self.registry else None
        job = Job(
            held.entry_id,
            record.task,
            lambda: self._settle(held, self._claim_and_run(held, record)),
            limit=spec.concurrency if spec is not None else None,
            grace=spec.grace if spec is not None else 0.0,
            control=held.control,
            gate=spec.gate if spec is not None else None,
            run_id=record.id,
        )
        if self.scheduler.submit(job):
            return True
        await self._hand_back(held)  # stopping
        return False

    async def _hand_back(self, held: _Active) -> None:
        """Stopping before this run started: queue it again for another worker."""
        await self.queue.enqueue(held.run_id, held.attempt)
        await self.janitor.ack(held.entry_id)

    async def _claim_and_run(self, held: _Active, record: RunRecord) -> None:
        await self.notes.clear(record.id)
        if self.scheduler.stopping:
            await self._hand_back(held)
            return
        lease_key = self.keys.lease(record.id)
        with translated("take lease"):
            got = await self.store.redis.set(
                lease_key, self.name, nx=True, px=self.options.lease_ms
            )
        if not got:
            # Another worker holds this run right now (through another entry), or a
            # claimant died between taking the lease and starting. Leave the entry
            # pending: the janitor looks at it again once it is stale, and by then the
            # run is running (left alone), finished (acked) or queued (re-queued).
            return
        held.attempt = record.attempt
        held.running = True
        try:
            if record.task not in self.registry:
                final = await self._refuse_unknown_task(record)
            else:
                # The executor moves queued → running (compare-and-set) and fences its
                # final transition on (worker, attempt).
                final = await execute_run(
                    record,
                    self.registry.get(record.task),
                    self.log,
                    self.store,
                    worker=self.name,
                    control=held.control,
                )
        finally:
            held.running = False
        ours = final.worker == self.name and final.attempt == held.attempt
        if ours and final.status in TERMINAL:
            # Outcome stored (record final, stream closed): only now may the entry go.
            await self._ack_outcome(held)
            self.completed += 1
            log.info(
                "worker %s: run %s (%s, attempt %d) %s%s",
                self.name,
                final.id,
                final.task,
                final.attempt,
                final.status,
                f": {final.error}" if final.error else "",
            )
        elif not ours and final.attempt == held.attempt and final.status != "lost":
            # Never started by us: a duplicate entry, or cancelled before it started.
            await self.janitor.ack(held.entry_id)
        else:
            # Fenced out: declared lost while we ran it. The janitor that did so settles
            # the entry; acking here could strand a run whose re-queue is not done yet.
            log.warning(
                "worker %s: run %s attempt %d was taken over (now %s, attempt %d)",
                self.name,
                record.id,
                held.attempt,
                final.status,
                final.attempt,
            )
        await self._release_lease(record.id)

    async def _ack_outcome(self, held: _Active) -> None:
        await self.janitor.ack(held.entry_id)

    async def _refuse_unknown_task(self, record: RunRecord) -> RunRecord:
        """A run of a task this worker does not declare: fail it loudly (a config mismatch)."""
        lifecycle = self.janitor.lifecycle
        try:
            await lifecycle.advance(
                record.id, "queued", "running", worker=self.name, started_at=time.time()
            )
            # Strict: if the stream is not closed, the entry stays pending and the
            # janitor closes it when it settles the entry.
            return await lifecycle.advance(
                record.id,
                "running",
                "failed",
                match={"worker": self.name, "attempt": record.attempt},
                strict=True,
                error=f"task {record.task!r} is not declared on worker {self.name}",
                finished_at=time.time(),
            )
        except IllegalTransition:
            return await self.store.get(record.id)

    async def _release_lease(self, run_id: str) -> None:
        with contextlib.suppress(BackendError):
            await self.janitor.release_lease(run_id, self.name)

    # -- the worker's name -----------------------------------------------------------

    @property
    def _name_key(self) -> str:
        return f"{self.keys.prefix}:worker:{{{self.name}}}"

    async def _refresh_name(self, replace: str = "") -> str:
        """Hold the name for one more lease; returns "" or the other holder's token."""
        with translated("claim worker name"):
            holder = await self._claim_name_script(
                keys=[self._name_key], args=[self._token, self.options.lease_ms, replace]
            )
        return str(holder)

    async def _claim_name(self, stop: asyncio.Event) -> None:
        """Make sure no other live worker uses this name (restart recovery relies on it).

        A holder that is a dead process on this host is replaced at once; any
        other holder must let its claim expire (one lease) first. Raises
        :class:`ConfigError` if the name stays taken: names must be unique.
        """
        deadline = time.monotonic() + 2 * self.options.lease + 1
        while True:
            holder = await self._refresh_name()
            if not holder:
                return
            if _pid_gone(holder) and not await self._refresh_name(replace=holder):
                return
            if time.monotonic() > deadline or stop.is_set():
                raise ConfigError(
                    f"another worker named {self.name!r} is running ({holder}); "
                    "worker names must be unique"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.lease * HEARTBEAT_FACTOR)

    # -- restart recovery --------------------------------------------------------

    async def _recover_own_pending(self) -> None:
        """Settle entries delivered to this consumer name before a restart (read from ``0``)."""
        await self.queue.ensure_group()
        start = "0"
        while True:
            with translated("XREADGROUP own pending"):
                reply = await self._reader.xreadgroup(
                    GROUP, self.name, {self.keys.queue: start}, count=CLAIM_BATCH
                )
            entries = _entries(reply)
            if not entries:
                return
            for entry_id, fields in entries:
                if fields:
                    deliveries = await self.janitor.deliveries(entry_id)
                    await settle_entry(
                        self.janitor, entry_id, fields, deliveries=deliveries, owner_is_me=True
                    )
                else:  # deleted from the stream while pending: nothing left to do
                    await self.janitor.ack(entry_id)
                start = entry_id

    async def _forget_self(self) -> None:
        """On a clean stop, remove this consumer from the group if it holds nothing."""
        with contextlib.suppress(BackendError), translated("delete consumer"):
            rows = await self.store.redis.xpending_range(
                self.keys.queue, GROUP, min="-", max="+", count=1, consumername=self.name
            )
            if not rows:
                await self.store.redis.xgroup_delconsumer(self.keys.queue, GROUP, self.name)

    # -- heartbeat and cancellation ----------------------------------------------

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        interval = self.options.lease * HEARTBEAT_FACTOR
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                continue
            try:
                holder = await self._refresh_name()
                if holder:
                    log.error(
                        "worker %s: another process (%s) holds this worker name", self.name, holder
                    )
                held = list(self.active.values())
                if held:
                    await self._beat(held)
            except BackendError as exc:
                log.warning("worker %s: heartbeat failed (%s)", self.name, exc)

    async def _beat(self, held: list[_Active]) -> None:
        """Renew leases, keep entries fresh, and re-check each run's cancel flag and owner."""
        redis = self.store.redis
        state_at: list[int] = []
        with translated("heartbeat"):
            async with redis.pipeline(transaction=False) as pipe:
                for item in held:
                    if item.running:
                        pipe.set(self.keys.lease(item.run_id), self.name, px=self.options.lease_ms)
                    # Resets the entry's idle time without counting a delivery, and takes
                    # it back if a janitor claimed it while our heartbeat was late.
                    pipe.xclaim(self.keys.queue, GROUP, self.name, 0, [item.entry_id], justid=True)
                    state_at.append(len(pipe))
                    pipe.hmget(
                        self.keys.run(item.run_id),
                        ["status", "worker", "attempt", "cancel_requested"],
                    )
                results = await pipe.execute(raise_on_error=False)
        for item, index in zip(held, state_at, strict=True):
            state = results[index]
            if isinstance(state, list):
                self._apply_state(item, state)

    def _apply_state(self, item: _Active, state: list[str | None]) -> None:
        status, worker, attempt, cancel = state
        if cancel is not None and json.loads(cancel) is True:
            item.control.cancel()
        if not item.running:
            return
        same_attempt = attempt is not None and json.loads(attempt) == item.attempt
        mine = worker is not None and json.loads(worker) == self.name
        # "queued" with our attempt: the executor has not moved it to running yet.
        if same_attempt and (status == "queued" or (status == "running" and mine)):
            return
        log.warning(
            "worker %s: run %s is no longer ours (%s); stopping it", self.name, item.run_id, status
        )
        item.control.cancel(f"worker {self.name} lost its claim on the run")

    async def _cancel_notices(self) -> None:
        """Turn cancel notices into cancellations, after checking the flag (the truth).

        The notices come through the process's shared pub/sub listener; the checks
        run here, off its read loop. Runs until cancelled.
        """
        notices: asyncio.Queue[str | None] = asyncio.Queue()  # a run id, or None: all
        listener = RedisListener.shared(target(self.store.url), self._listen_client)
        subscription = listener.subscribe(
            self.keys.cancel_channel,
            on_message=notices.put_nowait,
            # Notices sent while we were not subscribed are lost: re-check every flag.
            on_ready=lambda: notices.put_nowait(None),
        )
        try:
            while True:
                run_id = await notices.get()
                held = list(self.active.values())
                try:
                    await self._check_flags(
                        held if run_id is None else [a for a in held if a.run_id == run_id]
                    )
                except BackendError as exc:
                    # The heartbeat re-reads every flag within a third of a lease anyway.
                    log.warning("worker %s: cancel flags unreadable (%s)", self.name, exc)
        finally:
            await subscription.aclose()

    def _listen_client(self) -> aioredis.Redis:
        return listen_client_like(self.store.redis)

    async def _check_flags(self, held: list[_Active]) -> None:
        for item in held:
            _status, _worker, _attempt, cancel = await self.store.fence_state(item.run_id)
            if cancel:
                item.control.cancel()
