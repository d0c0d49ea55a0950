"""Handler registration and the bounded worker pool that runs handlers off the read loop.

``@client.on("stdout")`` registers a handler; ``client.run_forever(stream)``
follows the stream and, for each event, submits one job per matching handler
to a :class:`WorkerPool`:

* handlers never run on the read loop; async handlers run on the pool's
  workers, plain functions in a thread (``asyncio.to_thread``) so they cannot
  block the event loop;
* the pool holds at most ``queue_size`` jobs; when it is full, submitting
  waits, the follower's buffer fills and reading pauses (backpressure) — with
  the watchdog timers paused too;
* a handler that raises is logged and counted (``ctx.metrics.handler_exceptions``);
  with a ``retry`` policy it is called again after a backoff (decided by
  :class:`~runstream.client.policy.ReconnectState`, as reconnects are) until
  the policy gives up; then the item goes to the ``dead_letter`` hook (or is
  logged as given up) and counts as *settled*: the loop goes on. If the
  dead-letter hook raises too, the item never settles and the pool reports a
  fatal :class:`~runstream.errors.HandlerFailed` (``run_forever`` stops);
* jobs whose registration has a ``key`` function are handled in order per key:
  the key picks the worker, and each worker runs its jobs one at a time (a
  job being retried holds its key's later events back);
* with a :class:`~runstream.client.checkpoint.Watermark`, each item is
  tracked until every job of it settled, so a checkpoint never passes an
  event whose handlers did not finish.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from runstream.client.metrics import Metrics
from runstream.client.policy import ReconnectState, Retry, RetryPolicy
from runstream.core.model import Event, Reset
from runstream.errors import HandlerFailed, ValidationError

if TYPE_CHECKING:
    from runstream.client.checkpoint import Watermark
    from runstream.client.follow import Follower

log = logging.getLogger("runstream.client")

DEFAULT_CONCURRENCY = 8
DEFAULT_QUEUE_SIZE = 256
DEFAULT_DRAIN_TIMEOUT = 10.0

EventHandler: TypeAlias = Callable[[Event, "Context"], Awaitable[None] | None]
ResetHandler: TypeAlias = Callable[[Reset, "Context"], Awaitable[None] | None]
DeadLetter: TypeAlias = Callable[[Event | Reset, "Context", BaseException], Awaitable[None] | None]
"""``dead_letter(item, ctx, exc)``: called once a handler's retries are spent."""
Where: TypeAlias = Callable[[Event], bool]
KeyFn: TypeAlias = Callable[[Event], Hashable]


@dataclass(slots=True)
class Context:
    """Passed to every handler with the event: where it came from and how the follower is doing.

    Handlers must treat it as read-only. ``metrics`` is live (it keeps
    changing); the properties are shortcuts into it.
    """

    stream: str
    metrics: Metrics
    client: Any = None
    follower: Follower | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reconnect_count(self) -> int:
        return self.metrics.reconnect_count

    @property
    def last_id(self) -> int:
        return self.metrics.last_id

    @property
    def queue_depth(self) -> int:
        return self.metrics.queue_depth

    @property
    def position(self) -> str | None:
        """Where the follower would resume (``"<epoch>:<id>"``).

        It runs ahead of the handlers (events are read before they are
        handled); with ``run_forever(checkpoint=...)`` the saved checkpoint is
        ``metrics.checkpoint``.
        """
        return self.follower.position if self.follower is not None else None

    def idempotency_key(self, event: Event) -> str:
        """``"<stream>:<epoch>:<id>"``: identical on every delivery of ``event``, unique to it.

        Delivery to handlers is at least once (a listener that crashes after
        a handler finished but before its checkpoint was saved handles the
        event again): give this key to the systems your handler writes to.
        """
        return event.idempotency_key(self.stream)


@dataclass(frozen=True, slots=True)
class Registration:
    """One handler: event types it wants (``None`` = all), an optional filter and order key."""

    fn: EventHandler
    types: frozenset[str] | None
    where: Where | None = None
    key: KeyFn | None = None

    def matches(self, event: Event) -> bool:
        return self.types is None or event.type in self.types


