"""The EventLog contract. Every backend must pass this file unchanged.

Run one backend with ``pytest tests/backends/test_contract.py -k sqlite``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runstream.backends import EventLog, open_backend
from runstream.core.model import (
    END_TYPE,
    EncodedEvents,
    Event,
    NewEvent,
    Producer,
    Reset,
    StreamInfo,
    encode_data,
)
from runstream.errors import (
    HistoryLost,
    StaleProducerSeq,
    StreamClosed,
    StreamDeleted,
    StreamNotFound,
    ValidationError,
)
from tests.backends.followers import watching

WAIT = 10.0  # generous bound for "eventually"; a hung follower fails the test, not the suite


def ev(i: int, type_: str = "n") -> NewEvent:
    return NewEvent(type_, {"i": i})


async def take(it: AsyncIterator[Event | Reset], n: int) -> list[Event | Reset]:
    """The next ``n`` items of ``it``, failing the test if they do not come in time."""

    async def inner() -> list[Event | Reset]:
        out: list[Event | Reset] = []
        async for item in it:
            out.append(item)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(inner(), WAIT)


async def drain(it: AsyncIterator[Event | Reset]) -> list[Event | Reset]:
    """Everything ``it`` yields until it stops on its own."""

    async def inner() -> list[Event | Reset]:
        return [item async for item in it]

    return await asyncio.wait_for(inner(), WAIT)


def ids(items: list[Event | Reset]) -> list[int]:
    return [i.id for i in items if isinstance(i, Event)]


# -- append and read -----------------------------------------------------------


async def test_first_append_creates_stream_with_id_one(log: EventLog) -> None:
    res = await log.append("s1", ev(1))
    assert (res.stream, res.first_id, res.last_id, res.duplicate) == ("s1", 1, 1, False)
    info = await log.info("s1")
    assert (info.status, info.first_id, info.last_id, info.epoch) == ("open", 1, 1, res.epoch)


async def test_ids_increase_by_one_across_appends(log: EventLog) -> None:
    firsts = [(await log.append("s", [ev(i), ev(i)])).first_id for i in range(5)]
    assert firsts == [1, 3, 5, 7, 9]
    page = await log.read("s")
    assert [e.id for e in page.events] == list(range(1, 11))


async def test_event_round_trips_type_data_and_time(log: EventLog) -> None:
    data = {"text": "héllo \u2603 \n\t", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    before = time.time()
    await log.append("s", NewEvent("stdout", data))
    (event,) = (await log.read("s")).events
    assert (event.id, event.type, event.data) == (1, "stdout", data)
    assert before - 5 <= event.time <= time.time() + 5


@pytest.mark.parametrize("data", [None, 0, "x", [], [1, "a"], {"k": None}, 1.5, False])
async def test_any_json_value_is_accepted_as_data(log: EventLog, data: object) -> None:
    await log.append("s", NewEvent("t", data))
    assert (await log.read("s")).events[0].data == data


async def test_epoch_is_stable_for_a_stream(log: EventLog) -> None:
    a = await log.append("s", ev(1))
    b = await log.append("s", ev(2))
    assert a.epoch == b.epoch == (await log.info("s")).epoch
    assert ":" not in a.epoch


async def test_batch_append_is_contiguous_under_concurrency(log: EventLog) -> None:
    async def writer(w: int) -> tuple[int, int]:
        res = await log.append("s", [NewEvent("w", {"w": w, "k": k}) for k in range(50)])
        return res.first_id, res.last_id

    ranges = await asyncio.gather(*(writer(w) for w in range(8)))
    page = await log.read("s", limit=1000)
    by_id = {e.id: e.data for e in page.events}
    for w, (first, last) in enumerate(ranges):
        assert last - first == 49
        assert [by_id[i] for i in range(first, last + 1)] == [{"w": w, "k": k} for k in range(50)]
    assert sorted(by_id) == list(range(1, 401))


async def test_batch_to_closed_stream_stores_nothing(log: EventLog) -> None:
    await log.append("s", ev(1))
    await log.close("s")
    with pytest.raises(StreamClosed):
        await log.append("s", [ev(2), ev(3)])
    info = await log.info("s")
    assert info.last_id == 2  # event 1 and the end entry
    assert [e.type for e in (await log.read("s")).events] == ["n", END_TYPE]


async def test_read_pages_with_limit_and_next_after(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(25)])
    seen: list[int] = []
    after = 0
    while True:
        page = await log.read("s", after=after, limit=10)
        if not page.events:
            break
        seen += [e.id for e in page.events]
        after = page.next_after
    assert seen == list(range(1, 26))
    assert page.next_after == 25 and page.closed is False


# -- byte-bounded pages ---------------------------------------------------------------


def expected_pages(sizes: list[int], max_bytes: int, limit: int) -> list[list[int]]:
    """Ids per page as the contract cuts them: a prefix within the budget, never empty."""
    pages: list[list[int]] = []
    i = 0
    while i < len(sizes):
        page = [i + 1]
        total = sizes[i]
        i += 1
        while i < len(sizes) and len(page) < limit and total + sizes[i] <= max_bytes:
            total += sizes[i]
            page.append(i + 1)
            i += 1
        pages.append(page)
    return pages


def read_all_pages(log: EventLog, stream: str, **kw: int) -> AsyncIterator[list[Event]]:
    async def pages() -> AsyncIterator[list[Event]]:
        after = 0
        while True:
            page = await log.read(stream, after=after, **kw)
            if not page.events:
                return
            assert page.next_after == page.events[-1].id
            after = page.next_after
            yield list(page.events)

    return pages()


async def test_read_pages_are_cut_at_the_byte_budget(log: EventLog) -> None:
    # Sizes are type + data JSON in UTF-8 bytes ("é" is 2, "😀" is 4): every backend
    # must cut the pages at exactly the same events.
    rng = random.Random(7)
    events = [
        NewEvent(f"t{i % 3}", "x" * rng.randrange(0, 300) + "é" * rng.randrange(0, 50) + "😀")
        for i in range(60)
    ]
    await log.append("s", events)
    sizes = [len(e.type.encode()) + len(e.data_json.encode()) for e in events]
    for max_bytes, limit in ((1000, 1000), (700, 3), (sizes[0], 1000), (10**6, 7)):
        got = [
            [e.id for e in page]
            async for page in read_all_pages(log, "s", max_bytes=max_bytes, limit=limit)
        ]
        assert got == expected_pages(sizes, max_bytes, limit), (max_bytes, limit)


async def test_read_returns_one_event_even_over_the_budget(log: EventLog) -> None:
    await log.append("s", [NewEvent("big", "x" * 5000), ev(2), NewEvent("big", "y" * 5000)])
    got = [[e.id for e in page] async for page in read_all_pages(log, "s", max_bytes=100)]
    assert got == [[1], [2], [3]]
    page = await log.read("s", after=0, max_bytes=1)
    assert [e.data for e in page.events] == ["x" * 5000] and page.next_after == 1


async def test_byte_bounded_read_sees_the_end_and_the_close(log: EventLog) -> None:
    await log.append("s", [NewEvent("n", "x" * 100) for _ in range(3)])
    await log.close("s", "done")
    pages = [page async for page in read_all_pages(log, "s", max_bytes=250)]
    assert [[e.id for e in p] for p in pages] == [[1, 2], [3, 4]]
    last = await log.read("s", after=2, max_bytes=250)
    assert last.closed and last.events[-1].is_end


async def test_byte_budget_must_be_positive(log: EventLog) -> None:
    await log.append("s", ev(1))
    with pytest.raises(ValidationError):
        await log.read("s", max_bytes=0)


async def test_follow_with_a_small_byte_budget_delivers_everything(log: EventLog) -> None:
    log.follow_max_bytes = 3000
    await log.append("s", [NewEvent("big", str(i) * 1000) for i in range(1, 10)])
    await log.close("s")
    items = await drain(log.follow("s"))
    assert ids(items) == list(range(1, 11))
    assert [e.data for e in items if isinstance(e, Event) and not e.is_end] == [
        str(i) * 1000 for i in range(1, 10)
    ]


async def test_read_unknown_stream_raises_not_found(log: EventLog) -> None:
    with pytest.raises(StreamNotFound):
        await log.read("nope")
    with pytest.raises(StreamNotFound):
        await log.info("nope")


@pytest.mark.parametrize("name", ["", "-x", ".x", "a b", "a/b", "x" * 201, "é", "a\nb"])
async def test_invalid_stream_names_are_rejected(log: EventLog, name: str) -> None:
    with pytest.raises(ValidationError):
        await log.append(name, ev(1))


async def test_longest_valid_name_is_accepted(log: EventLog) -> None:
    name = "a" + "b.:_-9" * 33 + "c"
    assert len(name) == 200
    await log.append(name, ev(1))
    assert (await log.info(name)).last_id == 1


async def test_reserved_and_invalid_types_are_rejected(log: EventLog) -> None:
    for bad in ("end", "reset", "", "x" * 101, "a\nb"):
        with pytest.raises(ValidationError):
            await log.append("s", NewEvent(bad, 1))
    with pytest.raises(ValidationError):
        await log.append("s", [])


# -- encoded appends (the bulk path of command output) ---------------------------

# Data whose JSON has every kind of escape and non-ASCII text a line can carry.
TRICKY_DATA: list[object] = [
    {"line": "plain"},
    {"line": 'quote " backslash \\ slash / \\"', "partial": True},
    {"line": "\x00 nul \x07 bell \t tab \x1b[31m ansi \x7f del", "cr": True},
    {"line": "héllo € 😀 \u2028 \u2029 \ufffd", "level": "error"},
    {"line": ""},
    {"line": "x" * 5000},
    {"n": [1, 2.5, None, True, {"k": "v"}]},
    "a bare string",
    None,
]


def encoded_runs(items: list[tuple[str, object]]) -> list[EncodedEvents]:
    """``items`` as EncodedEvents, consecutive items of one type in one run."""
    runs: list[tuple[str, list[str]]] = []
    for type_, data in items:
        if not runs or runs[-1][0] != type_:
            runs.append((type_, []))
        runs[-1][1].append(encode_data(data))
    return [EncodedEvents(type_, data_json) for type_, data_json in runs]


async def test_encoded_append_stores_what_the_equivalent_events_would(log: EventLog) -> None:
    items = [("stdout", d) for d in TRICKY_DATA] + [("stderr", d) for d in TRICKY_DATA[:4]]
    items += [("stdout", {"line": f"l{i}"}) for i in range(1500)]
    await log.append("plain", ev(0))
    await log.append("fast", ev(0))
    expected = await log.append("plain", [NewEvent(t, d) for t, d in items])
    result = await log.append_encoded("fast", encoded_runs(items))
    assert (result.first_id, result.last_id, result.duplicate) == (2, len(items) + 1, False)
    assert (result.first_id, result.last_id) == (expected.first_id, expected.last_id)
    assert result.epoch == (await log.info("fast")).epoch
    plain = (await log.read("plain", limit=10_000)).events
    fast = (await log.read("fast", limit=10_000)).events
    assert [(e.id, e.type, e.data) for e in fast] == [(e.id, e.type, e.data) for e in plain]
    assert [(e.type, e.data) for e in fast[1:]] == items


async def test_encoded_appends_interleave_with_others_contiguously(log: EventLog) -> None:
    async def encoded(w: int) -> tuple[int, int]:
        data = [encode_data({"w": w, "k": k}) for k in range(50)]
        res = await log.append_encoded(
            "s", [EncodedEvents("a", data[:20]), EncodedEvents("b", data[20:])]
        )
        return res.first_id, res.last_id

    async def plain(w: int) -> tuple[int, int]:
        res = await log.append("s", [NewEvent("c", {"w": w, "k": k}) for k in range(50)])
        return res.first_id, res.last_id

    ranges = await asyncio.gather(*(encoded(w) if w % 2 else plain(w) for w in range(8)))
    by_id = {e.id: (e.type, e.data) for e in (await log.read("s", limit=1000)).events}
    assert sorted(by_id) == list(range(1, 401))
    for w, (first, last) in enumerate(ranges):
        types = ["a"] * 20 + ["b"] * 30 if w % 2 else ["c"] * 50
        expected = [(t, {"w": w, "k": k}) for k, t in enumerate(types)]
        assert [by_id[i] for i in range(first, last + 1)] == expected


async def test_encoded_append_wakes_followers(log: EventLog) -> None:
    await log.append("s", ev(1))
    it = log.follow("s")
    assert ids(await take(it, 1)) == [1]
    await log.append_encoded("s", [EncodedEvents("stdout", ['{"line":"a"}', '{"line":"b"}'])])
    got = await take(it, 2)
    assert [(e.id, e.data) for e in got if isinstance(e, Event)] == [
        (2, {"line": "a"}),
        (3, {"line": "b"}),
    ]
    await it.aclose()  # type: ignore[attr-defined]


async def test_encoded_append_to_closed_stream_stores_nothing(log: EventLog) -> None:
    await log.append("s", ev(1))
    await log.close("s")
    with pytest.raises(StreamClosed):
        await log.append_encoded("s", [EncodedEvents("stdout", ['{"line":"x"}'])])
    assert (await log.info("s")).last_id == 2


async def test_encoded_append_rejects_what_append_rejects(log: EventLog) -> None:
    one = EncodedEvents("stdout", ['{"line":"x"}'])
    with pytest.raises(ValidationError):
        await log.append_encoded("a b", [one])
    with pytest.raises(ValidationError):
        await log.append_encoded("s", [])
    with pytest.raises(ValidationError):
        await log.append_encoded("s", [EncodedEvents("stdout", [])])
    with pytest.raises(ValidationError):
        await log.append_encoded("s", [NewEvent("stdout", 1)])  # type: ignore[list-item]
    for bad in ("end", "reset", "", "x" * 101, "a\nb"):
        with pytest.raises(ValidationError):
            EncodedEvents(bad, ['{"line":"x"}'])
    with pytest.raises(StreamNotFound):
        await log.info("s")
    # Empty runs next to others are skipped.
    res = await log.append_encoded("s", [EncodedEvents("x", []), one])
    assert (res.first_id, res.last_id) == (1, 1)


# -- idempotent producers --------------------------------------------------------


async def test_producer_retry_of_same_seq_returns_original_ids(log: EventLog) -> None:
    p = Producer("prod-a", 7)
    first = await log.append("s", [ev(1), ev(2)], producer=p)
    again = await log.append("s", [ev(1), ev(2)], producer=p)
    assert (again.first_id, again.last_id, again.duplicate) == (first.first_id, first.last_id, True)
    assert (await log.info("s")).last_id == 2


async def test_producer_next_seq_is_stored_and_older_seq_is_refused(log: EventLog) -> None:
    await log.append("s", ev(1), producer=Producer("p", 1))
    nxt = await log.append("s", ev(2), producer=Producer("p", 5))
    assert (nxt.first_id, nxt.duplicate) == (2, False)
    with pytest.raises(StaleProducerSeq):
        await log.append("s", ev(3), producer=Producer("p", 4))
    assert (await log.info("s")).last_id == 2


async def test_producers_are_independent_per_id_and_stream(log: EventLog) -> None:
    await log.append("s", ev(1), producer=Producer("a", 1))
    b = await log.append("s", ev(2), producer=Producer("b", 1))
    other = await log.append("t", ev(3), producer=Producer("a", 1))
    assert (b.duplicate, b.first_id) == (False, 2)
    assert (other.duplicate, other.first_id) == (False, 1)


async def test_concurrent_retries_of_one_seq_store_once(log: EventLog) -> None:
    p = Producer("racer", 1)
    results = await asyncio.gather(
        *(log.append("s", [ev(1), ev(2)], producer=p) for _ in range(10))
    )
    assert {(r.first_id, r.last_id) for r in results} == {(1, 2)}
    assert sum(not r.duplicate for r in results) == 1
    assert (await log.info("s")).last_id == 2


# -- follow ------------------------------------------------------------------------


async def test_follow_serves_history_then_live(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(3)])
    it = log.follow("s")
    assert ids(await take(it, 3)) == [1, 2, 3]
    await log.append("s", ev(3))
    assert ids(await take(it, 1)) == [4]
    await it.aclose()  # type: ignore[attr-defined]


async def test_follow_unknown_stream_raises_not_found(log: EventLog) -> None:
    with pytest.raises(StreamNotFound):
        await take(log.follow("missing"), 1)


async def test_follow_ends_with_end_event_carrying_status(log: EventLog) -> None:
    await log.append("s", ev(1))
    it = log.follow("s")
    assert ids(await take(it, 1)) == [1]
    closer = asyncio.create_task(log.close("s", "succeeded", "all good"))
    rest = await drain(it)
    await closer
    assert len(rest) == 1
    end = rest[0]
    assert isinstance(end, Event) and end.is_end and end.id == 2
    assert end.data == {"status": "succeeded", "reason": "all good"}


async def test_reader_that_missed_the_close_still_learns_it(log: EventLog) -> None:
    await log.append("s", [ev(1), ev(2)])
    info = await log.close("s", "failed")
    assert (info.status, info.close_status, info.last_id) == ("closed", "failed", 3)
    assert info.closed_at is not None
    items = await drain(log.follow("s", 1))
    assert ids(items) == [2, 3]
    assert isinstance(items[-1], Event) and items[-1].data["status"] == "failed"
    page = await log.read("s", after=3)
    assert page.closed and page.events == ()


async def test_events_read_back_carry_their_stored_data_text(log: EventLog) -> None:
    values: list[object] = [{"k": [1, 2.5, None]}, "é ☃", 3, None, [True, {"x": "\n"}]]
    await log.append("s", [NewEvent("v", v) for v in values])
    await log.close("s", "succeeded")
    page = await log.read("s")
    for event in page.events:
        assert event.data_json == encode_data(event.data)
    followed = await drain(log.follow("s", 0))
    assert [e.data_json for e in followed if isinstance(e, Event)] == [
        e.data_json for e in page.events
    ]


async def test_info_many_answers_for_every_stream_asked(log: EventLog) -> None:
    await log.append("open", [ev(1), ev(2)])
    await log.append("done", ev(1))
    await log.close("done", "succeeded")
    found = await log.info_many(["open", "missing", "done"])
    assert set(found) == {"open", "missing", "done"}
    assert found["missing"] is None
    assert found["open"] == await log.info("open")
    assert found["done"] == await log.info("done")
    assert found["done"] is not None and found["done"].closed
    assert await log.info_many([]) == {}
    many = [f"m{i}" for i in range(1200)]  # more than one request's worth
    assert all(v is None for v in (await log.info_many(many)).values())
    with pytest.raises(ValidationError):
        await log.info_many(["open", "bad name"])


async def test_close_is_idempotent(log: EventLog) -> None:
    await log.append("s", ev(1))
    first = await log.close("s", "succeeded")
    second = await log.close("s", "failed")
    assert second.last_id == first.last_id == 2
    assert second.close_status == "succeeded"


async def test_close_of_unknown_stream_creates_it_closed(log: EventLog) -> None:
    info = await log.close("fresh", "cancelled")
    assert (info.status, info.last_id) == ("closed", 1)
    items = await drain(log.follow("fresh"))
    assert len(items) == 1 and isinstance(items[0], Event) and items[0].is_end


async def test_follow_now_skips_history_and_fixes_tail_on_entry(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(5)])
    real_read = log._read
    caught_up = asyncio.Event()

    async def spy(
        stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> tuple[StreamInfo, list[Event]]:
        result = await real_read(stream, after, limit, max_bytes)
        caught_up.set()
        return result

    log._read = spy  # type: ignore[method-assign]
    first = asyncio.create_task(take(log.follow("s", "now"), 1))
    await asyncio.wait_for(caught_up.wait(), WAIT)  # the follower has fixed its tail and read
    await log.append("s", ev(5))
    assert ids(await first) == [6]


async def test_follow_now_on_closed_stream_yields_the_end(log: EventLog) -> None:
    await log.append("s", ev(1))
    await log.close("s", "succeeded")
    items = await drain(log.follow("s", "now"))
    assert len(items) == 1 and isinstance(items[0], Event) and items[0].is_end


async def test_event_appended_during_handover_is_delivered(log: EventLog) -> None:
    """The XREAD-$ race: an append that lands after the history read but before the
    follower starts waiting must be delivered, not skipped."""
    await log.append("s", [ev(i) for i in range(3)])
    real_read = log._read
    injected = asyncio.Event()

    async def read_then_append(
        stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> tuple[StreamInfo, list[Event]]:
        result = await real_read(stream, after, limit, max_bytes)
        if not result[1] and not injected.is_set():
            # The follower is caught up and about to wait: append exactly now.
            injected.set()
            await log.append("s", NewEvent("n", {"i": "handover"}))
        return result

    log._read = read_then_append  # type: ignore[method-assign]
    it = log.follow("s")
    items = await take(it, 4)
    assert ids(items) == [1, 2, 3, 4]
    assert injected.is_set()
    assert isinstance(items[3], Event) and items[3].data == {"i": "handover"}
    await it.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_concurrent_appenders_and_followers_see_everything_once_in_order(
    log: EventLog, seed: int
) -> None:
    rnd = random.Random(seed)
    plans = [[rnd.randint(1, 20) for _ in range(rnd.randint(3, 12))] for _ in range(4)]
    total = sum(map(sum, plans))
    await log.append("s", NewEvent("start", None))

    async def follower(start: int) -> list[Event | Reset]:
        return await drain(log.follow("s", start))

    async def appender(w: int, plan: list[int]) -> None:
        for k, size in enumerate(plan):
            await log.append("s", [NewEvent("w", {"w": w, "k": k, "j": j}) for j in range(size)])
            if rnd.random() < 0.5:
                await asyncio.sleep(0)

    followers = [asyncio.create_task(follower(rnd.randint(0, 1))) for _ in range(5)]
    await asyncio.gather(*(appender(w, p) for w, p in enumerate(plans)))
    await log.close("s", "done")
    results = await asyncio.gather(*followers)
    expected_last = total + 2
    for items in results:
        got = ids(items)
        assert all(isinstance(i, Event) for i in items)
        assert got == list(range(got[0], expected_last + 1))
        assert got[0] in (1, 2)
    # Each writer's events appear in the order it wrote them.
    events = [e for e in results[0] if isinstance(e, Event) and e.type == "w"]
    for w in range(len(plans)):
        mine = [(e.data["k"], e.data["j"]) for e in events if e.data["w"] == w]
        assert mine == sorted(mine)
        assert len(mine) == sum(plans[w])


async def test_many_followers_of_one_stream_all_get_every_event(log: EventLog) -> None:
    await log.append("s", ev(0))
    its = [log.follow("s") for _ in range(50)]
    tasks = [asyncio.create_task(drain(it)) for it in its]
    for i in range(1, 30):
        await log.append("s", ev(i))
    await log.close("s")
    for items in await asyncio.gather(*tasks):
        assert ids(items) == list(range(1, 32))


# -- delete, epochs, resets -------------------------------------------------------


async def test_delete_ends_followers_with_stream_deleted(log: EventLog) -> None:
    await log.append("s", ev(1))
    it = log.follow("s")
    assert ids(await take(it, 1)) == [1]
    pending = asyncio.create_task(take(it, 1))
    await log.delete("s")  # whether the follower is waiting or not yet reading, it must end
    with pytest.raises(StreamDeleted):
        await pending
    with pytest.raises(StreamNotFound):
        await log.info("s")


async def test_delete_unknown_stream_raises_not_found(log: EventLog) -> None:
    with pytest.raises(StreamNotFound):
        await log.delete("nothing-here")


async def test_delete_many_deletes_each_skips_absent_ones_and_ends_every_follower(
    log: EventLog,
) -> None:
    names = [f"many-{i}" for i in range(5)]
    for i, name in enumerate(names):
        await log.append(name, [ev(j) for j in range(i * 3 + 1)])
    await log.close(names[1])
    await log.append("kept", ev(1))
    # Each follower has read its stream's last event and waits for more.
    followers = [log.follow(names[0]), log.follow(names[3], 9)]
    assert ids(await take(followers[0], 1)) == [1]
    assert ids(await take(followers[1], 1)) == [10]
    parked = watching(log, {names[0], names[3]})
    pending = [asyncio.create_task(take(it, 1)) for it in followers]
    await asyncio.wait_for(parked.wait(), WAIT)  # both asked to be woken
    assert await log.delete_many([*names, "never-made", names[2]]) == {}
    for task in pending:  # the first stream's follower and one further on
        with pytest.raises(StreamDeleted):
            await task
    assert [i.name for i in await log.list_streams(prefix="many-")] == []
    assert (await log.info("kept")).last_id == 1
    assert await log.delete_many([]) == {}


async def test_recreated_stream_gets_new_epoch_and_old_position_resets(log: EventLog) -> None:
    old = await log.append("s", [ev(i) for i in range(5)])
    await log.delete("s")
    new = await log.append("s", [ev(i) for i in range(2)])
    assert new.epoch != old.epoch and new.first_id == 1
    with pytest.raises(HistoryLost) as exc:
        await log.read("s", after=5, epoch=old.epoch)
    assert exc.value.epoch == new.epoch and exc.value.reason == "epoch_changed"
    items = await take(log.follow("s", 5, epoch=old.epoch), 3)
    assert isinstance(items[0], Reset)
    assert (items[0].reason, items[0].epoch, items[0].after) == ("epoch_changed", new.epoch, 0)
    assert ids(items) == [1, 2]


async def test_position_beyond_the_end_is_reported_not_skipped(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(3)])
    with pytest.raises(HistoryLost) as exc:
        await log.read("s", after=10)
    assert exc.value.reason == "ahead"
    items = await take(log.follow("s", 10), 4)
    assert isinstance(items[0], Reset) and items[0].reason == "ahead"
    assert ids(items) == [1, 2, 3]


async def test_follower_sees_epoch_change_when_stream_recreated_under_it(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(3)])
    it = log.follow("s")
    assert ids(await take(it, 3)) == [1, 2, 3]
    pending = asyncio.create_task(take(it, 2))
    await log.delete("s")
    await log.append("s", ev(9))
    try:
        items = await pending
    except StreamDeleted:
        return  # ending on the delete is a correct outcome too
    assert isinstance(items[0], Reset) and items[0].reason == "epoch_changed"


# -- trim / retention --------------------------------------------------------------


async def test_trim_by_count_advances_first_id_and_keeps_ids(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(10)])
    removed = await log.trim("s", max_len=4)
    assert removed == 6
    info = await log.info("s")
    assert (info.first_id, info.last_id) == (7, 10)
    assert [e.id for e in (await log.read("s")).events] == [7, 8, 9, 10]
    assert [e.id for e in (await log.read("s", after=6)).events] == [7, 8, 9, 10]


async def test_read_from_trimmed_position_raises_history_lost(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(10)])
    await log.trim("s", max_len=3)
    with pytest.raises(HistoryLost) as exc:
        await log.read("s", after=2)
    assert (exc.value.reason, exc.value.first_id) == ("trimmed", 8)


async def test_follow_from_trimmed_position_resets_then_continues(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(10)])
    await log.trim("s", max_len=3)
    items = await take(log.follow("s", 2), 4)
    assert isinstance(items[0], Reset)
    assert (items[0].reason, items[0].after, items[0].requested) == ("trimmed", 7, 2)
    assert ids(items) == [8, 9, 10]


async def test_trim_by_age_removes_only_old_events(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(5)])
    boundary = time.time()
    await asyncio.sleep(0.3)  # make the two batches' timestamps distinguishable
    await log.append("s", [ev(i) for i in range(5, 8)])
    max_age = time.time() - boundary  # everything before the boundary is older than this
    assert await log.trim("s", max_age=max_age) == 5
    assert [e.id for e in (await log.read("s")).events] == [6, 7, 8]
    assert await log.trim("s", max_age=3600) == 0


async def test_trim_never_removes_the_end_entry(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(5)])
    await log.close("s", "succeeded")
    await log.trim("s", max_len=0)
    info = await log.info("s")
    assert (info.first_id, info.last_id, info.status) == (6, 6, "closed")
    items = await drain(log.follow("s"))
    assert len(items) == 1 and isinstance(items[0], Event) and items[0].is_end


async def test_empty_retained_history_reads_empty(log: EventLog) -> None:
    await log.append("s", [ev(i) for i in range(3)])
    await log.trim("s", max_len=0)
    info = await log.info("s")
    assert (info.first_id, info.last_id) == (4, 3)
    page = await log.read("s", after=3)
    assert page.events == () and page.next_after == 3
    await log.append("s", ev(9))
    assert [e.id for e in (await log.read("s", after=3)).events] == [4]


# -- list ---------------------------------------------------------------------------


async def test_list_streams_is_ordered_filtered_and_paginated(log: EventLog) -> None:
    for name in ["b-2", "a-1", "b-1", "c-1", "b-3"]:
        await log.append(name, ev(1))
    assert [i.name for i in await log.list_streams()] == ["a-1", "b-1", "b-2", "b-3", "c-1"]
    assert [i.name for i in await log.list_streams(prefix="b-")] == ["b-1", "b-2", "b-3"]
    page1 = await log.list_streams(prefix="b-", limit=2)
    page2 = await log.list_streams(prefix="b-", start_after=page1[-1].name, limit=2)
    assert [i.name for i in page1 + page2] == ["b-1", "b-2", "b-3"]
    await log.delete("b-2")
    assert [i.name for i in await log.list_streams(prefix="b")] == ["b-1", "b-3"]


async def test_list_streams_stops_before_end_before(log: EventLog) -> None:
    for name in ["b-2", "a-1", "b-1", "c-1", "b-3", "b-30"]:
        await log.append(name, ev(1))

    async def names(**kwargs: Any) -> list[str]:
        return [i.name for i in await log.list_streams(**kwargs)]

    assert await names(end_before="b-3") == ["a-1", "b-1", "b-2"]
    assert await names(start_after="a-1", end_before="b-2") == ["b-1"]
    assert await names(prefix="b-", end_before="b-30") == ["b-1", "b-2", "b-3"]
    assert await names(prefix="b-", end_before="c") == ["b-1", "b-2", "b-3", "b-30"]
    assert await names(prefix="b-", end_before="zz") == ["b-1", "b-2", "b-3", "b-30"]
    assert await names(start_after="b-1", end_before="b-1") == []
    assert await names(end_before="b-3", limit=2) == ["a-1", "b-1"]


# -- durability --------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from runstream.backends import open_backend
    from runstream.core.model import EncodedEvents, NewEvent

    async def main() -> None:
        step = int(sys.argv[3])
        async with open_backend(sys.argv[1]) as log:
            for i in range(0, 100_000, step):
                if sys.argv[2] == "encoded":  # how command output is stored
                    datas = ['{"i":%d}' % j for j in range(i, i + step)]
                    res = await log.append_encoded("durable", [EncodedEvents("n", datas)])
                else:
                    res = await log.append("durable", [NewEvent("n", {"i": i})])
                print(res.last_id, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mode", "step"), [("append", 1), ("encoded", 7)])
def test_acknowledged_appends_survive_kill_9(
    backend_url: str, tmp_path: Path, mode: str, step: int
) -> None:
    if backend_url.startswith("memory"):
        pytest.skip("memory:// keeps nothing after the process; durability does not apply")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), backend_url, mode, str(step)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    acked: list[int] = []
    for line in proc.stdout:
        acked.append(int(line))
        if len(acked) >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()  # acknowledgements printed before the kill landed
    proc.stdout.close()
    acked += [int(x) for x in rest.split()]
    proc.wait()
    assert acked == list(range(step, step * len(acked) + 1, step))

    async def verify() -> None:
        async with open_backend(backend_url) as log:
            info = await log.info("durable")
            assert info.last_id >= acked[-1]
            page = await log.read("durable", limit=10_000)
            assert [e.id for e in page.events] == list(range(1, info.last_id + 1))
            assert [e.data["i"] for e in page.events] == list(range(info.last_id))

    asyncio.run(verify())


async def test_state_survives_reopen(backend_url: str) -> None:
    if backend_url.startswith("memory"):
        pytest.skip("memory:// keeps nothing after close")
    async with open_backend(backend_url) as log:
        res = await log.append("kept", [ev(1), ev(2)])
        await log.close("kept", "succeeded")
    async with open_backend(backend_url) as log:
        info = await log.info("kept")
        assert (info.epoch, info.last_id, info.close_status) == (res.epoch, 3, "succeeded")
        assert json.loads(json.dumps([e.data for e in (await log.read("kept")).events]))[0] == {
            "i": 1
        }
