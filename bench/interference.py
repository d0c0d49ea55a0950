"""Interference: which kind of concurrent work in the server's process slows an append?

Usage::

    .venv/bin/python bench/interference.py                 # 8 s per load
    .venv/bin/python bench/interference.py --seconds 3 --quick

One event is appended every ``--probe-ms`` ms to a SQLite stream and timed (as the soak
bench's probe), first with nothing else running (the baseline), then under each load in
turn, then with nothing again (the baseline at the end, to see drift):

* ``python-bursts`` — a thread running Python code in bursts of ``--burst-us`` µs with a
  pause of ``--gap-us`` µs (the shape of a retention pass's glue: building records,
  stepping statements): it holds the GIL only during its bursts;
* ``python-rare`` — the same, with bursts five times longer and pauses six times longer;
* ``sqlite-query`` — a thread repeating a CPU-bound SQLite query on its own in-memory
  database (the GIL is released while SQLite works): a CPU taken, no GIL;
* ``fsync`` — a thread writing 64 KiB and fsyncing a file next to the database;
* ``deletion`` — ``--victims`` streams of 200 events, made beforehand, deleted ten at a
  time through the same log (``EventLog.delete_many``, as a retention pass does); the
  probe runs while they are deleted.

Prints one JSON object: per load, the appends' p50 / p99 / max / mean (``soak.percentiles``)
and the ratio of p50 and p99 to the baseline measured first.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soak import percentiles

from runstream.backends import EventLog, open_backend
from runstream.core.model import NewEvent

LOADS = ("none", "python-bursts", "python-rare", "sqlite-query", "fsync", "deletion", "none")


async def probe(
    log: EventLog, seconds: float, every: float, until: asyncio.Task[Any] | None = None
) -> list[float]:
    """Append every ``every`` s for ``seconds`` (or until ``until`` is done); the latencies."""
    out: list[float] = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end and not (until is not None and until.done()):
        start = time.perf_counter()
        await log.append("probe", NewEvent("probe", {"i": i}))
        out.append(time.perf_counter() - start)
        i += 1
        await asyncio.sleep(every)
    return out


def python_bursts(stop: threading.Event, burst: float, gap: float) -> None:
    while not stop.is_set():
        end = time.perf_counter() + burst
        while time.perf_counter() < end:
            sum(range(50))
        time.sleep(gap)


def sqlite_query(stop: threading.Event) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", ((i,) for i in range(200_000)))
        while not stop.is_set():
            conn.execute("SELECT count(*) FROM t WHERE x % 7 = 3").fetchone()
    finally:
        conn.close()


def fsync_loop(stop: threading.Event, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while not stop.is_set():
            os.pwrite(fd, b"x" * 65536, 0)
            os.fsync(fd)
    finally:
        os.close(fd)


def load_thread(load: str, stop: threading.Event, args: Any, tmp: Path) -> threading.Thread | None:
    """The thread that makes ``load`` (None for ``none`` and ``deletion``)."""
    burst, gap = args.burst_us / 1e6, args.gap_us / 1e6
    target: Callable[[], None]
    if load == "python-bursts":
        target = functools.partial(python_bursts, stop, burst, gap)
    elif load == "python-rare":
        target = functools.partial(python_bursts, stop, 5 * burst, 6 * gap)
    elif load == "sqlite-query":
        target = functools.partial(sqlite_query, stop)
    elif load == "fsync":
        target = functools.partial(fsync_loop, stop, tmp / "junk")
    else:
        return None
    return threading.Thread(target=target, name=f"interference-{load}")


async def deletions(log: EventLog, stop: threading.Event, pool: list[str]) -> int:
    deleted = 0
    while not stop.is_set() and pool:
        batch, pool[:] = pool[:10], pool[10:]
        await log.delete_many(batch)
        deleted += len(batch)
    return deleted


async def fill(log: EventLog, count: int) -> list[str]:
    names = [f"victim-{i}" for i in range(count)]
    line = {"line": "x" * 80}
    for name in names:
        await log.append(name, [NewEvent("stdout", line) for _ in range(200)])
    return names


async def measure(args: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="runstream-interference-") as tmp:
        log = open_backend(f"sqlite:///{Path(tmp) / 'i.db'}")
        await log.start()
        try:
            await probe(log, 1.0, args.probe_ms / 1000)  # warm up
            results: dict[str, Any] = {}
            for index, load in enumerate(args.loads):
                stop = threading.Event()
                thread = load_thread(load, stop, args, Path(tmp))
                deleting: asyncio.Task[int] | None = None
                if load == "deletion":
                    pool = await fill(log, args.victims)
                    deleting = asyncio.create_task(deletions(log, stop, pool))
                if thread is not None:
                    thread.start()
                samples = await probe(log, args.seconds, args.probe_ms / 1000, deleting)
                stop.set()
                if thread is not None:
                    await asyncio.to_thread(thread.join)
                row: dict[str, Any] = percentiles(samples)
                if deleting is not None:
                    row["streams_deleted"] = await deleting
                key = load if load not in results else f"{load}-end"
                results[key] = row
                if index == 0:
                    base = row
            for row in results.values():
                row["p50_x"] = round(row["p50_ms"] / base["p50_ms"], 2)
                row["p99_x"] = round(row["p99_ms"] / base["p99_ms"], 2)
        finally:
            await log.aclose()
    return {
        "bench": "interference",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "settings": {
            k: getattr(args, k) for k in ("seconds", "probe_ms", "burst_us", "gap_us", "victims")
        },
        "baseline": "the first 'none' row: nothing else running",
        "loads": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="probe time per load")
    parser.add_argument("--probe-ms", type=float, default=2.0)
    parser.add_argument("--burst-us", type=float, default=200.0)
    parser.add_argument("--gap-us", type=float, default=1000.0)
    parser.add_argument("--victims", type=int, default=3000, help="streams made to delete")
    parser.add_argument("--quick", action="store_true", help="short settings for a smoke run")
    args = parser.parse_args()
    args.loads = LOADS
    if args.quick:
        args.seconds, args.victims = min(args.seconds, 2.0), 300
    json.dump(asyncio.run(measure(args)), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
