"""How fast Redis workers notice a dead worker and a cancel, printed as one JSON object.

Usage::

    .venv/bin/python bench/worker_failover.py            # private redis-server; leases 1 s, 3 s
    .venv/bin/python bench/worker_failover.py --lease 2 --trials 10
    .venv/bin/python bench/worker_failover.py --redis redis://127.0.0.1:7777/0
    .venv/bin/python bench/worker_failover.py --quick

For each lease: two ``runstream worker`` processes run; per trial a run of a
long command is created (as an API server would), the worker running it is
killed with SIGKILL, and the time from the kill to the run's stream closing
with ``lost`` is measured (``detect_s``; the design bound is under 1.5 leases
after the last heartbeat, the target "within two leases"). A replacement worker
is started after each kill. Then ``cancel_s``: from ``request_cancel`` on
another connection (as another API server would) to the stream closing with
``cancelled`` (target: within a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

from runstream.backends.redis.dispatch import RedisRunQueue
from runstream.backends.redis.log import RedisEventLog
from runstream.backends.redis.runstore import RedisRunStore
from runstream.cli.worker import READY_LINE
from runstream.core.model import Event
from runstream.runs.service import RunService
from runstream.runs.tasks import TaskRegistry

PY = sys.executable
SLEEPER = "import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(600)\n"
CONFIG = f"""
[tasks.sleeper]
command = {json.dumps([PY, "-u", "-c", SLEEPER])}
grace = 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; pass --redis URL")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.02)  # waiting for a child process to listen
    raise SystemExit("redis-server did not start")


class Worker:
    def __init__(self, name: str, config: Path, url: str, lease: float) -> None:
        self.name = name
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [PY, "-m", "runstream.cli.main", "worker", "--config", str(config), "--backend", url,
             "--lease", str(lease), "--name", name, "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith(READY_LINE.format(name=self.name)):
                self.ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
        "all": [round(v, 3) for v in values],
    }


async def first_pid_and_running(log: RedisEventLog, run_id: str) -> int:
    async with asyncio.timeout(60):
        async for item in log.follow(run_id):
            assert isinstance(item, Event)
            if item.type == "stdout" and item.data["line"].startswith("pid "):
                return int(item.data["line"].split()[1])
    raise RuntimeError("run ended before it printed its pid")


async def until_end(log: RedisEventLog, run_id: str) -> Event:
    last: Event | None = None
    async with asyncio.timeout(120):
        async for item in log.follow(run_id):
            assert isinstance(item, Event)
            last = item
    assert last is not None
    return last


async def bench_lease(url: str, config: Path, lease: float, trials: int) -> dict[str, Any]:
    url = f"{url}?prefix=bench{uuid.uuid4().hex[:8]}"
    store = RedisRunStore.from_url(url)
    other_server = RedisRunStore.from_url(url)
    workers: list[Worker] = []
    orphans: list[int] = []
    detect: list[float] = []
    cancel: list[float] = []

    async def spawn() -> Worker:
        w = Worker(f"bench-{uuid.uuid4().hex[:6]}", config, url, lease)
        workers.append(w)
        if not await asyncio.to_thread(w.ready.wait, 60):
            raise RuntimeError("worker did not start")
        return w

    try:
        async with RedisEventLog.from_url(url) as log:
            from runstream.config import load_settings

            registry = TaskRegistry.from_config(load_settings(config, env={}).tasks)
            service = RunService(registry, store, log, dispatcher=RedisRunQueue(store))
            await asyncio.gather(spawn(), spawn())
            for _ in range(trials):
                record = await service.create("sleeper")
                orphans.append(await first_pid_and_running(log, record.id))
                owner = (await store.get(record.id)).worker
                victim = next(w for w in workers if w.name == owner)
                victim.proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                end = await until_end(log, record.id)
                detect.append(time.monotonic() - killed)
                assert end.data["status"] == "lost", end.data
                workers.remove(victim)
                victim.stop()
                await spawn()
            for _ in range(trials):
                record = await service.create("sleeper")
                await first_pid_and_running(log, record.id)
                asked = time.monotonic()
                await other_server.request_cancel(record.id)
                end = await until_end(log, record.id)
                cancel.append(time.monotonic() - asked)
                assert end.data["status"] == "cancelled", end.data
    finally:
        for w in workers:
            w.stop()
        for pid in orphans:  # a SIGKILLed worker cannot take its child's group with it
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        await store.aclose()
        await other_server.aclose()
    return {
        "lease_s": lease,
        "trials": trials,
        "detect_killed_worker_s": summary(detect),
        "detect_max_in_leases": round(max(detect) / lease, 2),
        "within_two_leases": max(detect) <= 2 * lease,
        "cancel_to_end_s": summary(cancel),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", help="redis URL (default: a private redis-server)")
    parser.add_argument("--lease", type=float, action="append", help="lease seconds (repeatable)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one lease, two trials")
    args = parser.parse_args()
    leases = args.lease or ([1.0] if args.quick else [1.0, 3.0])
    trials = 2 if args.quick else args.trials
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "runstream.toml"
        config.write_text(CONFIG)
        redis_proc = None
        url = args.redis
        if url is None:
            redis_proc, url = start_redis(Path(tmp))
        try:
            results = [await bench_lease(url, config, lease, trials) for lease in leases]
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
    print(
        json.dumps(
            {
                "bench": "worker_failover",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
