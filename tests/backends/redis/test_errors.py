"""The one Redis error map: every Redis failure comes out as the same runstream error."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from runstream.backends.redis.errors import translate, translated
from runstream.backends.redis.log import RedisEventLog
from runstream.core.model import NewEvent
from runstream.errors import BackendError, BackendUnavailable, StreamNotFound
from tests.conftest import RedisServer, free_port

pytestmark = pytest.mark.redis


@pytest.mark.parametrize(
    ("raised", "error", "message"),
    [
        (redis_errors.ConnectionError("refused"), BackendUnavailable, "redis unreachable"),
        (redis_errors.TimeoutError("slow"), BackendUnavailable, "redis unreachable"),
        (ConnectionResetError("reset"), BackendUnavailable, "redis unreachable"),
        (redis_errors.ReadOnlyError("READONLY replica"), BackendUnavailable, "redis is read-only"),
        (redis_errors.ResponseError("WRONGTYPE"), BackendError, "redis failed"),
        (redis_errors.NoScriptError("NOSCRIPT"), BackendError, "redis failed"),
    ],
)
def test_each_redis_failure_maps_to_one_runstream_error(
    raised: Exception, error: type[BackendError], message: str
) -> None:
    with pytest.raises(BackendError) as info, translated("append"):
        raise raised
    assert type(info.value) is error
    assert str(info.value) == f"{message} during append: {raised}"
    assert info.value.__cause__ is raised


@pytest.mark.parametrize("raised", [StreamNotFound("s"), ValueError("not redis's")])
def test_other_errors_pass_through_unchanged(raised: Exception) -> None:
    assert translate(raised, "read") is None
    with pytest.raises(type(raised)) as info, translated("read"):
        raise raised
    assert info.value is raised


async def test_a_demoted_primary_refuses_writes_as_unavailable_and_still_serves_reads(
    private_redis: RedisServer,
) -> None:
    admin = aioredis.Redis.from_url(private_redis.url)
    async with RedisEventLog.from_url(f"{private_redis.url}?prefix=t{uuid.uuid4().hex[:8]}") as log:
        try:
            await log.append("s", NewEvent("x", 1))
            await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            with pytest.raises(BackendUnavailable, match="read-only"):
                await log.append("s", NewEvent("x", 2))
            assert [e.data for e in (await log.read("s", 0, 10)).events] == [1]
        finally:
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await admin.aclose()