class HandlerRegistry:
    """The handlers registered on one client (``client.on(...)``)."""

    def __init__(self) -> None:
        self.handlers: list[Registration] = []
        self.reset_handlers: list[ResetHandler] = []

    def on(
        self,
        *types: str,
        where: Where | None = None,
        key: KeyFn | None = None,
    ) -> Callable[[EventHandler], EventHandler]:
        """Decorator: call the function for events of ``types`` (none given: every event).

        ``where(event)`` must return true for the handler to run (an exception
        there counts as a handler exception). ``key(event)`` orders handling:
        events with equal keys are handled one after another, in stream order.
        The function receives ``(event, ctx)``; it may be async or plain.
        """
        for t in types:
            if not isinstance(t, str) or not t:
                raise ValidationError("event types must be non-empty strings", field="type")

        def register(fn: EventHandler) -> EventHandler:
            if not callable(fn):
                raise ValidationError("a handler must be callable")
            type_set = None if not types or "*" in types else frozenset(types)
            self.handlers.append(Registration(fn, type_set, where, key))
            return fn

        return register

    def on_reset(self, fn: ResetHandler) -> ResetHandler:
        """Decorator: call the function with each :class:`Reset` (history was lost)."""
        self.reset_handlers.append(fn)
        return fn


async def call_handler(fn: Callable[..., Any], item: Any, ctx: Context) -> None:
    if inspect.iscoroutinefunction(fn):
        await fn(item, ctx)
        return
    result = await asyncio.to_thread(fn, item, ctx)
    if inspect.isawaitable(result):
        await result


@dataclass(slots=True)
class _Job:
    fn: Callable[..., Any]
    item: Any
    ctx: Context
    received: float
    seq: int | None = None
    """The item's number in the pool's watermark (``None``: not tracked)."""


