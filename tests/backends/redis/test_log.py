"""Redis-specific behaviour: outages and restarts, connection sharing, epoch loss, keys, TTL.

The shared contract suite (test_contract.py) covers the EventLog semantics; these
tests cover what only Redis can do to us. Each starts its own redis-server (or
uses the session's with a unique key prefix) and never touches 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from runstream.backends import open_backend
from runstream.backends.redis.log import RedisEventLog, parse_url
from runstream.core.model import UNREADABLE_TYPE, Event, NewEvent, Producer, Reset
from runstream.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    HistoryLost,
    StreamNotFound,
)

pytestmark = pytest.mark.redis


class RedisServer(Protocol):
    """What the conftest ``redis_server`` / ``private_redis`` fixtures give."""

    @property
    def url(self) -> str: ...
    def start(self) -> None: ...
    def stop(self, *, kill: bool = False) -> None: ...


def ev(i: int) -> NewEvent:
    return NewEvent("n", {"i": i})


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def shared(redis_server: RedisServer) -> AsyncIterator[RedisEventLog]:
    """A backend on the session server, isolated by its own key prefix."""
    async with RedisEventLog.from_url(f"{redis_server.url}?prefix={unique_prefix()}") as backend:
        yield backend


async def collect(backend: RedisEventLog, stream: str, **kwargs: object) -> list[Event | Reset]:
    return [item async for item in backend.follow(stream, **kwargs)]  # type: ignore[arg-type]


# -- URL and keys --------------------------------------------------------------


def test_url_options_are_parsed_and_the_rest_goes_to_redis() -> None:
    url, opts = parse_url(
        "redis://h:1/2?prefix=app&closed_ttl=60&max_len=5&health_check_interval=3"
    )
    assert (opts.prefix, opts.closed_ttl, opts.max_len) == ("app", 60.0, 5)
    assert url == "redis://h:1/2?health_check_interval=3"
    backend = open_backend("redis://127.0.0.1:1/0?prefix=app")
    assert isinstance(backend, RedisEventLog)
    assert backend.options.prefix == "app"


@pytest.mark.parametrize(
    "url", ["redis://h/0?prefix={x}", "redis://h/0?closed_ttl=soon", "redis://h/0?max_len=-1"]
)
def test_invalid_url_options_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisEventLog.from_url(url)


async def test_keys_of_one_stream_share_a_cluster_slot(
    shared: RedisEventLog, redis_server: RedisServer
) -> None:
    await shared.append("job:1", ev(1), producer=Producer("p", 1))
    await shared.close("job:1")
    prefix = shared.options.prefix
    async with raw_client(redis_server.url) as client:
        keys = {k async for k in client.scan_iter(match=f"{prefix}:*")}
    log_key, meta_key, prod_key = shared.keys("job:1")
    assert keys == {log_key, meta_key, prod_key, f"{prefix}:streams"}
    assert len({key_slot(k.encode()) for k in (log_key, meta_key, prod_key)}) == 1
    assert log_key == f"{prefix}:{{job:1}}:log"


async def test_entry_ids_are_the_offsets(shared: RedisEventLog, redis_server: RedisServer) -> None:
    await shared.append("s", [ev(1), ev(2), ev(3)])
    async with raw_client(redis_server.url) as client:
        entries: Any = await client.xrange(shared.keys("s")[0], min="2-0", max="2-0")
    [(entry_id, fields)] = entries
    assert (entry_id, fields["t"], fields["d"]) == ("2-0", "n", '{"i":2}')
    assert set(fields) == {"t", "d", "ts"}


async def test_awkward_text_round_trips_through_one_batch(shared: RedisEventLog) -> None:
    # A batch travels as one NUL-separated argument: NULs in data, non-ASCII, escaped
    # control characters and empty strings must come back exactly, in order.
    items = [
        NewEvent("ünïcode type ✓", "a\x00b"),
        NewEvent("t", ""),
        NewEvent("t", "\x01\x1f\u2028 controls"),
        NewEvent("t", {"k\x00": ["\x00", "😀" * 1000]}),
        NewEvent("t", None),
    ]
    res = await shared.append("s", items)
    page = await shared.read("s")
    assert (res.first_id, res.last_id) == (1, 5)
    assert [(e.type, e.data) for e in page.events] == [(i.type, i.data) for i in items]
    # Producer ids travel in the same packed argument: any character, NUL included.
    odd = Producer("p\x00:1:2 ü", 10**30)
    first = await shared.append("s", ev(6), producer=odd)
    again = await shared.append("s", ev(6), producer=odd)
    assert (again.duplicate, again.first_id) == (True, first.first_id)


@pytest.mark.parametrize(
    "fields",
    [
        {"t": b"n", "d": b"{not json"},
        {"t": b"n", "d": b'"\xed\xa0\x80"'},  # a surrogate spelt in UTF-8: not UTF-8
        {"t": b"n", "d": b'"\xff"'},
        {"t": b"two\nlines", "d": b"1"},
        {"t": b"\xc3", "d": b"1"},
        {"t": b"n", "d": b"[" * 5000 + b"]" * 5000},
    ],
)
async def test_unservable_entry_is_read_as_an_unreadable_item(
    shared: RedisEventLog, redis_server: RedisServer, fields: dict[str, bytes]
) -> None:
    # An entry another program wrote: readers pass over it knowingly (same id), and
    # the events after it still reach them.
    await shared.append("s", [ev(1), ev(2)])
    log_key, meta_key, _ = shared.keys("s")
    async with raw_client(redis_server.url) as client:
        await client.xadd(log_key, {**fields, "ts": b"1.5"}, id="3-0")
        await client.hset(meta_key, "last_id", 3)
    await shared.append("s", ev(4))
    page = await shared.read("s")
    assert [(e.id, e.type) for e in page.events] == [
        (1, "n"),
        (2, "n"),
        (3, UNREADABLE_TYPE),
        (4, "n"),
    ]
    assert page.events[3].data == {"i": 4}
    assert shared.unreadable_events == 1


async def test_prefixes_isolate_tenants_on_one_server(
    shared: RedisEventLog, redis_server: RedisServer
) -> None:
    await shared.append("same-name", ev(1))
    async with RedisEventLog.from_url(f"{redis_server.url}?prefix={unique_prefix()}") as other:
        with pytest.raises(StreamNotFound):
            await other.info("same-name")
        assert await other.list_streams() == []


# -- retention -----------------------------------------------------------------


async def test_max_len_option_trims_on_append(redis_server: RedisServer) -> None:
    url = f"{redis_server.url}?prefix={unique_prefix()}&max_len=3"
    async with RedisEventLog.from_url(url) as backend:
        await backend.append("s", [ev(i) for i in range(10)])
        info = await backend.info("s")
        assert (info.first_id, info.last_id) == (8, 10)
        page = await backend.read("s")
        assert [e.id for e in page.events] == [8, 9, 10]


async def test_closed_stream_gets_ttl_on_every_key_and_open_one_none(
    redis_server: RedisServer,
) -> None:
    url = f"{redis_server.url}?prefix={unique_prefix()}&closed_ttl=3600"
    async with RedisEventLog.from_url(url) as backend, raw_client(redis_server.url) as client:
        await backend.append("open", ev(1), producer=Producer("p", 1))
        await backend.append("done", ev(1), producer=Producer("p", 1))
        await backend.close("done", "succeeded")
        for key in backend.keys("open"):
            assert await client.pttl(key) == -1
        for key in backend.keys("done"):
            assert 0 < await client.pttl(key) <= 3_600_000


async def test_expired_closed_stream_disappears_and_comes_back_with_new_epoch(
    redis_server: RedisServer,
) -> None:
    url = f"{redis_server.url}?prefix={unique_prefix()}&closed_ttl=0.05"
    async with RedisEventLog.from_url(url) as backend, raw_client(redis_server.url) as client:
        first = await backend.append("short", ev(1))
        await backend.close("short")
        deadline = time.monotonic() + 10
        # Expiry has no notification to await: poll the server until the keys are gone.
        while await client.exists(*backend.keys("short")):
            assert time.monotonic() < deadline, "closed stream never expired"
            await asyncio.sleep(0.02)
        with pytest.raises(StreamNotFound):
            await backend.info("short")
        assert await backend.list_streams() == []
        again = await backend.append("short", ev(2))
        assert again.first_id == 1
        assert again.epoch != first.epoch
        assert [i.name for i in await backend.list_streams()] == ["short"]


# -- epoch loss ----------------------------------------------------------------


async def test_lost_data_starts_a_new_epoch_and_live_follower_gets_reset(
    private_redis: RedisServer,
) -> None:
    async with RedisEventLog.from_url(private_redis.url) as backend:
        # Only wake-ups make the follower read, so it cannot see the gap between the
        # flush and the re-creation: it must notice the epoch change itself.
        backend.safety_poll = 60
        old = await backend.append("s", [ev(1), ev(2), ev(3)])
        got: list[Event | Reset] = []
        three = asyncio.Event()

        async def follow() -> None:
            async for item in backend.follow("s"):
                got.append(item)
                if len(got) == 3:
                    three.set()
                if isinstance(item, Event) and item.is_end:
                    return

        task = asyncio.create_task(follow())
        await asyncio.wait_for(three.wait(), 10)
        async with raw_client(private_redis.url) as client:
            await client.flushall()
        new = await backend.append("s", ev(100))
        await backend.close("s")
        await asyncio.wait_for(task, 10)

    assert new.epoch != old.epoch
    assert new.first_id == 1
    assert got[3] == Reset(new.epoch, 0, "epoch_changed", 3)
    assert [(e.id, e.data) for e in got[4:] if isinstance(e, Event)] == [
        (1, {"i": 100}),
        (2, {"status": None, "reason": None}),
    ]


async def test_resume_from_a_lost_epoch_is_reported_not_skipped(
    private_redis: RedisServer,
) -> None:
    async with RedisEventLog.from_url(private_redis.url) as backend:
        old = await backend.append("s", [ev(1), ev(2), ev(3)])
        async with raw_client(private_redis.url) as client:
            await client.flushall()
        # Stale leftovers of the lost history (a partial loss) must not leak into the new one.
        new = await backend.append("s", [ev(7), ev(8), ev(9), ev(10)])
        with pytest.raises(HistoryLost) as lost:
            await backend.read("s", after=3, epoch=old.epoch)
        assert (lost.value.epoch, lost.value.reason) == (new.epoch, "epoch_changed")
        await backend.close("s")
        items = await collect(backend, "s", after=3, epoch=old.epoch)
    assert items[0] == Reset(new.epoch, 0, "epoch_changed", 3)
    assert [e.id for e in items[1:] if isinstance(e, Event)] == [1, 2, 3, 4, 5]


async def test_partial_loss_of_metadata_never_reuses_old_entries(
    shared: RedisEventLog, redis_server: RedisServer
) -> None:
    old = await shared.append("s", [ev(1), ev(2)], producer=Producer("p", 9))
    async with raw_client(redis_server.url) as client:
        await client.delete(shared.keys("s")[1])  # e.g. evicted under memory pressure
    new = await shared.append("s", ev(3), producer=Producer("p", 1))
    assert (new.epoch != old.epoch, new.first_id, new.duplicate) == (True, 1, False)
    page = await shared.read("s")
    assert [e.data for e in page.events] == [{"i": 3}]


# -- faults --------------------------------------------------------------------


def fast_url(server: RedisServer) -> str:
    return f"{server.url}?socket_timeout=1&socket_connect_timeout=1&pool_timeout=2"


async def test_append_fails_fast_while_redis_is_down_then_works_on_same_backend(
    private_redis: RedisServer,
) -> None:
    async with RedisEventLog.from_url(fast_url(private_redis)) as backend:
        before = await backend.append("s", ev(1))
        await asyncio.to_thread(private_redis.stop)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.append("s", ev(2))
        with pytest.raises(BackendUnavailable):
            await backend.ping()
        with pytest.raises(BackendUnavailable):
            await backend.read("s")
        assert time.monotonic() - started < 10
        await asyncio.to_thread(private_redis.start)
        after = await backend.append("s", ev(3))
        await backend.ping()
    # The acknowledged append survived (AOF); the refused one was never stored.
    assert (after.epoch, after.first_id) == (before.epoch, 2)


async def test_first_command_after_a_quiet_restart_succeeds(private_redis: RedisServer) -> None:
    # No command runs while Redis is down, so the pool still holds connections the old
    # server closed; they must be noticed and replaced, not used for the next append.
    async with RedisEventLog.from_url(fast_url(private_redis)) as backend:
        await asyncio.gather(*(backend.append(f"s{i}", ev(i)) for i in range(4)))
        await asyncio.to_thread(private_redis.stop)
        await asyncio.to_thread(private_redis.start)
        results = await asyncio.gather(*(backend.append(f"s{i}", ev(i)) for i in range(4)))
        assert [r.last_id for r in results] == [2, 2, 2, 2]
        page = await backend.read("s0")
        assert [e.id for e in page.events] == [1, 2]


async def test_unresponsive_server_times_out_with_backend_unavailable() -> None:
    # A socket that accepts connections but never answers: the command must not hang.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0?socket_timeout=0.3&socket_connect_timeout=0.3"
        backend = RedisEventLog.from_url(url)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.append("s", ev(1))
        assert time.monotonic() - started < 10
        await backend.aclose()


async def test_redis_error_reply_becomes_backend_error(
    shared: RedisEventLog, redis_server: RedisServer
) -> None:
    async with raw_client(redis_server.url) as client:
        await client.set(shared.keys("s")[1], "not a hash")
    with pytest.raises(BackendError) as err:
        await shared.append("s", ev(1))
    assert not isinstance(err.value, BackendUnavailable)
    assert err.value.__cause__ is not None


async def test_follower_ends_on_a_backend_error_that_is_not_an_outage(
    shared: RedisEventLog, redis_server: RedisServer
) -> None:
    # Only unreachability is waited out; a broken key must surface, not loop forever.
    shared.safety_poll = 0.05
    await shared.append("s", ev(1))
    follower = shared.follow("s")
    assert isinstance(await asyncio.wait_for(anext(follower), 10), Event)
    async with raw_client(redis_server.url) as client:
        await client.delete(shared.keys("s")[1])
        await client.set(shared.keys("s")[1], "not a hash")
    with pytest.raises(BackendError) as err:
        await asyncio.wait_for(anext(follower), 10)
    assert not isinstance(err.value, BackendUnavailable)


@pytest.mark.timeout(120)
async def test_follower_gets_every_acked_event_once_across_redis_kill_and_restart(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RedisEventLog.from_url(fast_url(private_redis)) as backend:
        # Spy on the follower's reads, so the test restarts Redis only once the follower
        # has really run into the outage (else a short outage could go unnoticed).
        follower_failed = asyncio.Event()
        real_read = backend._shared_read

        async def spy_read(
            stream: str, after: int, limit: int, max_bytes: int | None = None
        ) -> Any:
            try:
                return await real_read(stream, after, limit, max_bytes)
            except BackendUnavailable:
                follower_failed.set()
                raise

        monkeypatch.setattr(backend, "_shared_read", spy_read)
        acked: list[int] = []
        for i in range(20):
            acked.append((await backend.append("job", ev(i))).last_id)
        got: list[Event | Reset] = []
        caught_up = asyncio.Event()

        async def follow() -> None:
            async for item in backend.follow("job"):
                got.append(item)
                if len(got) == 20:
                    caught_up.set()

        task = asyncio.create_task(follow())
        await asyncio.wait_for(caught_up.wait(), 10)
        # kill -9: only what Redis fsynced (AOF, appendfsync always) may survive.
        await asyncio.to_thread(private_redis.stop, kill=True)
        with pytest.raises(BackendUnavailable):
            await backend.append("job", ev(-1))
        await asyncio.wait_for(follower_failed.wait(), 10)
        assert not task.done(), "the follower must wait out the outage, not fail"
        await asyncio.to_thread(private_redis.start)
        for i in range(20, 40):
            acked.append((await backend.append("job", ev(i))).last_id)
        await backend.close("job", "succeeded")
        await asyncio.wait_for(task, 30)

    assert acked == list(range(1, 41))
    assert all(isinstance(item, Event) for item in got)
    events = [item for item in got if isinstance(item, Event)]
    assert [e.id for e in events] == [*acked, 41]
    assert [e.data["i"] for e in events[:-1]] == list(range(40))
    assert events[-1].is_end


async def test_aclose_ends_followers_with_backend_error(shared: RedisEventLog) -> None:
    await shared.append("s", ev(1))
    first = asyncio.Event()

    async def follow() -> None:
        async for _ in shared.follow("s"):
            first.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(first.wait(), 10)
    await shared.aclose()
    with pytest.raises(BackendError):
        await asyncio.wait_for(task, 10)


async def test_append_from_another_process_wakes_a_follower(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{redis_server.url}?prefix={unique_prefix()}"
    async with RedisEventLog.from_url(url) as reader, RedisEventLog.from_url(url) as writer:
        # With a one-minute safety poll only the pub/sub wake-up can deliver in time.
        reader.safety_poll = 60
        found_nothing = asyncio.Event()
        real_read = reader._shared_read

        async def spy_read(
            stream: str, after: int, limit: int, max_bytes: int | None = None
        ) -> Any:
            result = await real_read(stream, after, limit, max_bytes)
            if limit and not result[1]:
                found_nothing.set()
            return result

        monkeypatch.setattr(reader, "_shared_read", spy_read)
        await writer.append("s", ev(0))
        follower = reader.follow("s", after=1)
        pending = asyncio.ensure_future(anext(follower))
        # Append only once the follower has read, found nothing and gone to wait.
        await asyncio.wait_for(found_nothing.wait(), 10)
        await writer.append("s", ev(1))
        item = await asyncio.wait_for(pending, 10)
        assert isinstance(item, Event)
        assert (item.id, item.data) == (2, {"i": 1})
        await writer.close("s")
        end = await asyncio.wait_for(anext(follower), 10)
        assert isinstance(end, Event)
        assert end.is_end
        await follower.aclose()  # type: ignore[attr-defined]


# -- one reader per stream per process -------------------------------------------


async def client_connections(client: aioredis.Redis) -> int:
    """Connections to the server other than ``client``'s own."""
    me = await client.client_id()
    return sum(1 for c in await client.client_list() if int(c["id"]) != me)


