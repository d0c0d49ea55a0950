"""The fan-out hub without sockets: hand-over, one reader, slow consumers, lifecycle."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence

import pytest

from runstream.backends.memory.log import MemoryEventLog
from runstream.core.model import Event, NewEvent, Reset, StreamInfo
from runstream.errors import TooManySubscribers
from runstream.protocol.cursor import Position
from runstream.server.hub import Frame, Hub, HubLimits, Subscription


class YieldingLog(MemoryEventLog):
    """A memory log whose reads suspend, and which can append *during* a read.

    ``during_read`` runs after a read took its snapshot and before it returns:
    exactly the window where an append races the hand-over from history to live.
    """

    def __init__(self) -> None:
        super().__init__()
        self.during_read: list[NewEvent] = []
        self.follows = 0
        self.rng = random.Random(0)

    async def _read(
        self, stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> tuple[StreamInfo, list[Event]]:
        await asyncio.sleep(0)
        result = await super()._read(stream, after, limit, max_bytes)
        if self.during_read:
            batch, self.during_read = self.during_read, []
            await self._append(stream, batch, None)
            # Let the shared reader deliver the new events before this read returns.
            for _ in range(self.rng.randint(0, 8)):
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        return result

    def follow(self, *args: object, **kwargs: object) -> AsyncIterator[Event | Reset]:
        self.follows += 1
        return super().follow(*args, **kwargs)  # type: ignore[arg-type]


def events(n: int, start: int = 0) -> list[NewEvent]:
    return [NewEvent("tick", {"i": start + i}) for i in range(n)]


async def collect(sub: Subscription, until_id: int) -> list[Frame]:
    got: list[Frame] = []
    while not got or got[-1].id < until_id:
        frames = await sub.get(idle=10)
        assert frames is not None, f"ended early: {sub.end_reason}"
        assert frames, "no frame for 10 s"
        got.extend(frames)
    return got


@pytest.fixture
async def log() -> AsyncIterator[YieldingLog]:
    async with YieldingLog() as backend:
        yield backend


@pytest.fixture
async def hub(log: YieldingLog) -> AsyncIterator[Hub]:
    h = Hub(log, HubLimits(buffer=100_000))
    yield h
    await h.close()


@pytest.mark.parametrize("seed", range(5))
async def test_hand_over_from_history_to_live_has_no_gap_and_no_duplicate(
    log: YieldingLog, hub: Hub, seed: int
) -> None:
    rng = random.Random(seed)
    total = 3000
    await log.append("s", events(600))
    sent = 600

    async def produce() -> None:
        nonlocal sent
        while sent < total:
            n = min(rng.randint(1, 40), total - sent)
            if rng.random() < 0.3:
                # Lands between a subscriber's read snapshot and its join decision.
                log.during_read.extend(events(n, sent))
            else:
                await log.append("s", events(n, sent))
            sent += n
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        if log.during_read:
            await log.append("s", log.during_read)
            log.during_read = []

    async def consume(start: int) -> list[int]:
        async with hub.subscribe("s", Position(start), transport="test") as sub:
            frames = await collect(sub, total)
            return [f.id for f in frames]

    starts = [0, 0, 1, 5, 50, 500]
    results = await asyncio.gather(produce(), *(consume(s) for s in starts))
    for start, ids in zip(starts, results[1:], strict=True):
        assert ids == list(range(start + 1, total + 1)), f"subscriber from {start}"


async def test_subscribers_of_one_stream_share_one_backend_reader(
    log: YieldingLog, hub: Hub
) -> None:
    await log.append("s", events(3))
    subs = [hub.subscribe("s", Position(0), transport="test") for _ in range(20)]
    for sub in subs:
        assert [f.id for f in await collect(sub, 3)] == [1, 2, 3]
        assert await sub.get(idle=0.01) == [] and sub.live
    await log.append("s", events(2, 3))
    batches = [await collect(sub, 5) for sub in subs]
    assert log.follows == 1
    # The live frames are the same objects for everyone: encoded once per stream.
    for batch in batches[1:]:
        assert all(a is b for a, b in zip(batch, batches[0], strict=True))
    assert batches[0][0].sse() is batches[1][0].sse()
    for sub in subs:
        sub.close()
    await asyncio.sleep(0)
    assert hub.subscriber_count == 0 and not hub._feeds


async def test_live_burst_comes_out_as_one_batch(log: YieldingLog, hub: Hub) -> None:
    await log.append("s", events(1))
    async with hub.subscribe("s", Position(1), transport="test") as sub:
        assert await sub.get(idle=0.05) == []  # now live, nothing new
        assert sub.live
        for i in range(10):
            await log.append("s", events(1, i))
        await asyncio.sleep(0)
        batch = await sub.get(idle=5)
        assert batch is not None and [f.id for f in batch] == list(range(2, 12))


async def test_slow_consumer_is_cut_while_others_keep_up(log: YieldingLog) -> None:
    cut: list[Subscription] = []
    hub = Hub(log, HubLimits(buffer=10), on_slow=cut.append)
    try:
        await log.append("s", events(1))
        slow = hub.subscribe("s", Position(1), transport="test")
        fast = hub.subscribe("s", Position(1), transport="test")
        for sub in (slow, fast):
            assert await sub.get(idle=0.01) == []
        got: list[int] = []
        for i in range(30):
            await log.append("s", events(1, i))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            frames = await fast.get(idle=5)
            assert frames
            got.extend(f.id for f in frames)
        assert got == list(range(2, 32))
        assert slow.end_reason == "slow_consumer" and cut == [slow]
        assert slow.ended.done()
        assert await slow.get() is None  # buffer dropped: memory stays bounded
        # It resumes from its last delivered id (1) and misses nothing.
        slow.close()
        async with hub.subscribe("s", Position(1), transport="test") as again:
            assert [f.id for f in await collect(again, 31)] == list(range(2, 32))
        fast.close()
    finally:
        await hub.close()


async def test_epoch_change_while_live_is_reported_as_reset(log: YieldingLog, hub: Hub) -> None:
    await log.append("s", events(5))
    async with hub.subscribe("s", Position(0), transport="test") as sub:
        await collect(sub, 5)
        assert await sub.get(idle=0.01) == []
        old = (await log.info("s")).epoch
        # Delete and re-create before the reader looks again.
        await log.delete("s")
        await log.append("s", events(2, 100))
        frames = await collect(sub, 2)
    assert frames[0].reset is not None
    reset = frames[0].reset
    assert reset.reason == "epoch_changed" and reset.requested == 5 and reset.after == 0
    assert reset.epoch != old
    assert [f.event.data["i"] for f in frames[1:] if f.event] == [100, 101]


async def test_resume_from_another_epoch_gets_reset_first(log: YieldingLog, hub: Hub) -> None:
    await log.append("s", events(3))
    async with hub.subscribe("s", Position(2, "oldepoch"), transport="test") as sub:
        frames = await collect(sub, 3)
    assert frames[0].reset is not None and frames[0].reset.reason == "epoch_changed"
    assert frames[0].reset.requested == 2
    assert [f.id for f in frames[1:]] == [1, 2, 3]


async def test_end_entry_ends_live_and_late_subscribers(log: YieldingLog, hub: Hub) -> None:
    await log.append("s", events(2))
    sub = hub.subscribe("s", Position(0), transport="test")
    await collect(sub, 2)
    await log.close("s", "succeeded")
    frames = await collect(sub, 3)
    assert frames[-1].is_end and await sub.get() is None and sub.end_reason == "end"
    sub.close()
    async with hub.subscribe("s", Position(0), transport="test") as late:
        frames = await collect(late, 3)
        assert frames[-1].is_end and await late.get() is None


async def test_deleted_stream_ends_subscribers(log: YieldingLog, hub: Hub) -> None:
    await log.append("s", events(1))
    async with hub.subscribe("s", Position(1), transport="test") as sub:
        assert await sub.get(idle=0.01) == []
        await log.delete("s")
        assert await sub.get(idle=5) is None
        assert sub.end_reason == "deleted"


class SilentDeleteLog(YieldingLog):
    """Deletes without waking followers: as when another process or a restore deleted it."""

    async def delete(self, stream: str) -> None:
        self._get(stream)
        del self._streams[stream]


async def test_reconciliation_ends_subscribers_that_missed_the_delete() -> None:
    async with SilentDeleteLog() as log:
        log.safety_poll = 3600  # the follow alone would not notice for an hour
        hub = Hub(log, HubLimits(reconcile_interval=3600))
        await log.append("s", events(1))
        sub = hub.subscribe("s", Position(1), transport="test")
        assert await sub.get(idle=0.01) == []
        await log.delete("s")
        assert await sub.get(idle=0.01) == []
        await hub.reconcile()
        assert await sub.get(idle=5) is None and sub.end_reason == "deleted"
        sub.close()
        await hub.close()


async def test_a_stream_not_created_yet_is_waited_for_with_keepalives(log: YieldingLog) -> None:
    hub = Hub(log, HubLimits(reconcile_interval=3600))
    try:
        sub = hub.subscribe("later", Position(0), transport="test", wait_for_create=True)
        # While it waits, get() comes back empty every idle period (the transport's keepalive).
        assert await sub.get(idle=0.05) == []
        await hub.reconcile()  # absent and never seen: not a deletion
        assert sub.end_reason is None
        waiting = asyncio.ensure_future(sub.get(idle=30))
        await log.append("later", events(2))
        frames = await waiting
        assert frames is not None and [f.id for f in frames] == [1, 2]
        assert sub.waiting is False
        sub.close()
    finally:
        await hub.close()


async def test_many_waiting_clients_cost_one_watch_and_no_reads(log: YieldingLog) -> None:
    hub = Hub(log)
    hub.start()
    reads = 0
    real_read = log._read

    async def counting_read(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return await real_read(*args, **kwargs)  # type: ignore[arg-type]

    log._read = counting_read  # type: ignore[method-assign]
    try:
        subs = [
            hub.subscribe(f"s{i % 5}", Position(0), transport="test", wait_for_create=True)
            for i in range(200)
        ]
        gets = [asyncio.ensure_future(s.get(idle=0.2)) for s in subs]
        assert await asyncio.gather(*gets) == [[]] * 200  # idle: keepalive time
        first = reads
        gets = [asyncio.ensure_future(s.get(idle=0.2)) for s in subs]
        assert await asyncio.gather(*gets) == [[]] * 200
        # One read each when the stream was found absent; none while waiting on.
        assert first == 200 and reads == first
        assert sorted(log.notifier.watched()) == [f"s{i}" for i in range(5)]
        await log.append("s3", events(1))
        got = await asyncio.gather(*(s.get(idle=5) for s in subs[3::5]))
        assert all(f is not None and [x.id for x in f] == [1] for f in got)
        for s in subs:
            s.close()
    finally:
        await hub.close()


async def test_a_deleted_stream_ends_its_readers_but_not_those_waiting_for_it(
    log: YieldingLog,
) -> None:
    hub = Hub(log, HubLimits(reconcile_interval=3600))
    try:
        await log.append("d", events(1))
        reader = hub.subscribe("d", Position(0), transport="test", wait_for_create=True)
        assert [f.id for f in await collect(reader, 1)] == [1]
        await log.delete("d")
        assert await reader.get(idle=5) is None and reader.end_reason == "deleted"
        reader.close()
        # A client that comes back (with its position) waits for the stream to return,
        # then gets a reset: it is another history.
        back = hub.subscribe("d", Position(1, reader.epoch), transport="test", wait_for_create=True)
        assert await back.get(idle=0.05) == []
        await log.append("d", events(3))
        frames = await collect(back, 3)
        assert frames[0].reset is not None and frames[0].reset.reason == "epoch_changed"
        assert [f.id for f in frames[1:]] == [1, 2, 3]
        back.close()
    finally:
        await hub.close()


async def test_an_end_check_ends_a_wait_for_a_stream_that_will_never_exist(
    log: YieldingLog,
) -> None:
    hub = Hub(log, HubLimits(reconcile_interval=3600))
    gone: set[str] = set()
    seen: list[StreamInfo | None] = []

    async def run_is_gone(stream: str, info: StreamInfo | None) -> str | None:
        seen.append(info)
        return "deleted" if stream in gone else None

    hub.add_end_check(run_is_gone)
    try:
        sub = hub.subscribe("run-x", Position(0), transport="test", wait_for_create=True)
        assert await sub.get(idle=0.05) == []
        await hub.reconcile()
        assert sub.end_reason is None and seen == [None]
        gone.add("run-x")
        await hub.reconcile()
        assert await sub.get(idle=5) is None and sub.end_reason == "deleted"
        sub.close()
    finally:
        await hub.close()


async def test_subscribing_at_now_to_a_stream_not_created_yet_gets_all_it_will_hold(
    log: YieldingLog, hub: Hub
) -> None:
    sub = hub.subscribe("n", Position(now=True), transport="test", wait_for_create=True)
    assert await sub.get(idle=0.05) == []
    await log.append("n", events(2))
    assert [f.id for f in await collect(sub, 2)] == [1, 2]
    sub.close()


async def test_shutdown_ends_a_waiting_subscription_at_once(log: YieldingLog) -> None:
    hub = Hub(log)
    sub = hub.subscribe("w", Position(0), transport="test", wait_for_create=True)
    assert await sub.get(idle=0.05) == []
    waiting = asyncio.ensure_future(sub.get(idle=60))
    await asyncio.sleep(0.01)
    await hub.close()
    assert await asyncio.wait_for(waiting, 1) is None and sub.end_reason == "shutdown"
    sub.close()


async def test_end_check_hook_ends_responses(log: YieldingLog, hub: Hub) -> None:
    terminal: set[str] = set()

    async def run_is_terminal(stream: str, info: StreamInfo | None) -> str | None:
        return "run_terminal" if stream in terminal else None

    hub.add_end_check(run_is_terminal)
    await log.append("r1", events(1))
    async with hub.subscribe("r1", Position(1), transport="test") as sub:
        assert await sub.get(idle=0.01) == []
        await hub.reconcile()
        assert sub.end_reason is None
        terminal.add("r1")
        await hub.reconcile()
        assert await sub.get(idle=1) is None and sub.end_reason == "run_terminal"


async def test_shutdown_ends_every_subscription_at_once(log: YieldingLog) -> None:
    hub = Hub(log)
    await log.append("a", events(1))
    await log.append("b", events(1))
    subs = [hub.subscribe(s, Position(1), transport="test") for s in ("a", "a", "b")]
    waits = [asyncio.ensure_future(s.get(idle=60)) for s in subs]
    await asyncio.sleep(0.05)
    await hub.close()
    assert await asyncio.gather(*waits) == [None, None, None]
    assert {s.end_reason for s in subs} == {"shutdown"}
    with pytest.raises(TooManySubscribers):
        hub.subscribe("a", Position(0), transport="test")
    for s in subs:
        s.close()


async def test_subscriber_limits_per_stream_and_total(log: YieldingLog) -> None:
    hub = Hub(log, HubLimits(per_stream=2, total=3))
    try:
        a1 = hub.subscribe("a", Position(0), transport="test")
        hub.subscribe("a", Position(0), transport="test")
        with pytest.raises(TooManySubscribers, match="stream 'a'"):
            hub.subscribe("a", Position(0), transport="test")
        hub.subscribe("b", Position(0), transport="test")
        with pytest.raises(TooManySubscribers, match="limit 3"):
            hub.subscribe("c", Position(0), transport="test")
        a1.close()
        hub.subscribe("a", Position(0), transport="test").close()
    finally:
        await hub.close()


async def test_now_starts_at_the_tail_fixed_on_entry(log: YieldingLog, hub: Hub) -> None:
    await log.append("s", events(4))
    info = await log.info("s")
    sub = hub.subscribe("s", Position(now=True), transport="test", info=info)
    await log.append("s", events(1, 4))
    frames: Sequence[Frame] = await collect(sub, 5)
    assert [f.id for f in frames] == [5]
    sub.close()


class CountingLog(MemoryEventLog):
    """Counts the state lookups the reconciler makes: batched, or one stream at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.single: list[str] = []
        self.batches: list[list[str]] = []
        self._batching = False

    async def info(self, stream: str) -> StreamInfo:
        if not self._batching:
            self.single.append(stream)
        return await super().info(stream)

    async def info_many(self, streams: Sequence[str]) -> dict[str, StreamInfo | None]:
        self.batches.append(list(streams))
        self._batching = True  # the default implementation reads one by one
        try:
            return await super().info_many(streams)
        finally:
            self._batching = False


