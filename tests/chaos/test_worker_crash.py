"""Scenario (d): the worker running a run is ``kill -9``-ed; the run is retried elsewhere.

On a private Redis: a real ``runstream serve --workers 0`` (API only) and two
``runstream worker`` processes (lease 1 s). A command task prints numbered
lines ``n 0`` .. ``n N-1`` and declares ``retries = 1``. Once subscribers have
seen part of the output, the worker running it gets SIGKILL. The
subscribers follow the run's stream (``/v1/runs/{id}/...``) through proxies
that reset their connections every 50-500 ms.

What is asserted, precisely:

* the run's stream ends (an end entry) with status ``succeeded`` at attempt 2,
  after status events ``lost`` (attempt 1), ``queued``/``running`` (attempt 2);
* within each attempt the ``stdout`` lines are ``n 0, n 1, ...`` with no
  duplicate and no gap: attempt 1 a non-empty prefix cut by the kill (what
  the killed worker had appended is kept, what it had not is simply absent),
  attempt 2 all N lines exactly once — a second attempt restarts the command,
  so its numbers start again at 0; that is a new attempt, not a duplicate;
* every subscriber delivered exactly the log (read afterwards, directly):
  nothing lost, duplicated or reordered, same id, type and data per event.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from runstream.cli.worker import READY_LINE
from tests.chaos.harness import (
    SUBSCRIBER_KINDS,
    ChaosProxy,
    Delivery,
    ServeProcess,
    Subscriber,
    assert_clean,
    chaos_events,
    chaos_timeout,
    drive,
    emit,
    recovery_times,
    subscriber_report,
    summarize,
)
from tests.conftest import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.redis]

PY = sys.executable
COUNTER = (
    "import sys, time\n"
    "for i in range(int(sys.argv[1])):\n"
    "    print('n', i, flush=True)\n"
    "    time.sleep(0.003)\n"
)
LEASE = 1.0


def lines_per_attempt() -> int:
    return max(500, chaos_events() // 10)


def write_config(path: Path) -> Path:
    command = json.dumps([PY, "-u", "-c", COUNTER, "{n}"])
    path.write_text(
        f"[tasks.counter]\ncommand = {command}\n"
        'params = { n = { type = "integer" } }\nretries = 1\ngrace = 1\n'
    )
    return path


class Worker:
    """A ``runstream worker`` process; ``ready`` is set when it announces itself."""

    def __init__(self, name: str, config: Path, url: str) -> None:
        self.name = name
        self.ready = threading.Event()
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.proc = subprocess.Popen(
            [PY, "-m", "runstream.cli.main", "worker", "--config", str(config), "--backend", url,
             "--lease", str(LEASE), "--name", name, "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY_LINE.format(name=self.name)):
                self.ready.set()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


async def read_log(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's whole stream, read directly (no proxy) after it ended."""
    events: list[dict[str, Any]] = []
    after = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while True:
            page = (
                await http.get(f"/v1/runs/{run_id}/events", params={"after": after, "limit": 1000})
            ).json()
            events += page["events"]
            after = page["next_after"]
            if page["closed"] and not page["events"]:
                return events


def attempts_of(events: list[dict[str, Any]]) -> tuple[list[tuple[str, int]], dict[int, list[int]]]:
    """Status transitions ``(status, attempt)`` and the ``n K`` numbers printed per attempt."""
    statuses: list[tuple[str, int]] = []
    numbers: dict[int, list[int]] = {}
    attempt = 0
    for e in events:
        if e["type"] == "status":
            attempt = int(e["data"]["attempt"])
            statuses.append((e["data"]["status"], attempt))
        elif e["type"] == "stdout":
            word, k = e["data"]["line"].split()
            assert word == "n"
            numbers.setdefault(attempt, []).append(int(k))
    return statuses, numbers


def key(d: Delivery) -> tuple[int, str, str]:
    return (d.id, d.type, json.dumps(d.data, sort_keys=True))