@pytest.mark.timeout(120)
async def test_thousand_followers_share_a_handful_of_connections(
    private_redis: RedisServer,
) -> None:
    followers = 1000
    url = f"{private_redis.url}?max_connections=8"
    async with RedisEventLog.from_url(url) as backend, raw_client(private_redis.url) as client:
        await backend.append("hot", ev(0))
        got: list[list[int]] = [[] for _ in range(followers)]
        started = 0
        all_started = asyncio.Event()

        async def follow(n: int) -> None:
            nonlocal started
            async for item in backend.follow("hot"):
                assert isinstance(item, Event)
                got[n].append(item.id)
                if item.id == 1:
                    started += 1
                    if started == followers:
                        all_started.set()

        await client.config_resetstat()
        tasks = [asyncio.create_task(follow(n)) for n in range(followers)]
        await asyncio.wait_for(all_started.wait(), 60)
        live = await client_connections(client)
        for i in range(1, 6):
            await backend.append("hot", ev(i))
        await backend.close("hot")
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        after_fanout = await client_connections(client)
        stats = await client.info("commandstats")
        reads = stats.get("cmdstat_xrange", {}).get("calls", 0)

    assert all(ids == [1, 2, 3, 4, 5, 6, 7] for ids in got)
    # 8 pooled command connections + 1 pub/sub connection, whatever the number of followers.
    assert live <= 9
    assert after_fanout <= 9
    assert backend.connection_pool is not None
    assert backend.connection_pool.max_connections == 8
    # Concurrent followers at the same position share reads: far fewer than one per follower
    # per event (7,000 without sharing).
    assert reads < followers