async def test_reconciliation_reads_every_followed_stream_in_one_batch() -> None:
    async with CountingLog() as log:
        log.safety_poll = 3600
        hub = Hub(log, HubLimits(reconcile_interval=3600))
        names = [f"s{i}" for i in range(50)]
        for name in names:
            await log.append(name, events(1))
        subs = [hub.subscribe(name, Position(1), transport="test") for name in names]
        for sub in subs:
            assert await sub.get(idle=0.01) == []
        await log.close("s7")
        log.single.clear()
        await hub.reconcile()
        assert len(log.batches) == 1 and sorted(log.batches[0]) == sorted(names)
        assert log.single == []
        for sub in subs:
            sub.close()
        await hub.close()


def test_frames_reuse_the_stored_data_text_and_match_a_fresh_encoding() -> None:
    stored = Event(7, "tick", {"b": [1, 2], "a": "é"}, 1_700_000_000.25, '{"b":[1,2],"a":"é"}')
    fresh = Event(7, "tick", {"b": [1, 2], "a": "é"}, 1_700_000_000.25)
    assert stored == fresh  # the stored text takes no part in equality
    for a, b in ((Frame("ep", stored), Frame("ep", fresh)),):
        assert a.sse() == b.sse()
        assert a.ws() == b.ws()
    # The stored text is what goes out, not a new encoding of the data.
    odd = Event(7, "tick", {"a": 1}, 1.0, '{"a":1}'.replace("1", "1.0"))
    assert b'data: {"a":1.0}' in Frame("ep", odd).sse()
    assert '"data":{"a":1.0}' in Frame("ep", odd).ws()


