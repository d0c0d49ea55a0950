"""The Durable Streams store contract on every engine (``Engine.open_durable``).

The protocol as a whole is the official suite's (tests/durable); these check what only the
store can get wrong: atomicity under concurrency, wake-ups, and what survives a reopen.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runstream.backends import EventLog, engine_for
from runstream.backends.durable import DurableStore
from runstream.core.durable import (
    AppendRequest,
    CreateRequest,
    DsConflict,
    DsGone,
    DsNotFound,
    DsStaleEpoch,
    Outcome,
    ProducerClaim,
)

TEXT = "text/plain"


@pytest.fixture
async def store(backend_url: str, log: EventLog) -> AsyncIterator[DurableStore]:
    opener = engine_for(backend_url).open_durable
    assert opener is not None
    ds = opener(backend_url, log)
    async with ds:
        yield ds


async def read_all(store: DurableStore, name: str) -> bytes:
    out, position = b"", 0
    while True:
        read = await store.read(name, position, 0.0)
        out += b"".join(read.entries)
        position = read.end
        if read.up_to_date:
            return out


async def test_concurrent_producer_retries_store_each_batch_once(store: DurableStore) -> None:
    await store.create("p", CreateRequest(TEXT), 0.0)

    async def send(seq: int) -> Outcome:
        req = AppendRequest(TEXT, f"<{seq}>".encode(), producer=ProducerClaim("w", 0, seq))
        return (await store.append("p", req, 0.0)).outcome

    # Every batch sent four times at once (a client retrying over broken connections).
    for seq in range(20):
        outcomes = await asyncio.gather(*(send(seq) for _ in range(4)))
        assert sorted(o.value for o in outcomes) == [
            "appended",
            "duplicate",
            "duplicate",
            "duplicate",
        ]
    assert await read_all(store, "p") == b"".join(f"<{i}>".encode() for i in range(20))
    await store.append("p", AppendRequest(TEXT, b"n", producer=ProducerClaim("w", 1, 0)), 0.0)
    with pytest.raises(DsStaleEpoch):
        await store.append("p", AppendRequest(TEXT, b"z", producer=ProducerClaim("w", 0, 20)), 0.0)


async def test_racing_stream_seqs_admit_exactly_one(store: DurableStore) -> None:
    await store.create("s", CreateRequest(TEXT), 0.0)

    async def send(i: int) -> bool:
        try:
            await store.append("s", AppendRequest(TEXT, b"%d" % i, stream_seq="0001"), 0.0)
        except DsConflict:
            return False
        return True

    assert sum(await asyncio.gather(*(send(i) for i in range(8)))) == 1
    assert len(await read_all(store, "s")) == 1


async def test_a_write_wakes_a_registered_reader(store: DurableStore) -> None:
    await store.create("w", CreateRequest(TEXT), 0.0)
    woken = store.notifier.watch("w")
    try:
        await store.append("w", AppendRequest(TEXT, b"x"), 0.0)
        await asyncio.wait_for(woken, 5)
    finally:
        store.notifier.unwatch("w", woken)


async def test_close_with_final_append_is_atomic_and_final(store: DurableStore) -> None:
    await store.create("c", CreateRequest(TEXT, body=b"a"), 0.0)
    closing = AppendRequest(TEXT, b"b", close=True, producer=ProducerClaim("w", 0, 0))
    assert (await store.append("c", closing, 0.0)).outcome is Outcome.APPENDED
    assert (await store.append("c", closing, 0.0)).outcome is Outcome.DUPLICATE
    with pytest.raises(DsConflict):
        await store.append("c", AppendRequest(TEXT, b"c"), 0.0)
    read = await store.read("c", 0, 0.0)
    assert read.entries == [b"a", b"b"] and read.state.closed


async def test_a_deleted_source_stays_readable_through_its_fork(store: DurableStore) -> None:
    await store.create("src", CreateRequest(TEXT, body=b"old"), 0.0)
    await store.create("fork", CreateRequest(None, fork_source="src"), 0.0)
    await store.append("fork", AppendRequest(TEXT, b"new"), 0.0)
    await store.delete("src", 0.0)
    with pytest.raises(DsGone):
        await store.head("src", 0.0)
    assert await read_all(store, "fork") == b"oldnew"
    await store.delete("fork", 0.0)
    with pytest.raises(DsNotFound):  # gone with its last fork
        await store.head("src", 0.0)
    assert (await store.create("src", CreateRequest(TEXT), 0.0))[1]


async def test_ttl_expires_and_reads_renew_it(store: DurableStore) -> None:
    await store.create("t", CreateRequest(TEXT, ttl=10), 100.0)
    await store.read("t", 0, 105.0)  # renewed: now expires at 115
    assert (await store.head("t", 112.0)).name == "t"
    with pytest.raises(DsNotFound):
        await store.head("t", 116.0)


async def test_streams_survive_reopening_on_durable_engines(
    backend_url: str, store: DurableStore
) -> None:
    if backend_url.startswith("memory"):
        pytest.skip("memory:// keeps nothing after the process")
    await store.create("d", CreateRequest("application/json", body=b'[{"a":1},{"b":2}]'), 0.0)
    await store.append(
        "d", AppendRequest("application/json", b"3", producer=ProducerClaim("w", 2, 0)), 0.0
    )
    await store.aclose()
    log = engine_for(backend_url).open_log(backend_url)
    async with log:
        opener = engine_for(backend_url).open_durable
        assert opener is not None
        async with opener(backend_url, log) as again:
            read = await again.read("d", 0, 0.0)
            assert read.entries == [b'{"a":1},{"b":2}', b"3"]
            assert read.state.producers["w"].epoch == 2


async def test_sqlite_readers_wake_on_another_process_s_write(tmp_path: Path) -> None:
    """Two logs on one file stand for two processes: B's commits are foreign to A."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = engine_for(url)
    opener = engine.open_durable
    assert opener is not None
    async with (
        engine.open_log(url) as log_a,
        engine.open_log(url) as log_b,
        opener(url, log_a) as a,
        opener(url, log_b) as b,
    ):
        await b.create("x", CreateRequest(TEXT), 0.0)
        for i in range(3):  # every write, not only the first one A's poller sees
            woken = a.notifier.watch("x")
            try:
                assert (await a.read("x", i, 0.0)).entries == []  # a reader would wait now
                await b.append("x", AppendRequest(TEXT, b"%d" % i), 0.0)
                await asyncio.wait_for(woken, 5)  # the commit probe, not a keepalive
            finally:
                a.notifier.unwatch("x", woken)
        assert (await a.read("x", 0, 0.0)).entries == [b"0", b"1", b"2"]
