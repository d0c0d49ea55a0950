"""Durable listener positions: the stores, the watermark, and ``run_forever(checkpoint=...)``.

What is asserted: a checkpoint never passes an event whose handlers did not
finish (so a restart skips nothing), handlers that fail are retried and then
dead-lettered, and what happens to the checkpoint in each case.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from runstream.client._async import AsyncClient
from runstream.client.checkpoint import (
    CheckpointStore,
    FileCheckpointStore,
    MemoryCheckpointStore,
    SQLiteCheckpointStore,
    Watermark,
)
from runstream.client.handlers import Context
from runstream.client.metrics import Metrics
from runstream.client.policy import GiveUp, ReconnectState, Retry, RetryPolicy
from runstream.core.model import Event, Reset
from runstream.errors import ConfigError, HandlerFailed

from .conftest import LiveServer

QUICK_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.005, max_attempts=2, max_elapsed=None)


async def fill(server: LiveServer, stream: str, n: int, *, close: bool = True) -> str:
    async with AsyncClient(server.url) as c:
        result = await c.publish_many(stream, [("job", {"n": i, "k": i % 3}) for i in range(n)])
        if close:
            await c.close_stream(stream, status="succeeded")
    return result.epoch


# -- stores ------------------------------------------------------------------------


@pytest.fixture(params=["memory", "file", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CheckpointStore]:
    if request.param == "memory":
        yield MemoryCheckpointStore()
    elif request.param == "file":
        yield FileCheckpointStore(tmp_path / "positions.json")
    else:
        sqlite = SQLiteCheckpointStore(tmp_path / "positions.db")
        yield sqlite
        sqlite.close()


async def test_a_store_returns_what_was_saved_per_name(store: CheckpointStore) -> None:
    assert isinstance(store, CheckpointStore)
    assert await store.load("a") is None
    await store.save("a", "ep:1")
    await store.save("b", "ep:9")
    await store.save("a", "ep:2")
    assert (await store.load("a"), await store.load("b")) == ("ep:2", "ep:9")


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_file_and_sqlite_positions_survive_a_new_store_on_the_same_file(
    tmp_path: Path, kind: str
) -> None:
    def make() -> CheckpointStore:
        if kind == "file":
            return FileCheckpointStore(tmp_path / "sub" / "p.json")
        return SQLiteCheckpointStore(tmp_path / "sub" / "p.db")

    first, second = make(), make()
    await first.save("listener", "ep:41")
    assert await second.load("listener") == "ep:41"
    await second.save("other", "ep:1")  # two writers on one SQLite file / in turn on one JSON file
    assert await first.load("other") == "ep:1" and await first.load("listener") == "ep:41"
    for s in (first, second):
        if isinstance(s, SQLiteCheckpointStore):
            s.close()
    leftovers = [p.name for p in (tmp_path / "sub").iterdir() if p.name.startswith(".p.json")]
    assert leftovers == []  # the temporary file of each atomic replace is gone


async def test_a_corrupt_checkpoint_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{half")
    with pytest.raises(ConfigError, match="not valid JSON"):
        await FileCheckpointStore(path).load("x")


# -- the watermark (no I/O) --------------------------------------------------------------


def test_the_watermark_moves_only_past_items_settled_in_order() -> None:
    moves: list[str] = []
    mark = Watermark("e:0", on_advance=moves.append)
    one, two, three = mark.open("e:1"), mark.open("e:2"), mark.open("e:3")
    for seq in (one, two, three):
        mark.add_job(seq)
        mark.seal(seq)
    mark.job_done(three)
    mark.job_done(two)
    assert mark.position == "e:0" and moves == []  # event 1 still running
    mark.job_done(one)
    assert mark.position == "e:3" and moves == ["e:3"] and mark.unsettled == 0


def test_an_item_no_handler_wants_settles_in_turn_and_an_unsealed_one_never() -> None:
    mark = Watermark()
    busy = mark.open("e:1")
    mark.add_job(busy)
    mark.seal(busy)
    idle = mark.open("e:2")
    mark.seal(idle)  # no job: settled, but after event 1
    assert mark.position is None
    mark.job_done(busy)
    assert mark.position == "e:2"
    half = mark.open("e:3")
    mark.add_job(half)
    mark.job_done(half)  # its other jobs were never submitted (cancelled)
    assert mark.position == "e:2"


# -- handler retry decisions (fake clock) ------------------------------------------------


def test_handler_retries_wait_full_jitter_and_give_up_after_max_attempts() -> None:
    # The pool makes exactly this object per job: max_attempts retries after the first call.
    policy = RetryPolicy(base_delay=1.0, max_delay=4.0, max_attempts=3, max_elapsed=None)
    state = ReconnectState(policy, allow_fallback=False, rand=lambda _lo, hi: hi)
    now = 0.0
    delays = []
    for _ in range(3):
        decision = state.on_failure("handler", now)
        assert isinstance(decision, Retry)
        delays.append(decision.delay)
        now += decision.delay
    assert delays == [1.0, 2.0, 4.0]
    assert isinstance(state.on_failure("handler", now), GiveUp)
    bounded = ReconnectState(
        RetryPolicy(base_delay=1.0, max_delay=1.0, max_attempts=None, max_elapsed=2.5),
        allow_fallback=False,
        rand=lambda _lo, hi: hi,
    )
    assert isinstance(bounded.on_failure("handler", 0.0), Retry)
    assert isinstance(bounded.on_failure("handler", 1.0), Retry)
    assert isinstance(bounded.on_failure("handler", 2.0), GiveUp)  # 2.0 + 1.0 > 2.5


# -- run_forever with a checkpoint -------------------------------------------------------


async def test_the_checkpoint_passes_only_finished_events_and_a_restart_skips_none(
    live_server: LiveServer,
) -> None:
    epoch = await fill(live_server, "cp", 60)
    store = MemoryCheckpointStore()
    handled: Counter[int] = Counter()
    done: set[int] = set()
    keys: dict[int, set[str]] = defaultdict(set)
    stop = asyncio.Event()
    rng = random.Random(5)
    checks = 0
    violations: list[tuple[str, list[int]]] = []  # (an assert in a handler would be caught)

    async def listen(client: AsyncClient, stop_after: int | None) -> Event | None:
        @client.on("job")
        async def work(ev: Event, ctx: Context) -> None:
            nonlocal checks
            await asyncio.sleep(rng.uniform(0, 0.01))  # finish out of order
            handled[ev.id] += 1
            keys[ev.id].add(ctx.idempotency_key(ev))
            done.add(ev.id)
            position = await store.load("cp")
            if position is not None:
                # Whatever the checkpoint says, every event up to it has finished.
                upto = int(position.rpartition(":")[2])
                if not set(range(1, min(upto, 60) + 1)) <= done:
                    violations.append((position, sorted(done)))
                checks += 1
            if stop_after is not None and len(done) >= stop_after:
                stop.set()

        return await client.run_forever(
            "cp", checkpoint=store, stop_event=stop, concurrency=4, queue_size=4, buffer=1
        )

    async with AsyncClient(live_server.url) as first:
        assert await listen(first, stop_after=25) is None  # stopped before the end
    stopped_at = await store.load("cp")
    assert stopped_at is not None and stopped_at.startswith(f"{epoch}:")
    assert 25 <= int(stopped_at.rpartition(":")[2]) < 60
    stop.clear()
    async with AsyncClient(live_server.url) as second:
        end = await listen(second, stop_after=None)
    assert end is not None and end.is_end
    assert sorted(handled) == list(range(1, 61))  # every event at least once, none skipped
    assert checks > 30 and violations == []
    assert all(len(k) == 1 for k in keys.values())  # the same key on every delivery
    assert await store.load("cp") == f"{epoch}:61"  # the end entry settled too


async def test_a_saved_checkpoint_replaces_after_and_a_finished_stream_has_nothing_left(
    live_server: LiveServer, tmp_path: Path
) -> None:
    epoch = await fill(live_server, "cp2", 5)
    store = SQLiteCheckpointStore(tmp_path / "cp.db")
    await store.save("mine", f"{epoch}:3")
    seen: list[int] = []
    async with AsyncClient(live_server.url) as client:

        @client.on()
        async def record(ev: Event, ctx: Context) -> None:
            seen.append(ev.id)

        metrics = Metrics()
        end = await client.run_forever(
            "cp2", after=0, checkpoint=store, checkpoint_name="mine", metrics=metrics
        )
        assert end is not None and seen == [4, 5, 6]
        assert metrics.checkpoint == f"{epoch}:6" == await store.load("mine")
        assert await client.run_forever("cp2", checkpoint=store, checkpoint_name="mine") is None
    assert seen == [4, 5, 6]
    store.close()


async def test_a_reset_moves_the_checkpoint_to_the_new_history(live_server: LiveServer) -> None:
    epoch = await fill(live_server, "cp3", 2)
    store = MemoryCheckpointStore()
    await store.save("cp3", "0123456789ab:7")  # from a history the server no longer has
    resets: list[Reset] = []
    async with AsyncClient(live_server.url) as client:

        @client.on_reset
        async def rebuild(reset: Reset, ctx: Context) -> None:
            resets.append(reset)

        await client.run_forever("cp3", checkpoint=store)
    assert [(r.reason, r.requested) for r in resets] == [("epoch_changed", 7)]
    assert await store.load("cp3") == f"{epoch}:3"


async def test_a_failing_handler_is_retried_and_keeps_its_key_order(
    live_server: LiveServer,
) -> None:
    await fill(live_server, "retry", 9)
    calls: Counter[int] = Counter()
    order: dict[int, list[int]] = defaultdict(list)
    metrics = Metrics()
    store = MemoryCheckpointStore()
    async with AsyncClient(live_server.url) as client:

        @client.on("job", key=lambda ev: ev.data["k"])
        async def flaky(ev: Event, ctx: Context) -> None:
            calls[ev.id] += 1
            if ev.data["n"] in (0, 4) and calls[ev.id] <= 2:
                raise RuntimeError(f"transient {ev.id}")
            order[ev.data["k"]].append(ev.data["n"])

        await client.run_forever(
            "retry", checkpoint=store, handler_retry=QUICK_RETRY, metrics=metrics, concurrency=3
        )
    assert calls[1] == calls[5] == 3 and metrics.handler_retries == 4
    assert metrics.handler_exceptions == 4 and metrics.dead_lettered == 0
    assert order == {0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5, 8]}  # retried events held their key
    assert (await store.load("retry") or "").endswith(":10")


async def test_after_the_retries_the_dead_letter_hook_gets_the_event_and_the_checkpoint_moves_on(
    live_server: LiveServer,
) -> None:
    epoch = await fill(live_server, "dlq", 4)
    store = MemoryCheckpointStore()
    dead: list[tuple[int, str, str]] = []
    metrics = Metrics()
    async with AsyncClient(live_server.url) as client:

        @client.on("job")
        async def broken(ev: Event, ctx: Context) -> None:
            if ev.id == 2:
                raise ValueError("poison")

        def dead_letter(item: Event | Reset, ctx: Context, exc: BaseException) -> None:
            assert isinstance(item, Event)  # a plain function: runs in a thread
            dead.append((item.id, ctx.idempotency_key(item), repr(exc)))

        end = await client.run_forever(
            "dlq",
            checkpoint=store,
            handler_retry=QUICK_RETRY,
            dead_letter=dead_letter,
            metrics=metrics,
        )
    assert end is not None
    assert dead == [(2, f"dlq:{epoch}:2", "ValueError('poison')")]
    assert metrics.handler_exceptions == 3 and metrics.dead_lettered == 1
    assert await store.load("dlq") == f"{epoch}:5"  # settled by the dead letter


async def test_without_retries_or_hook_a_failure_is_logged_and_the_checkpoint_moves_on(
    live_server: LiveServer,
) -> None:
    epoch = await fill(live_server, "skip", 3)
    store = MemoryCheckpointStore()
    metrics = Metrics()
    async with AsyncClient(live_server.url) as client:

        @client.on("job")
        async def broken(ev: Event, ctx: Context) -> None:
            raise RuntimeError("always")

        await client.run_forever("skip", checkpoint=store, metrics=metrics)
    assert metrics.handler_exceptions == 3 and metrics.dead_lettered == 3
    assert await store.load("skip") == f"{epoch}:4"


async def test_a_failing_dead_letter_hook_stops_the_listener_before_that_event(
    live_server: LiveServer,
) -> None:
    epoch = await fill(live_server, "stuck", 8, close=False)
    store = MemoryCheckpointStore()
    poison = 5
    attempts: Counter[int] = Counter()

    def make_handler(client: AsyncClient) -> Callable[[Event, Context], object]:
        @client.on("job")
        async def work(ev: Event, ctx: Context) -> None:
            attempts[ev.id] += 1
            if ev.id == poison:
                raise RuntimeError("poison")

        return work

    async def hook(item: Event | Reset, ctx: Context, exc: BaseException) -> None:
        raise OSError("dead-letter queue unreachable")

    async with AsyncClient(live_server.url) as client:
        make_handler(client)
        with pytest.raises(HandlerFailed) as failed:
            await client.run_forever(
                "stuck", checkpoint=store, handler_retry=QUICK_RETRY, dead_letter=hook
            )
    assert isinstance(failed.value.__cause__, OSError)
    assert isinstance(failed.value.handler_error, RuntimeError)
    assert attempts[poison] == 3
    assert await store.load("stuck") == f"{epoch}:{poison - 1}"
    # A restart (with the bug fixed) handles the poison event again, and what followed it.
    poison = 0
    async with AsyncClient(live_server.url) as client:
        make_handler(client)
        stop = asyncio.Event()

        @client.on("job", where=lambda ev: ev.id == 8)
        async def last(ev: Event, ctx: Context) -> None:
            stop.set()

        await client.run_forever("stuck", checkpoint=store, stop_event=stop)
    assert attempts[5] == 4 and all(attempts[i] >= 1 for i in range(1, 9))
    assert await store.load("stuck") == f"{epoch}:8"