async def test_live_buffer_is_bounded_in_bytes_too(log: YieldingLog) -> None:
    cut: list[Subscription] = []
    hub = Hub(log, HubLimits(buffer=10_000, buffer_bytes=5000), on_slow=cut.append)
    try:
        await log.append("s", events(1))
        slow = hub.subscribe("s", Position(1), transport="test")
        assert await slow.get(idle=0.01) == []
        for i in range(3):  # 3 x ~2 KB: over 5000 bytes at the third, far under 10,000 events
            await log.append("s", NewEvent("big", "x" * 2000 + str(i)))
            for _ in range(3):
                await asyncio.sleep(0)
        assert slow.end_reason == "slow_consumer" and cut == [slow]
        assert await slow.get() is None
        slow.close()
    finally:
        await hub.close()


async def test_one_event_larger_than_the_buffer_bytes_is_still_delivered(log: YieldingLog) -> None:
    hub = Hub(log, HubLimits(buffer_bytes=100))
    try:
        await log.append("s", events(1))
        async with hub.subscribe("s", Position(1), transport="test") as sub:
            assert await sub.get(idle=0.01) == []
            await log.append("s", NewEvent("big", "x" * 1000))
            frames = await sub.get(idle=5)
            assert frames and frames[0].event is not None and frames[0].event.data == "x" * 1000
            assert sub.end_reason is None
    finally:
        await hub.close()


async def test_catch_up_reads_pages_bounded_in_bytes(log: YieldingLog) -> None:
    hub = Hub(log, HubLimits(page_bytes=2500))
    try:
        await log.append("s", [NewEvent("big", "x" * 1000) for _ in range(5)])
        async with hub.subscribe("s", Position(0), transport="test") as sub:
            pages = [[f.id for f in await sub.get(idle=5) or []] for _ in range(3)]
        assert pages == [[1, 2], [3, 4], [5]]
    finally:
        await hub.close()
