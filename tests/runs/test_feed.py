"""The runs feed: every move announced once, in order per run, repaired when an append failed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import pytest

from runstream.backends.memory.log import MemoryEventLog
from runstream.backends.memory.runstore import MemoryRunStore
from runstream.core.model import AppendResult, Event, NewEvent, Producer
from runstream.errors import BackendUnavailable
from runstream.runs.feed import RUN_FEED, FeedRepair, announce, feed_seq
from runstream.runs.lifecycle import Lifecycle
from runstream.runs.model import RunRecord, new_run_id


class FlakyLog(MemoryEventLog):
    """A memory log whose appends to the runs feed fail while ``feed_down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.feed_down = False

    async def _append(
        self, stream: str, events: Sequence[NewEvent], producer: Producer | None
    ) -> AppendResult:
        if stream == RUN_FEED and self.feed_down:
            raise BackendUnavailable("the feed is down")
        return await super()._append(stream, events, producer)


@pytest.fixture
async def log() -> AsyncIterator[FlakyLog]:
    async with FlakyLog() as backend:
        yield backend


@pytest.fixture
async def store() -> AsyncIterator[MemoryRunStore]:
    s = MemoryRunStore()
    await s.start()
    yield s
    await s.aclose()


def record(status: str = "queued", attempt: int = 1) -> RunRecord:
    return RunRecord(new_run_id(), "t", {}, status, time.time(), attempt=attempt)  # type: ignore[arg-type]


async def feed(log: MemoryEventLog) -> list[Event]:
    try:
        return list((await log.read(RUN_FEED, 0, 1000)).events)
    except Exception:
        return []


def test_the_sequence_rises_along_every_path_of_a_run() -> None:
    r = record()
    paths = [
        [("queued", 1, False), ("running", 1, False), ("succeeded", 1, True)],
        [("queued", 1, False), ("cancelled", 1, True)],
        [("queued", 1, False), ("running", 1, False), ("lost", 1, False), ("lost", 1, True)],
        [
            ("queued", 1, False),
            ("running", 1, False),
            ("lost", 1, False),
            ("queued", 2, False),
            ("running", 2, False),
            ("timed_out", 2, True),
        ],
    ]
    for path in paths:
        seqs = [
            feed_seq(replace(r, status=s, attempt=a), final=f)  # type: ignore[arg-type]
            for s, a, f in path
        ]
        assert seqs == sorted(set(seqs)), path


async def test_a_run_is_announced_created_status_ended_with_its_previous_status(
    log: FlakyLog, store: MemoryRunStore
) -> None:
    life = Lifecycle(store, log)
    r = await life.create(record())
    await life.advance(r.id, "queued", "running", worker="w")
    await life.advance(r.id, "running", "succeeded", exit_code=0, finished_at=time.time())
    items = await feed(log)
    assert [(e.type, e.data["status"], e.data["previous"]) for e in items] == [
        ("created", "queued", None),
        ("status", "running", "queued"),
        ("ended", "succeeded", "running"),
    ]
    assert {e.data["id"] for e in items} == {r.id}
    assert items[-1].data["exit_code"] == 0 and items[-1].data["stream"] == r.id
    # The run's stream is closed before its ended item is written.
    assert (await log.info(r.id)).closed


async def test_a_retried_lost_run_is_announced_once_per_move_and_ends_once(
    log: FlakyLog, store: MemoryRunStore
) -> None:
    life = Lifecycle(store, log)
    r = await life.create(record())
    await life.advance(r.id, "queued", "running", worker="w")
    lost = await life.advance(r.id, "running", "lost", finished_at=time.time())
    again = await life.settle_lost(lost, retries=1)
    assert again.status == "queued" and again.attempt == 2
    await life.advance(r.id, "queued", "running", worker="w2")
    lost2 = await life.advance(r.id, "running", "lost", finished_at=time.time())
    await life.settle_lost(lost2, retries=1, announce=True)  # no retry left: final
    kinds = [(e.type, e.data["status"], e.data["attempt"]) for e in await feed(log)]
    assert kinds == [
        ("created", "queued", 1),
        ("status", "running", 1),
        ("status", "lost", 1),
        ("status", "queued", 2),
        ("status", "running", 2),
        ("status", "lost", 2),
        ("ended", "lost", 2),
    ]


async def test_announcing_twice_stores_once_and_an_older_state_never(log: FlakyLog) -> None:
    r = record("running")
    assert await announce(log, r, "queued", final=False)
    assert not await announce(log, r, "queued", final=False)  # a duplicate: stored once
    done = replace(r, status="succeeded")
    assert await announce(log, done, "running", final=True)
    assert not await announce(log, r, "queued", final=False)  # older than what is there
    assert [e.data["status"] for e in await feed(log)] == ["running", "succeeded"]


async def test_a_failed_announcement_never_fails_the_move_and_the_repair_makes_it(
    log: FlakyLog, store: MemoryRunStore
) -> None:
    life = Lifecycle(store, log)
    log.feed_down = True
    r = await life.create(record())
    moved = await life.advance(r.id, "queued", "running", worker="w", strict=True)
    assert moved.status == "running" and life.announce_failures == 2
    assert await feed(log) == []
    log.feed_down = False
    repair = FeedRepair(store, log)
    assert await repair.sweep() == 1
    # Its latest state, once (the intermediate 'created' is superseded: its item has it all).
    assert [(e.type, e.data["status"]) for e in await feed(log)] == [("status", "running")]
    assert await repair.sweep() == 0  # nothing new: no append at all
    await life.advance(r.id, "running", "failed", error="x", finished_at=time.time())
    assert await repair.sweep() == 0  # announced by the move itself: a duplicate
    assert [e.type for e in await feed(log)] == ["status", "ended"]


async def test_a_new_process_sweeps_every_unfinished_run_without_duplicating(
    log: FlakyLog, store: MemoryRunStore
) -> None:
    life = Lifecycle(store, log)
    runs = [await life.create(record()) for _ in range(3)]
    await life.advance(runs[0].id, "queued", "running", worker="w")
    before = await feed(log)
    # A fresh repairer (a restarted server) announces what it cannot know was announced:
    # every append is a duplicate, the feed does not grow.
    assert await FeedRepair(store, log).sweep() == 0
    assert await feed(log) == before
