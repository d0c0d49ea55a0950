"""Background work that leaves room for the foreground: a duty cycle.

A retention pass deletes in steps, a write transaction each. Run back to back, the
steps hold the database's writer, a CPU and the GIL for the whole pass, and every
append made meanwhile waits behind them: in the soak bench (2 CPUs) appends made
during passes had three times the p99 of those made just before. A :class:`Pacer`
spreads the steps out instead. After each step the work calls :func:`pause`, which
waits long enough that the work has been busy for at most ``duty`` of the time since
it started; the appends then meet a step only that often.

Pausing is asked for where the steps are (the SQLite log between its transactions,
the retention pass between its batches), but decided by whoever started the work:
:func:`pacing` installs a pacer for the current task (a context variable), and
:func:`pause` does nothing without one, nor in any other task: tasks started
meanwhile (a backend's poller, a reader) inherit the variable but never pause. So a
retention pass on the server's timer is paced, while ``runstream gc`` or
``DELETE /v1/runs``, which an operator waits for, run at full speed through the
same code; and :meth:`Pacer.hurry` makes a paced pass finish at full speed when
someone starts waiting for it.

The arithmetic has no I/O (:meth:`Pacer.pause_for` takes the time and returns a
delay); :func:`pause` does the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar

__all__ = ["Pacer", "current", "pacing", "pause"]

MAX_PAUSE = 1.0
"""Longest single pause (seconds): a step that was slow for a reason of its own (a
checkpoint, a stalled disk) does not stop the work for ten times as long."""


class Pacer:
    """Busy at most ``duty`` of the time, until ``budget`` seconds have gone by.

    ``duty`` is in ``(0, 1]``; 1 never pauses. After ``budget`` seconds since the
    first step (``None``: no limit), or once :meth:`hurry` is called, the pacer
    stops pausing, so work that falls behind (more to delete than a paced pass gets
    through) catches up at full speed instead of falling further behind. ``clock``
    is :func:`time.monotonic` and ``sleep`` waits (waking early on :meth:`hurry`)
    but in tests.
    """

    def __init__(
        self,
        duty: float,
        *,
        budget: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if not 0 < duty <= 1:
            raise ValueError("duty must be in (0, 1]")
        if budget is not None and budget < 0:
            raise ValueError("budget must be >= 0 seconds")
        self.duty = duty
        self.budget = budget
        self.clock = clock
        self.sleep = sleep or self._sleep
        self.owner: asyncio.Task[object] | None = None
        """The task that installed the pacer (:func:`pacing`): the only one it pauses."""
        self.started = clock()
        self._mark = self.started
        """End of the last pause (or the start): the current step began here."""
        self.paused = 0.0
        """Seconds spent pausing so far."""
        self._hurry = asyncio.Event()
        """Set by :meth:`hurry`: no more pauses, and the one under way ends."""

    def pause_for(self, now: float) -> float:
        """Seconds to pause at ``now``, the end of a step.

        The step's share of pausing is what keeps it at ``duty`` of the time:
        ``busy * (1 - duty) / duty``, capped by :data:`MAX_PAUSE` and by what is
        left of the budget; 0 once hurried.
        """
        if self._hurry.is_set():
            return 0.0
        busy = max(0.0, now - self._mark)
        delay = min(MAX_PAUSE, busy * (1 - self.duty) / self.duty)
        if self.budget is not None:
            delay = min(delay, self.budget - (now - self.started))
        return max(0.0, delay)

    def resumed(self, now: float, paused: float) -> None:
        """A pause of ``paused`` seconds ended at ``now``: the next step starts."""
        self._mark = now
        self.paused += paused

    def hurry(self) -> None:
        """No more pauses: end the current one and go on at full speed."""
        self._hurry.set()

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), delay)


_current: ContextVar[Pacer | None] = ContextVar("runstream_pacer", default=None)


def current() -> Pacer | None:
    """The pacer installed in the current context, if any (see :func:`pause`)."""
    return _current.get()


@contextlib.contextmanager
def pacing(pacer: Pacer | None) -> Iterator[Pacer | None]:
    """Pace the work the current task does inside the block (``None``: full speed)."""
    if pacer is not None:
        pacer.owner = asyncio.current_task()
    token = _current.set(pacer)
    try:
        yield pacer
    finally:
        _current.reset(token)


async def pause() -> None:
    """The end of a step: wait as the current pacer says; nothing without one, or in a
    task other than the one that installed it."""
    pacer = _current.get()
    if pacer is None or asyncio.current_task() is not pacer.owner:
        return
    start = pacer.clock()
    delay = pacer.pause_for(start)
    if delay > 0:
        await pacer.sleep(delay)
    end = pacer.clock()
    pacer.resumed(end, end - start if delay > 0 else 0.0)
