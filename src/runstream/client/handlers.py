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
* a handler that raises is logged and counted (``ctx.metrics.handler_exceptions``)
  and the loop goes on;
* jobs whose registration has a ``key`` function are handled in order per key:
  the key picks the worker, and each worker runs its jobs one at a time.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from runstream.client.metrics import Metrics
from runstream.core.model import Event, Reset
from runstream.errors import ValidationError

if TYPE_CHECKING:
    from runstream.client.follow import Follower

log = logging.getLogger("runstream.client")

DEFAULT_CONCURRENCY = 8
DEFAULT_QUEUE_SIZE = 256
DEFAULT_DRAIN_TIMEOUT = 10.0

EventHandler: TypeAlias = Callable[[Event, "Context"], Awaitable[None] | None]
ResetHandler: TypeAlias = Callable[[Reset, "Context"], Awaitable[None] | None]
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
        """Where the follower would resume (``"<epoch>:<id>"``), for checkpointing."""
        return self.follower.position if self.follower is not None else None


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


_Job: TypeAlias = tuple[Callable[..., Any], Any, Context, float]


class WorkerPool:
    """``concurrency`` workers; at most ``queue_size`` jobs queued or running.

    :meth:`submit` waits while the pool is full. :meth:`drain` waits for
    every job (up to a timeout) and then stops the workers.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if concurrency < 1 or queue_size < 1:
            raise ValidationError("concurrency and queue_size must be >= 1")
        self.metrics = metrics
        self.queue_size = queue_size
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
        self, fn: Callable[..., Any], item: Any, ctx: Context, received: float, key: Hashable = None
    ) -> None:
        await self._slots.acquire()
        self.pending += 1
        self._idle.clear()
        self.metrics.queue_depth = self.pending
        if key is not None:
            index = hash(key) % len(self._queues)
        else:
            # Unkeyed work goes where the least is waiting.
            index = min(
                range(len(self._queues)),
                key=lambda i: self._queues[i].qsize() + self._busy[i],
            )
        self._queues[index].put_nowait((fn, item, ctx, received))

    async def _work(self, index: int) -> None:
        queue = self._queues[index]
        loop = asyncio.get_running_loop()
        while True:
            fn, item, ctx, received = await queue.get()
            self._busy[index] = True
            try:
                await call_handler(fn, item, ctx)
            except Exception:
                self.metrics.handler_exceptions += 1
                log.exception(
                    "runstream handler %s failed on %s",
                    getattr(fn, "__qualname__", fn),
                    _describe(item),
                )
            finally:
                self._busy[index] = False
                self.metrics.handled += 1
                self.metrics.latency.observe(loop.time() - received)
                self.pending -= 1
                self.metrics.queue_depth = self.pending
                if self.pending == 0:
                    self._idle.set()
                self._slots.release()

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


def _describe(item: Any) -> str:
    if isinstance(item, Event):
        return f"event {item.id} ({item.type})"
    return repr(item)


async def dispatch(
    registry: HandlerRegistry,
    pool: WorkerPool,
    item: Event | Reset,
    ctx: Context,
    received: float,
) -> None:
    """Submit one job per matching handler (waits while the pool is full)."""
    if isinstance(item, Reset):
        if not registry.reset_handlers:
            log.warning("runstream %s: history lost (%s) and no on_reset handler", ctx.stream, item)
        for reset_fn in registry.reset_handlers:
            await pool.submit(reset_fn, item, ctx, received)
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
        await pool.submit(reg.fn, item, ctx, received, key)
