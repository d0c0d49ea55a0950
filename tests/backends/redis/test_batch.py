"""Concurrent Redis appends coalesced into pipelined round trips, with exact results."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from runstream.backends.redis.log import RedisEventLog
from runstream.core.model import NewEvent, Producer
from runstream.errors import StaleProducerSeq, StreamClosed
from tests.backends.redis.test_log import RedisServer

pytestmark = pytest.mark.redis


def url(server: RedisServer) -> str:
    return f"{server.url}?prefix=b{uuid.uuid4().hex[:12]}"


async def test_concurrent_appends_to_many_streams_share_round_trips(
    redis_server: RedisServer,
) -> None:
    async with RedisEventLog.from_url(url(redis_server)) as log:
        batcher = log._appends
        assert batcher is not None
        streams = [f"s{k}" for k in range(8)]

        async def producer(k: int) -> list[int]:
            ids = []
            for seq in range(1, 26):
                event = NewEvent("n", {"k": k, "seq": seq})
                result = await log.append(streams[k % 8], event, producer=Producer(f"p{k}", seq))
                ids.append(result.first_id)
            return ids

        results = await asyncio.gather(*(producer(k) for k in range(32)))
        assert batcher.appends == 32 * 25
        assert batcher.round_trips < batcher.appends / 2  # coalesced while busy
        for s, stream in enumerate(streams):
            page = await log.read(stream, 0, 1000)
            assert [e.id for e in page.events] == list(range(1, 4 * 25 + 1))
            for k in range(s, 32, 8):  # each producer's events in its order, ids as answered
                mine = [e for e in page.events if e.data["k"] == k]  # type: ignore[index]
                assert [e.data["seq"] for e in mine] == list(range(1, 26))  # type: ignore[index]
                assert [e.id for e in mine] == results[k]


async def test_retries_in_one_batch_stay_exact_and_errors_stay_per_caller(
    redis_server: RedisServer,
) -> None:
    async with RedisEventLog.from_url(url(redis_server)) as log:
        await log.append("closed", NewEvent("n", 0))
        await log.close("closed")
        await log.append("p", NewEvent("n", 1), producer=Producer("w", 5))
        # All submitted together: one goes alone, the rest share a pipeline.
        outcomes = await asyncio.gather(
            log.append("p", NewEvent("n", 2), producer=Producer("w", 6)),
            log.append("p", NewEvent("n", 2), producer=Producer("w", 6)),  # a retry of 6
            log.append("p", NewEvent("n", 1), producer=Producer("w", 4)),  # stale
            log.append("closed", NewEvent("n", 3)),
            log.append("p", NewEvent("n", 3), producer=Producer("w", 7)),
            return_exceptions=True,
        )
        first, retry, stale, closed, last = outcomes
        assert not isinstance(first, BaseException) and not first.duplicate
        assert not isinstance(retry, BaseException) and retry.duplicate
        assert (retry.first_id, retry.last_id) == (first.first_id, first.last_id)
        assert isinstance(stale, StaleProducerSeq)
        assert isinstance(closed, StreamClosed)
        assert not isinstance(last, BaseException) and last.first_id == first.first_id + 1
        page = await log.read("p", 0, 10)
        assert [e.data for e in page.events] == [1, 2, 3]


async def test_appends_after_the_scripts_were_flushed_still_succeed(
    private_redis: RedisServer,
) -> None:
    async with RedisEventLog.from_url(url(private_redis)) as log:
        await log.append("f", NewEvent("n", 0))
        raw = aioredis.Redis.from_url(private_redis.url)
        try:
            await raw.script_flush()
        finally:
            await raw.aclose()
        results = await asyncio.gather(*(log.append("f", NewEvent("n", i)) for i in range(1, 20)))
        assert sorted(r.first_id for r in results) == list(range(2, 21))
        page = await log.read("f", 0, 100)
        assert sorted(e.data for e in page.events) == list(range(20))  # type: ignore[type-var]
