"""The scheduler both workers share: limits, order, and the graceful stop (no I/O)."""

from __future__ import annotations

import asyncio
import time

import pytest

from runstream.runs.scheduler import Job, Scheduler


class Work:
    """Jobs that record when they run and finish when their gate opens."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.finished: list[str] = []
        self.ended: dict[str, asyncio.Event] = {}

    def job(
        self, key: str, task: str = "t", *, limit: int | None = None, grace: float = 0.0
    ) -> Job:
        gate = self.gates.setdefault(key, asyncio.Event())
        ended = self.ended.setdefault(key, asyncio.Event())

        async def run() -> None:
            self.started.append(key)
            await gate.wait()
            self.finished.append(key)
            ended.set()

        return Job(key, task, run, limit, grace)

    def release(self, key: str) -> None:
        self.gates[key].set()

    async def finish(self, key: str) -> None:
        """Let ``key`` end, and return once the scheduler has seen it end."""
        self.release(key)
        # The scheduler's bookkeeping runs in the job's task right after the job, before
        # this waiter resumes.
        await self.ended[key].wait()


async def test_at_most_capacity_jobs_run_and_the_rest_wait_in_order() -> None:
    work, scheduler = Work(), Scheduler(2)
    for key in "abcd":
        assert scheduler.submit(work.job(key))
    assert scheduler.running == ["a", "b"]
    assert scheduler.pending == ["c", "d"]
    await work.finish("a")
    assert scheduler.running == ["b", "c"]
    assert scheduler.pending == ["d"]


async def test_a_job_waiting_for_its_task_limit_does_not_hold_up_other_tasks() -> None:
    work, scheduler = Work(), Scheduler(3)
    for key in ("l1", "l2", "l3"):
        scheduler.submit(work.job(key, "limited", limit=2))
    scheduler.submit(work.job("f1", "free"))
    assert scheduler.running == ["l1", "l2", "f1"]
    assert scheduler.running_of("limited") == 2
    assert scheduler.pending == ["l3"]
    await work.finish("f1")  # a free slot, but limited is at its limit
    assert scheduler.pending == ["l3"]
    await work.finish("l1")
    assert scheduler.running == ["l2", "l3"]
    assert scheduler.running_of("limited") == 2


async def test_a_key_is_taken_once_and_nothing_is_taken_while_stopping() -> None:
    work, scheduler = Work(), Scheduler(1)
    assert scheduler.submit(work.job("a"))
    assert not scheduler.submit(work.job("a"))
    assert scheduler.submit(work.job("b"))
    assert not scheduler.submit(work.job("b"))
    dropped = scheduler.stop_taking()
    assert [job.key for job in dropped] == ["b"]
    assert not scheduler.submit(work.job("c"))
    assert scheduler.pending == []


async def test_wait_idle_returns_once_nothing_is_pending_or_running() -> None:
    changes: list[tuple[list[str], list[str]]] = []
    work = Work()
    scheduler = Scheduler(
        1, on_change=lambda: changes.append((scheduler.running, scheduler.pending))
    )
    await asyncio.wait_for(scheduler.wait_idle(), 1)
    scheduler.submit(work.job("a"))
    scheduler.submit(work.job("b"))
    idle = asyncio.create_task(scheduler.wait_idle())
    work.release("a")
    work.release("b")
    await asyncio.wait_for(idle, 5)
    assert work.finished == ["a", "b"]
    assert changes[0] == (["a"], [])
    assert changes[-1] == ([], [])


async def test_drain_lets_quick_jobs_finish_and_cancels_the_rest_with_the_reason() -> None:
    work, scheduler = Work(), Scheduler(3)
    quick, slow = work.job("quick"), work.job("slow", grace=0.1)

    async def stop_on_cancel() -> None:
        await slow.control.event.wait()
        work.release("slow")

    watcher = asyncio.create_task(stop_on_cancel())
    scheduler.submit(quick)
    scheduler.submit(slow)
    scheduler.submit(work.job("waiting", limit=0))  # never starts
    dropped = scheduler.stop_taking()
    assert [job.key for job in dropped] == ["waiting"]
    asyncio.get_running_loop().call_later(0.05, work.release, "quick")
    await asyncio.wait_for(scheduler.drain(0.5, "shutting down"), 10)
    await watcher
    assert sorted(work.finished) == ["quick", "slow"]
    assert not quick.control.cancelled
    assert slow.control.reason == "shutting down"
    assert work.started == ["quick", "slow"]


async def test_drain_cancels_a_job_that_ignores_its_control_after_grace_and_margin() -> None:
    work, scheduler = Work(), Scheduler(1)
    stuck = work.job("stuck", grace=0.1)
    scheduler.submit(stuck)
    scheduler.stop_taking()
    started = time.monotonic()
    await asyncio.wait_for(scheduler.drain(0.1, "stop", margin=0.1), 10)
    assert 0.25 <= time.monotonic() - started < 5
    assert stuck.control.cancelled
    assert stuck.handle is not None and stuck.handle.cancelled()
    assert scheduler.running == []


async def test_drain_also_waits_for_the_callers_helpers() -> None:
    scheduler = Scheduler(1)
    done = asyncio.Event()

    async def helper() -> None:
        await asyncio.sleep(0.05)
        done.set()

    scheduler.stop_taking()
    await scheduler.drain(5, "stop", also={asyncio.create_task(helper())})
    assert done.is_set()


@pytest.mark.parametrize("capacity", [0, -1])
def test_a_scheduler_needs_room_for_one_job(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        Scheduler(capacity)