class WorkerPool:
    """``concurrency`` workers; at most ``queue_size`` jobs queued or running.

    :meth:`submit` waits while the pool is full. :meth:`drain` waits for
    every job (up to a timeout) and then stops the workers. ``retry`` (a
    :class:`RetryPolicy`; ``None``: no retries) and ``dead_letter`` decide
    what happens to a job whose handler raises (see the module doc).
    ``watermark`` settles each job's item when the job is done. :attr:`failed`
    is set (and :attr:`failure` holds a :class:`HandlerFailed`) when a job
    could not be settled; the caller should stop feeding the pool then.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        retry: RetryPolicy | None = None,
        dead_letter: DeadLetter | None = None,
        watermark: Watermark | None = None,
    ) -> None:
        if concurrency < 1 or queue_size < 1:
            raise ValidationError("concurrency and queue_size must be >= 1")
        self.metrics = metrics
        self.queue_size = queue_size
        self.retry = retry
        self.dead_letter = dead_letter
        self.watermark = watermark
        self.failed = asyncio.Event()
        self.failure: HandlerFailed | None = None
        self._slots = asyncio.Semaphore(queue_size)
        self._queues: list[asyncio.Queue[_Job]] = [asyncio.Queue() for _ in range(concurrency)]
        self._busy = [False] * concurrency
        self.pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers = [
            asyncio.create_task(self._work(i), name=f"runstream-handler-{i}")
            for i in range(concurrency)
        ]

    async def submit(
        self,
        fn: Callable[..., Any],
        item: Any,
        ctx: Context,
        received: float,
        key: Hashable = None,
        *,
        seq: int | None = None,
    ) -> None:
        """Queue one job (waits while the pool is full); ``seq`` is its item in the watermark."""
        await self._slots.acquire()
        self.pending += 1
        self._idle.clear()
        self.metrics.queue_depth = self.pending
        if seq is not None and self.watermark is not None:
            self.watermark.add_job(seq)
        if key is not None:
            index = hash(key) % len(self._queues)
        else:
            # Unkeyed work goes where the least is waiting.
            index = min(
                range(len(self._queues)),
                key=lambda i: self._queues[i].qsize() + self._busy[i],
            )
        self._queues[index].put_nowait(_Job(fn, item, ctx, received, seq))

    async def _work(self, index: int) -> None:
        queue = self._queues[index]
        loop = asyncio.get_running_loop()
        while True:
            job = await queue.get()
            self._busy[index] = True
            try:
                settled = await self._run(job)
            finally:
                self._busy[index] = False
                self.metrics.handled += 1
                self.metrics.latency.observe(loop.time() - job.received)
                self.pending -= 1
                self.metrics.queue_depth = self.pending
                if self.pending == 0:
                    self._idle.set()
                self._slots.release()
            if settled and job.seq is not None and self.watermark is not None:
                self.watermark.job_done(job.seq)

    async def _run(self, job: _Job) -> bool:
        """Call the handler (retrying per policy); True once the job is settled."""
        loop = asyncio.get_running_loop()
        state = ReconnectState(self.retry, allow_fallback=False) if self.retry else None
        attempt = 1
        while True:
            try:
                await call_handler(job.fn, job.item, job.ctx)
                return True
            except Exception as exc:
                self.metrics.handler_exceptions += 1
                decision = state.on_failure("handler", loop.time()) if state else None
                log.error(
                    "runstream handler %s failed on %s (attempt %d)%s",
                    _name(job.fn),
                    _describe(job.item),
                    attempt,
                    f"; retrying in {decision.delay:.2f}s" if isinstance(decision, Retry) else "",
                    exc_info=True,
                )
                if not isinstance(decision, Retry):
                    return await self._give_up(job, exc, attempt)
                self.metrics.handler_retries += 1
                attempt += 1
                await asyncio.sleep(decision.delay)

    async def _give_up(self, job: _Job, exc: Exception, attempts: int) -> bool:
        """Retries are spent: dead-letter the item; True if that settled it."""
        self.metrics.dead_lettered += 1
        if self.dead_letter is None:
            if self.retry is not None:
                log.error(
                    "runstream handler %s: giving up on %s after %d attempts",
                    _name(job.fn),
                    _describe(job.item),
                    attempts,
                )
            return True
        try:
            await call_dead_letter(self.dead_letter, job.item, job.ctx, exc)
        except Exception as hook_exc:
            log.exception("runstream dead-letter hook failed on %s", _describe(job.item))
            if self.failure is None:
                self.failure = HandlerFailed(
                    f"handler {_name(job.fn)} failed on {_describe(job.item)} of "
                    f"{job.ctx.stream!r} after {attempts} attempts and the dead-letter hook "
                    f"raised {hook_exc!r}; the listener stops before that item",
                    handler_error=exc,
                )
                self.failure.__cause__ = hook_exc
            self.failed.set()
            return False
        return True

    async def drain(self, grace: float = DEFAULT_DRAIN_TIMEOUT) -> bool:
        """Wait up to ``grace`` seconds for queued and running jobs, then stop the workers.

        Returns False if jobs were still pending (they are cancelled).
        """
        done = True
        if self.pending:
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                done = False
                log.warning("runstream: %d handler jobs did not finish in %gs", self.pending, grace)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        return done


async def call_dead_letter(
    fn: DeadLetter, item: Event | Reset, ctx: Context, exc: BaseException
) -> None:
    if inspect.iscoroutinefunction(fn):
        await fn(item, ctx, exc)
        return
    result = await asyncio.to_thread(fn, item, ctx, exc)
    if inspect.isawaitable(result):
        await result


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", fn))


def _describe(item: Any) -> str:
    if isinstance(item, Event):
        return f"event {item.id} ({item.type})"
    return repr(item)


def position_after(item: Event | Reset) -> str:
    """The follower position once ``item`` is handled (what a checkpoint stores)."""
    if isinstance(item, Reset):
        return f"{item.epoch}:{item.after}"
    return f"{item.epoch}:{item.id}" if item.epoch is not None else str(item.id)


async def dispatch(
    registry: HandlerRegistry,
    pool: WorkerPool,
    item: Event | Reset,
    ctx: Context,
    received: float,
) -> None:
    """Submit one job per matching handler (waits while the pool is full).

    With a watermark on the pool, the item is tracked from here until all of
    its jobs settled (an item no handler wants settles at once, in order).
    """
    watermark = pool.watermark
    seq = watermark.open(position_after(item)) if watermark is not None else None
    await _submit_all(registry, pool, item, ctx, received, seq)
    # Not in a finally: an item whose submission was cancelled half-way must
    # never settle (its other handlers did not run).
    if watermark is not None and seq is not None:
        watermark.seal(seq)


async def _submit_all(
    registry: HandlerRegistry,
    pool: WorkerPool,
    item: Event | Reset,
    ctx: Context,
    received: float,
    seq: int | None,
) -> None:
    if isinstance(item, Reset):
        if not registry.reset_handlers:
            log.warning("runstream %s: history lost (%s) and no on_reset handler", ctx.stream, item)
        for reset_fn in registry.reset_handlers:
            await pool.submit(reset_fn, item, ctx, received, seq=seq)
        return
    for reg in registry.handlers:
        if not reg.matches(item):
            continue
        try:
            if reg.where is not None and not reg.where(item):
                continue
            key = reg.key(item) if reg.key is not None else None
        except Exception:
            ctx.metrics.handler_exceptions += 1
            log.exception("runstream filter/key of %s failed on event %d", reg.fn, item.id)
            continue
        await pool.submit(reg.fn, item, ctx, received, key, seq=seq)
