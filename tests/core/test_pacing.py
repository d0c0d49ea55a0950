"""The duty cycle of background work: the arithmetic with a fake clock, then the
context that decides whether code that asks to pause does."""

from __future__ import annotations

import asyncio

import pytest

from runstream.core import pacing
from runstream.core.pacing import MAX_PAUSE, Pacer, current, pause


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_step_is_followed_by_the_pause_that_keeps_it_at_the_duty() -> None:
    clock = Clock()
    pacer = Pacer(0.1, clock=clock)
    clock.now += 0.004  # a 4 ms step
    assert pacer.pause_for(clock.now) == pytest.approx(0.036)
    clock.now += 0.036
    pacer.resumed(clock.now, 0.036)
    clock.now += 0.001  # the next step is measured from the end of the pause
    assert pacer.pause_for(clock.now) == pytest.approx(0.009)
    assert pacer.paused == pytest.approx(0.036)


def test_work_over_the_whole_run_stays_at_the_duty() -> None:
    clock = Clock()
    pacer = Pacer(0.25, clock=clock)
    busy = 0.0
    for step in (0.002, 0.010, 0.001, 0.007, 0.003):
        clock.now += step
        busy += step
        delay = pacer.pause_for(clock.now)
        clock.now += delay
        pacer.resumed(clock.now, delay)
    assert busy / (clock.now - pacer.started) == pytest.approx(0.25)
    assert pacer.paused == pytest.approx(clock.now - pacer.started - busy)


def test_a_slow_step_pauses_at_most_max_pause() -> None:
    clock = Clock()
    pacer = Pacer(0.01, clock=clock)
    clock.now += 0.5  # a stalled disk: 49.5 s by the ratio
    assert pacer.pause_for(clock.now) == MAX_PAUSE


def test_pauses_end_with_the_budget() -> None:
    clock = Clock()
    pacer = Pacer(0.1, budget=1.0, clock=clock)
    clock.now += 0.05
    assert pacer.pause_for(clock.now) == pytest.approx(0.45)
    clock.now += 0.45
    pacer.resumed(clock.now, 0.45)
    clock.now += 0.1  # 0.6 s in: what is left of the budget, not 0.9
    assert pacer.pause_for(clock.now) == pytest.approx(0.4)
    clock.now += 0.4
    pacer.resumed(clock.now, 0.4)
    clock.now += 0.05  # past the budget: full speed
    assert pacer.pause_for(clock.now) == 0.0


def test_a_duty_of_one_never_pauses() -> None:
    clock = Clock()
    pacer = Pacer(1.0, clock=clock)
    clock.now += 3.0
    assert pacer.pause_for(clock.now) == 0.0


@pytest.mark.parametrize("duty", [0.0, -0.1, 1.5])
def test_a_duty_outside_zero_to_one_is_refused(duty: float) -> None:
    with pytest.raises(ValueError, match="duty"):
        Pacer(duty)


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        Pacer(0.5, budget=-1)


async def test_pause_sleeps_as_the_installed_pacer_says_and_only_inside_the_block() -> None:
    clock = Clock()
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        clock.now += delay

    pacer = Pacer(0.5, clock=clock, sleep=sleep)
    assert current() is None
    await pause()  # no pacer: nothing
    with pacing.pacing(pacer):
        clock.now += 0.2
        await pause()
        clock.now += 0.1
        await pause()
    await pause()  # outside: nothing
    assert slept == pytest.approx([0.2, 0.1])
    assert pacer.paused == pytest.approx(0.3)
    assert current() is None


async def test_only_the_task_that_installed_the_pacer_pauses() -> None:
    clock = Clock()
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        clock.now += delay

    async def step() -> Pacer | None:
        clock.now += 0.1
        await pause()
        return current()

    pacer = Pacer(0.5, clock=clock, sleep=sleep)
    with pacing.pacing(pacer):
        started = asyncio.create_task(step())  # e.g. a poller a backend starts meanwhile
        assert await started is pacer  # it sees the variable...
        assert slept == []  # ...but does not pause
        await step()
    assert slept == pytest.approx([0.2])


async def test_a_pause_counts_the_time_it_really_took() -> None:
    clock = Clock()

    async def oversleep(delay: float) -> None:
        clock.now += delay + 0.05  # a loaded machine wakes late

    pacer = Pacer(0.5, clock=clock, sleep=oversleep)
    with pacing.pacing(pacer):
        clock.now += 0.1
        await pause()
    assert pacer.paused == pytest.approx(0.15)


async def test_hurry_ends_the_pause_under_way_and_every_later_one() -> None:
    pacer = Pacer(0.0001)  # the real sleep: each pause would be MAX_PAUSE
    pausing = asyncio.Event()
    real_sleep = pacer.sleep

    async def sleep(delay: float) -> None:
        pausing.set()
        await real_sleep(delay)

    pacer.sleep = sleep

    async def work() -> None:
        with pacing.pacing(pacer):
            for _ in range(5):
                await asyncio.sleep(0.001)  # a step
                await pause()

    task = asyncio.create_task(work())
    await asyncio.wait_for(pausing.wait(), 5)
    pacer.hurry()
    await asyncio.wait_for(task, 5)
    assert pacer.paused < MAX_PAUSE / 2, "the pause under way went on"
    assert pacer.pause_for(pacer.clock() + 10) == 0.0
