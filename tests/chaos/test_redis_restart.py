"""Scenario (c): the Redis behind the API server is killed (SIGKILL) and restarted mid-stream.

A private ``redis-server`` with AOF and ``appendfsync always`` (the
``private_redis`` fixture) is killed at 40 % of the events, left down for half a
second and started again from its AOF, on the same port. The API server (a
real ``runstream serve`` process) stays up and answers 503 meanwhile; the
publisher retries with the same producer seq, the subscribers reconnect.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.chaos.harness import (
    Publisher,
    ServeProcess,
    assert_clean,
    chaos_timeout,
    stream_scenario,
)
from tests.conftest import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.redis]

OUTAGE_S = 0.5


@pytest.mark.timeout(chaos_timeout())
async def test_redis_kill_and_restart_lose_duplicate_or_reorder_no_acknowledged_event(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    server = ServeProcess(private_redis.url, tmp_path)
    await server.start()

    async def crash(publisher: Publisher) -> list[float]:
        await publisher.reached(0.4)
        await asyncio.to_thread(private_redis.stop, kill=True)
        killed = time.monotonic()
        await asyncio.sleep(OUTAGE_S)  # the outage itself: Redis stays down this long
        await asyncio.to_thread(private_redis.start)
        return [killed]

    try:
        summary = await stream_scenario(
            "redis_restart",
            server.port,
            stream="chaos-redis",
            seed=33,
            disrupt=crash,
            extra={"backend": "redis (AOF, appendfsync always)", "outage_s": OUTAGE_S},
        )
    finally:
        server.stop()
    assert summary["crashes"] == 1
    assert_clean(summary)
