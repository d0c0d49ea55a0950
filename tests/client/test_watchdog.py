"""Watchdog timers: the bookkeeping with a fake clock, the public helper on real iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest

from runstream.client.watchdog import WatchdogConfig, WatchdogTimers, watchdog
from runstream.errors import RemoteError, StreamTimeout

T = TypeVar("T")

# -- timers without I/O ---------------------------------------------------------


def test_first_event_timer_guards_until_the_first_byte_then_idle_takes_over() -> None:
    t = WatchdogTimers(WatchdogConfig(first_event=10, idle=2))
    t.start(100.0)
    assert t.deadline() == (110.0, "first_event")
    assert t.expired(109.9) is None
    assert t.expired(110.0) == "first_event"
    t.on_bytes(105.0)
    assert t.deadline() == (107.0, "idle")


def test_idle_applies_from_the_start_when_first_event_is_off() -> None:
    t = WatchdogTimers(WatchdogConfig(idle=3))
    t.start(0.0)
    assert t.deadline() == (3.0, "idle")


def test_keepalive_bytes_feed_idle_but_not_stale() -> None:
    t = WatchdogTimers(WatchdogConfig(idle=5, stale=20))
    t.start(0.0)
    for now in range(4, 40, 4):
        t.on_bytes(float(now))  # a keepalive every 4 s
        assert t.expired(float(now) + 0.5) in (None, "stale")
    assert t.expired(20.0) == "stale"
    t.on_event(21.0)
    assert t.deadline() == (26.0, "idle")


def test_all_timers_off_means_no_deadline() -> None:
    t = WatchdogTimers(WatchdogConfig())
    t.start(0.0)
    assert t.deadline() is None and t.expired(1e9) is None
    assert not WatchdogConfig().enabled


def test_pause_does_not_count_against_any_timer() -> None:
    t = WatchdogTimers(WatchdogConfig(idle=5, stale=8))
    t.start(0.0)
    t.on_event(1.0)
    t.pause(2.0)
    assert t.deadline() is None and t.expired(1000.0) is None
    t.resume(102.0)  # paused 100 s
    assert t.deadlines() == [(106.0, "idle"), (109.0, "stale")]


def test_negative_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="idle"):
        WatchdogConfig(idle=-1)


# -- the public helper around any async iterator ------------------------------------


async def ticking(gaps: list[float], never_end: bool = False) -> AsyncIterator[int]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i
    if never_end:
        await asyncio.Event().wait()


class Silent:
    """An 'upstream' that accepts and never sends: records whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    def __aiter__(self) -> Silent:
        return self

    async def __anext__(self) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.closed = True


async def consume(it: AsyncIterator[T], on_item: Callable[[T], None] = lambda _: None) -> None:
    async for item in it:
        on_item(item)


def elapsed_since(start: float) -> float:
    return asyncio.get_running_loop().time() - start


@pytest.mark.parametrize("setting", [0.3, 0.6])
async def test_first_event_trips_at_its_setting_on_a_silent_upstream(setting: float) -> None:
    upstream = Silent()
    start = asyncio.get_running_loop().time()
    with pytest.raises(StreamTimeout) as info:
        await consume(watchdog(upstream, first_event=setting, idle=10))
    took = elapsed_since(start)
    assert info.value.kind == "first_event" and info.value.seconds == setting
    assert isinstance(info.value, RemoteError)  # retryable family
    assert setting * 0.8 <= took <= setting * 1.2 + 0.05
    assert upstream.closed


async def test_idle_trips_at_its_setting_after_items_stop() -> None:
    got: list[int] = []
    stamps: list[float] = []

    def on_item(item: int) -> None:
        got.append(item)
        stamps.append(asyncio.get_running_loop().time())

    with pytest.raises(StreamTimeout) as info:
        await consume(watchdog(ticking([0.0, 0.05, 0.05], never_end=True), idle=0.4), on_item)
    took = elapsed_since(stamps[-1])
    assert got == [0, 1, 2] and info.value.kind == "idle"
    assert 0.32 <= took <= 0.48 + 0.05


async def test_stale_trips_when_only_keepalives_arrive() -> None:
    async def pings() -> AsyncIterator[str]:
        yield "data"
        while True:
            await asyncio.sleep(0.05)
            yield "ping"

    start = asyncio.get_running_loop().time()
    seen: list[str] = []
    with pytest.raises(StreamTimeout) as info:
        await consume(
            watchdog(pings(), idle=0.2, stale=0.5, is_event=lambda s: s != "ping"), seen.append
        )
    took = elapsed_since(start)
    assert info.value.kind == "stale"
    assert 0.4 <= took <= 0.6 + 0.05
    assert len(seen) > 5  # the keepalives kept idle happy the whole time


async def test_healthy_slow_stream_never_trips() -> None:
    # Items every 0.15 s for ~1.2 s, against idle 0.4 and stale 0.4.
    items = [i async for i in watchdog(ticking([0.15] * 8), first_event=0.4, idle=0.4, stale=0.4)]
    assert items == list(range(8))


async def test_time_the_consumer_spends_is_not_charged_to_the_source() -> None:
    items = []
    async for item in watchdog(ticking([0.0, 0.0, 0.0]), idle=0.1):
        await asyncio.sleep(0.25)  # a slow consumer, longer than idle
        items.append(item)
    assert items == [0, 1, 2]


async def test_sources_own_timeout_error_is_not_mistaken_for_a_trip() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise TimeoutError("upstream said so")

    with pytest.raises(TimeoutError, match="upstream said so"):
        await consume(watchdog(broken(), idle=5))


async def test_retry_pattern_with_a_fresh_source_recovers() -> None:
    attempts = 0

    def source() -> AsyncIterator[int]:
        nonlocal attempts
        attempts += 1
        return Silent() if attempts == 1 else ticking([0.0, 0.0])

    result: list[int] = []
    for _ in range(3):
        try:
            result = [i async for i in watchdog(source(), first_event=0.2)]
            break
        except StreamTimeout:
            continue
    assert attempts == 2 and result == [0, 1]
