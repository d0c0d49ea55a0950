"""Watchdog timers for streams that connect but go quiet.

Three independent timers, each in seconds, ``0`` = off:

* ``first_event`` — from the start of an attempt until the first sign of life
  (the first byte of an SSE body, the first item of an iterator). Catches
  streams that are accepted but never send anything. Too short a value kills
  legitimate slow starts; while it is armed, ``idle`` waits.
* ``idle`` — the longest silence allowed once something arrived: any bytes
  count, including SSE keepalive comments.
* ``stale`` — the longest time without a *real* event; keepalives do not
  count. Catches a connection kept alive by a proxy whose upstream died.

Time during which the consumer holds back (backpressure: the reader is paused
because nobody takes the next item) is not counted against any timer.

:class:`WatchdogTimers` is the bookkeeping without I/O (fed a clock).
:func:`watchdog` wraps any async iterator with it and raises
:class:`~runstream.errors.StreamTimeout` — distinct and retryable — when a
timer fires, after closing the wrapped iterator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from runstream.errors import StreamTimeout

Kind: TypeAlias = Literal["first_event", "idle", "stale"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WatchdogConfig:
    """Timer settings in seconds; ``0`` turns a timer off."""

    first_event: float = 0.0
    idle: float = 0.0
    stale: float = 0.0

    def __post_init__(self) -> None:
        for name in ("first_event", "idle", "stale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off)")

    @property
    def enabled(self) -> bool:
        return bool(self.first_event or self.idle or self.stale)


class WatchdogTimers:
    """The three timers of one attempt, fed with a monotonic clock.

    Call :meth:`start` when the attempt begins, :meth:`on_bytes` for anything
    received, :meth:`on_event` for a real event, :meth:`pause` / :meth:`resume`
    around backpressure, and ask :meth:`deadline` when to wake up or
    :meth:`expired` whether one fired.
    """

    def __init__(self, config: WatchdogConfig) -> None:
        self.config = config
        self._started = 0.0
        self._got_bytes = False
        self._last_bytes = 0.0
        self._last_event = 0.0
        self._paused_at: float | None = None

    def start(self, now: float) -> None:
        self._started = self._last_bytes = self._last_event = now
        self._got_bytes = False
        self._paused_at = None

    def on_bytes(self, now: float) -> None:
        self._got_bytes = True
        self._last_bytes = now

    def on_event(self, now: float) -> None:
        self.on_bytes(now)
        self._last_event = now

    def pause(self, now: float) -> None:
        if self._paused_at is None:
            self._paused_at = now

    def resume(self, now: float) -> None:
        if self._paused_at is None:
            return
        # Shift every reference point by the pause, as if it never happened.
        shift = now - self._paused_at
        self._started += shift
        self._last_bytes += shift
        self._last_event += shift
        self._paused_at = None

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def deadlines(self) -> list[tuple[float, Kind]]:
        """Every armed timer as ``(when, kind)``; empty while paused or all off."""
        if self._paused_at is not None:
            return []
        cfg = self.config
        out: list[tuple[float, Kind]] = []
        if not self._got_bytes and cfg.first_event:
            out.append((self._started + cfg.first_event, "first_event"))
        elif cfg.idle:
            out.append((self._last_bytes + cfg.idle, "idle"))
        if cfg.stale:
            out.append((self._last_event + cfg.stale, "stale"))
        return out

    def deadline(self) -> tuple[float, Kind] | None:
        """The earliest armed ``(when, kind)``, or ``None``."""
        ds = self.deadlines()
        return min(ds) if ds else None

    def expired(self, now: float) -> Kind | None:
        """The timer that fired at ``now``, if any."""
        d = self.deadline()
        if d is not None and now >= d[0]:
            return d[1]
        return None

    def seconds(self, kind: Kind) -> float:
        return float(getattr(self.config, kind))

    def timeout(self, kind: Kind) -> StreamTimeout:
        return StreamTimeout(kind, self.seconds(kind))


def _always(_item: Any) -> bool:
    return True


class Watchdog(Generic[T]):
    """An async iterator that re-yields another one's items under watchdog timers.

    Created by :func:`watchdog`; use it in ``async for`` and close it with
    :meth:`aclose` (or ``async with``) when you stop early.
    """

    def __init__(
        self,
        source: AsyncIterator[T],
        config: WatchdogConfig,
        *,
        is_event: Callable[[T], bool] = _always,
        on_timeout: Callable[[StreamTimeout], None] | None = None,
    ) -> None:
        self._source = source
        self._timers = WatchdogTimers(config)
        self._is_event = is_event
        self._on_timeout = on_timeout
        self._started = False
        self._closed = False

    def __aiter__(self) -> Watchdog[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        if not self._started:
            self._started = True
            self._timers.start(loop.time())
        else:
            # The consumer held the previous item until now: not the source's fault.
            self._timers.resume(loop.time())
        deadline = self._timers.deadline()
        scope = asyncio.timeout_at(deadline[0] if deadline is not None else None)
        try:
            async with scope:
                item = await anext(self._source)
        except TimeoutError:
            if not scope.expired() or deadline is None:
                raise  # the source's own TimeoutError, not ours
            exc = self._timers.timeout(deadline[1])
            await self.aclose()
            if self._on_timeout is not None:
                self._on_timeout(exc)
            raise exc from None
        except StopAsyncIteration:
            self._closed = True
            raise
        now = loop.time()
        if self._is_event(item):
            self._timers.on_event(now)
        else:
            self._timers.on_bytes(now)
        self._timers.pause(now)
        return item

    async def aclose(self) -> None:
        """Close the wrapped iterator (if it has ``aclose``) and stop."""
        self._closed = True
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> Watchdog[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def watchdog(
    source: AsyncIterator[T],
    *,
    first_event: float = 0.0,
    idle: float = 0.0,
    stale: float = 0.0,
    is_event: Callable[[T], bool] | None = None,
) -> Watchdog[T]:
    """Wrap any async iterator with first-event / idle / stale timers (seconds, 0 = off).

    Every item counts as a sign of life; items for which ``is_event(item)`` is
    true (all, by default) also count as real events for ``stale`` — pass a
    predicate that returns false for keepalive/heartbeat items. Time between
    handing out an item and the next ``__anext__`` call is not counted.

    When a timer fires, the wrapped iterator is closed (``aclose``, which for an
    HTTP stream drops the connection) and :class:`~runstream.errors.StreamTimeout`
    is raised with ``kind`` ``"first_event"``, ``"idle"`` or ``"stale"``. It is
    a :class:`~runstream.errors.RemoteError`: retry by opening a new source::

        async for token in watchdog(llm.stream(prompt), first_event=20, idle=10):
            ...
    """
    return Watchdog(
        source,
        WatchdogConfig(first_event, idle, stale),
        is_event=is_event if is_event is not None else _always,
    )
