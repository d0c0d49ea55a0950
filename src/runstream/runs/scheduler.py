"""Slots and graceful stop for the runs one process executes.

:class:`Scheduler` is shared by the in-process pool
(:class:`~runstream.runs.service.LocalWorkerPool`) and the Redis worker
(:class:`~runstream.backends.redis.worker.RedisWorker`); what feeds it differs
(a scan of the store, a Redis consumer group), the rules do not:

* at most ``capacity`` jobs run at once, and at most ``limit`` jobs of one
  task (its ``concurrency``);
* jobs start in the order they were submitted, but a job waiting for its
  task's limit does not hold up jobs of other tasks;
* with a ``gate`` (see :mod:`runstream.runs.gates`), a job also waits while
  the gate gives a reason not to start it; ``on_wait`` hears each new reason
  (the job itself clears what it recorded when it starts), and the gate is asked again every
  ``gate_interval`` seconds and whenever a slot frees up or :meth:`Scheduler.recheck`
  is called;
* stopping is two steps: :meth:`Scheduler.stop_taking` (nothing new starts;
  the jobs that were waiting are handed back to the caller), then
  :meth:`Scheduler.drain`: running jobs get ``grace`` seconds to finish, then
  their :class:`~runstream.runs.executor.RunControl` is cancelled (SIGTERM,
  SIGKILL after the task's own grace, the run recorded ``cancelled``), and
  whatever is still running after the longest task grace plus
  :data:`DRAIN_MARGIN` is cancelled outright.

Every job runs in an asyncio task of its own; the scheduler never awaits
I/O itself, so submitting is synchronous and starts a job at once when a
slot is free.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from runstream.runs.executor import RunControl

__all__ = ["DRAIN_MARGIN", "Job", "Scheduler"]

log = logging.getLogger("runstream.runs")

DRAIN_MARGIN = 10.0
"""Seconds beyond the longest task grace that a stopping scheduler waits for cancelled jobs
(the time to record their outcome)."""


@dataclass(slots=True, eq=False)
class Job:
    """One submitted job: its run's key, task and limits, and the control that cancels it."""

    key: str
    task: str
    run: Callable[[], Awaitable[None]]
    limit: int | None = None
    grace: float = 0.0
    control: RunControl = field(default_factory=RunControl)
    handle: asyncio.Task[None] | None = None
    """The asyncio task running the job, once started."""
    gate: Any = None
    """What the scheduler's ``gate`` callable is asked about (e.g. the task's Gate)."""
    run_id: str | None = None
    """The run this job executes (``None``: its ``key``)."""
    waiting: str | None = None
    """Why the gate last held it back (``None``: it was not held back)."""