@pytest.mark.timeout(chaos_timeout())
async def test_worker_kill_9_mid_run_retries_without_duplicating_an_attempts_output(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url = f"{redis_server.url}?prefix=chaos{uuid.uuid4().hex[:10]}"
    config = write_config(tmp_path / "runstream.toml")
    server = ServeProcess(url, tmp_path, config=config)
    workers = [Worker(f"chaos-w{n}", config, url) for n in (1, 2)]
    proxies: dict[str, ChaosProxy] = {}
    tasks: list[asyncio.Task[None]] = []
    n_lines = lines_per_attempt()
    started = time.monotonic()
    try:
        await server.start()
        for w in workers:
            assert await asyncio.to_thread(w.ready.wait, 60), "\n".join(w.lines)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = {"task": "counter", "params": {"n": n_lines}}
            created = await http.post("/v1/runs", json=body)
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            subs: dict[str, Subscriber] = {}
            for n, kind in enumerate(SUBSCRIBER_KINDS, start=1):
                proxy = ChaosProxy(server.port, seed=40 + n)
                await proxy.start()
                proxies[kind.kind] = proxy
                subs[kind.kind] = kind(proxy.url, run_id, headers={}, run=True)

            tasks = [asyncio.create_task(drive(subs[k], proxies[k])) for k in subs]
            # Kill once a fifth of the first attempt's output reached a subscriber.
            await subs["sdk"].wait_for(
                lambda s: sum(d.type == "stdout" for d in s.delivered) >= n_lines // 5
            )
            owner = (await http.get(f"/v1/runs/{run_id}")).json()["worker"]
            victim = next(w for w in workers if w.name == owner)
            await asyncio.to_thread(victim.kill)
            killed = time.monotonic()
            await asyncio.gather(*tasks)
            final = (await http.get(f"/v1/runs/{run_id}")).json()
        log = await read_log(server.url, run_id)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proxy in proxies.values():
            await proxy.aclose()
        for w in workers:
            await asyncio.to_thread(w.kill)
        server.stop()

    expected = [
        (int(e["id"]), key(Delivery(int(e["id"]), e["type"], e["data"], 0.0)))
        for e in log
        if e["type"] != "end"
    ]
    reports = {k: subscriber_report(subs[k], proxies[k], expected, key) for k in subs}
    statuses, numbers = attempts_of(log)
    first, second = numbers.get(1, []), numbers.get(2, [])
    # When the kill was noticed: the stream's "lost" status, as each subscriber saw it.
    detect = [
        d.at - killed
        for sub in subs.values()
        for d in sub.delivered
        if d.type == "status" and d.data["status"] == "lost"
    ]
    summary = summarize(
        "worker_kill9_redis",
        reports,
        events=len(expected),
        fault_recoveries=[t for s in subs.values() for t in recovery_times([killed], s.delivered)],
        extra={
            "duration_s": round(time.monotonic() - started, 2),
            "crashes": 1,
            "lease_s": LEASE,
            "lines_per_attempt": n_lines,
            "attempt1_lines": len(first),
            "attempt2_lines": len(second),
            "duplicated_within_attempt": sum(len(v) - len(set(v)) for v in numbers.values()),
            "statuses": statuses,
            "final": {"status": final["status"], "attempt": final["attempt"]},
            "lost_status_seen_after_s": {
                "min": round(min(detect), 3) if detect else None,
                "max": round(max(detect), 3) if detect else None,
            },
        },
    )
    emit(summary)
    assert log[-1]["type"] == "end" and log[-1]["data"]["status"] == "succeeded"
    assert [e["type"] for e in log].count("end") == 1
    assert [e["id"] for e in log] == list(range(1, len(log) + 1))
    assert ("lost", 1) in statuses
    assert statuses[-2:] == [("running", 2), ("succeeded", 2)]
    assert (final["status"], final["attempt"]) == ("succeeded", 2)
    assert final["worker"] != owner
    assert 0 < len(first) < n_lines, "the kill should cut the first attempt"
    assert first == list(range(len(first))), "attempt 1: duplicated or missing lines"
    assert second == list(range(n_lines)), "attempt 2: duplicated or missing lines"
    assert set(numbers) == {1, 2}
    assert_clean(summary)
