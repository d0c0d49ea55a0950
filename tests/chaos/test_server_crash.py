"""Scenario (b): the API server is ``kill -9``-ed twice mid-stream and restarted.

A real ``runstream serve`` on a SQLite file (``synchronous=full``, the default)
is killed with SIGKILL at 30 % and 65 % of the events and started again on the
same port and file. Subscribers and the publisher keep going through their
proxies (which refuse connections while the server is down); the publisher
resends its unacknowledged append with the same producer seq.
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

pytestmark = pytest.mark.slow

KILL_AT = (0.3, 0.65)


@pytest.mark.timeout(chaos_timeout())
async def test_server_kill_9_and_restart_lose_duplicate_or_reorder_no_acknowledged_event(
    tmp_path: Path,
) -> None:
    server = ServeProcess(f"sqlite:///{tmp_path / 'chaos.db'}", tmp_path)
    await server.start()
    restart_s: list[float] = []

    async def crash(publisher: Publisher) -> list[float]:
        crashes = []
        for fraction in KILL_AT:
            await publisher.reached(fraction)
            await asyncio.to_thread(server.kill)
            crashes.append(time.monotonic())
            restart_s.append(round(await server.start(), 3))
        return crashes

    try:
        summary = await stream_scenario(
            "server_kill9_sqlite",
            server.port,
            stream="chaos-crash",
            seed=22,
            disrupt=crash,
            extra={"backend": "sqlite (synchronous=full)", "server_restart_s": restart_s},
        )
    finally:
        server.stop()
    assert summary["crashes"] == len(KILL_AT)
    assert_clean(summary)