class Scheduler:
    """Starts submitted jobs within the limits; stops them gracefully. One per worker.

    ``on_change`` is called (synchronously) whenever a job waits, starts or
    ends: a feeder waiting for a free slot listens to it.
    """

    def __init__(
        self,
        capacity: int,
        *,
        name: str = "runstream",
        on_change: Callable[[], None] | None = None,
        gate: Callable[[Job], str | None] | None = None,
        on_wait: Callable[[Job, str | None], None] | None = None,
        gate_interval: float = 5.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("a scheduler needs a capacity >= 1")
        self.capacity = capacity
        self.name = name
        self._on_change = on_change
        self._gate = gate
        self._on_wait = on_wait
        self.gate_interval = gate_interval
        self._recheck_timer: asyncio.TimerHandle | None = None
        self._pending: dict[str, Job] = {}  # in submission order
        self._running: dict[str, Job] = {}
        self._per_task: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopping = False

    # -- state ----------------------------------------------------------------------

    @property
    def running(self) -> list[str]:
        """Keys of the jobs running now."""
        return list(self._running)

    @property
    def pending(self) -> list[str]:
        """Keys of the jobs waiting for a slot, in order."""
        return list(self._pending)

    def running_of(self, task: str) -> int:
        return self._per_task[task]

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._running

    async def wait_idle(self) -> None:
        """Return once nothing is pending or running."""
        await self._idle.wait()

    # -- admission ------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue ``job``; it starts at once if a slot and its task's limit allow.

        Returns False (and does nothing) while stopping, or if a job with the
        same key is pending or running. Must be called in the running loop.
        """
        if self.stopping or job.key in self:
            return False
        self._pending[job.key] = job
        self._idle.clear()
        self._launch_ready()
        if job.key in self._pending:
            self._changed()
        return True

    def cancel(self, key: str, reason: str | None = None) -> bool:
        """Cancel the job ``key`` (running or waiting) through its control; False if unknown."""
        job = self._running.get(key) or self._pending.get(key)
        if job is None:
            return False
        if reason is None:
            job.control.cancel()
        else:
            job.control.cancel(reason)
        return True

    def cancel_running(self, reason: str) -> None:
        """Cancel every running job through its control (the first reason given stays)."""
        for job in self._running.values():
            job.control.cancel(reason)

    def recheck(self) -> None:
        """Ask the gate again now for the waiting jobs (e.g. after resources were freed)."""
        if not self.stopping:
            self._launch_ready()

    def _launch_ready(self) -> None:
        gated = False
        for key, job in list(self._pending.items()):
            if len(self._running) >= self.capacity:
                break
            if job.limit is not None and self._per_task[job.task] >= job.limit:
                continue
            if self._gate is not None:
                reason = self._gate(job)
                if reason is not None:
                    gated = True
                    if reason != job.waiting:
                        job.waiting = reason
                        if self._on_wait is not None:
                            self._on_wait(job, reason)
                        self._changed()
                    continue
            del self._pending[key]
            self._running[key] = job
            self._per_task[job.task] += 1
            job.handle = asyncio.get_running_loop().create_task(
                self._run(job), name=f"{self.name}:{key}"
            )
            self._changed()
        if gated and self._recheck_timer is None:
            self._recheck_timer = asyncio.get_running_loop().call_later(
                self.gate_interval, self._on_recheck_timer
            )

    def _on_recheck_timer(self) -> None:
        self._recheck_timer = None
        self.recheck()

    async def _run(self, job: Job) -> None:
        try:
            await job.run()
        except Exception:
            # Jobs report their own failures; this only keeps the scheduler going.
            log.exception("%s: job %s failed", self.name, job.key)
        finally:
            del self._running[job.key]
            self._per_task[job.task] -= 1
            if not self.stopping:
                self._launch_ready()
            if not self._running and not self._pending:
                self._idle.set()
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # -- stopping -------------------------------------------------------------------

    def stop_taking(self) -> list[Job]:
        """Start no more jobs; return the ones that were waiting (never started), in order."""
        self.stopping = True
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
            self._recheck_timer = None
        dropped = list(self._pending.values())
        self._pending.clear()
        if not self._running:
            self._idle.set()
        self._changed()
        return dropped

    def abort(self) -> None:
        """Stop at once (e.g. the caller itself was cancelled): cancel every running job's task."""
        self.stop_taking()
        for job in self._running.values():
            if job.handle is not None:
                job.handle.cancel()

    async def drain(
        self,
        grace: float,
        reason: str,
        *,
        also: Iterable[asyncio.Task[None]] = (),
        margin: float = DRAIN_MARGIN,
    ) -> None:
        """After :meth:`stop_taking`: let running jobs finish, then cancel them.

        Waits up to ``grace`` seconds for the running jobs (and the tasks in
        ``also``: the caller's own helpers, e.g. handing waiting jobs back);
        then cancels the jobs' controls with ``reason`` and waits up to the
        longest grace of their tasks plus ``margin``; then cancels
        every task still going and waits for it. Returns when all have ended.
        """
        tasks = {job.handle for job in self._running.values() if job.handle is not None}
        tasks.update(also)
        if not tasks:
            return
        _done, left = await asyncio.wait(tasks, timeout=grace)
        if not left:
            return
        longest = max((job.grace for job in self._running.values()), default=0.0)
        self.cancel_running(reason)
        _done, left = await asyncio.wait(left, timeout=longest + margin)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
