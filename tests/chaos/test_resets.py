"""Scenario (a): every subscriber's connection is reset every 50-500 ms; nothing is lost.

A real ``runstream serve`` process; the publisher and each subscriber reach it
through their own fault proxy. Size: ``RUNSTREAM_CHAOS_EVENTS`` (default 10,000).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import ServeProcess, assert_clean, chaos_timeout, stream_scenario

pytestmark = pytest.mark.slow


@pytest.mark.timeout(chaos_timeout())
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_connection_resets_lose_duplicate_or_reorder_no_acknowledged_event(
    backend: str, tmp_path: Path
) -> None:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'chaos.db'}"
    server = ServeProcess(url, tmp_path)
    await server.start()
    try:
        summary = await stream_scenario(
            f"resets_{backend}",
            server.port,
            stream="chaos-resets",
            seed=11,
            extra={"backend": backend},
        )
    finally:
        server.stop()
    assert summary["faults_injected"] >= 8, "too few faults to prove anything"
    assert_clean(summary)
