"""Append throughput and follow latency per backend, printed as one JSON object.

Usage::

    .venv/bin/python bench/append.py                      # memory:// and a temp sqlite file
    .venv/bin/python bench/append.py sqlite:///./x.db     # backend URLs to measure
    .venv/bin/python bench/append.py --redis redis://127.0.0.1:7777/0
    .venv/bin/python bench/append.py --quick              # smaller counts, for a smoke run

Every backend goes through :func:`bench_backend` (throughput via the public
EventLog API) and :func:`bench_follow` (append → follower latency, in-process
and from another process). For SQLite, :func:`bench_sqlite_vs_raw` also runs
plain ``sqlite3`` ``executemany`` of the same rows into a fresh file with the
same schema and pragmas, interleaved with the backend, so its overhead can be
read off as a ratio (``vs_raw_sqlite``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from runstream.backends import EventLog, open_backend
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.backends.sqlite.sql import _INSERT_EVENT, _SCHEMA, _base
from runstream.core.model import NewEvent, now

PAYLOAD = "x" * 100
"""A typical log line; each event's data is ``{"line": PAYLOAD, "i": n}``."""


def make_event(i: int) -> NewEvent:
    return NewEvent("stdout", {"line": PAYLOAD, "i": i})


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "n": len(ordered),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def unique(name: str) -> str:
    return f"bench-{name}-{uuid.uuid4().hex[:8]}"


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


# -- throughput through the EventLog API ----------------------------------------------


async def bench_backend(log: EventLog, scale: int) -> dict[str, Any]:
    """Events/s for single-event and batched appends through ``log``."""
    out: dict[str, Any] = {}
    commits0 = getattr(log, "commits", None)

    n_seq = 50 * scale
    stream = unique("seq")

    async def sequential() -> None:
        for i in range(n_seq):
            await log.append(stream, make_event(i))

    out["single_sequential"] = {
        "events": n_seq,
        "events_per_s": rate(n_seq, await timed(sequential)),
    }

    tasks, per_task = 50, 4 * scale
    stream = unique("conc")
    before = getattr(log, "commits", None)

    async def one_task(k: int) -> None:
        for i in range(per_task):
            await log.append(stream, make_event(k * per_task + i))

    async def concurrent() -> None:
        await asyncio.gather(*(one_task(k) for k in range(tasks)))

    seconds = await timed(concurrent)
    entry: dict[str, Any] = {
        "tasks": tasks,
        "events": tasks * per_task,
        "events_per_s": rate(tasks * per_task, seconds),
    }
    if before is not None:
        entry["commits"] = log.commits - before  # type: ignore[attr-defined]
    out["single_concurrent_50"] = entry

    for size, batches in ((100, 10 * scale), (1000, 2 * scale)):
        stream = unique(f"batch{size}")
        prepared = [[make_event(b * size + i) for i in range(size)] for b in range(batches)]

        async def batched(prepared: list[list[NewEvent]] = prepared, stream: str = stream) -> None:
            for batch in prepared:
                await log.append(stream, batch)

        out[f"batch_{size}"] = {
            "events": size * batches,
            "events_per_s": rate(size * batches, await timed(batched)),
        }

    stream = unique("read")
    await log.append(stream, [make_event(i) for i in range(1000)])
    reads = 5 * scale

    async def read_pages() -> None:
        for _ in range(reads):
            await log.read(stream, limit=1000)

    out["read_page_1000"] = {"events_per_s": rate(1000 * reads, await timed(read_pages))}
    if commits0 is not None:
        out["commits_total"] = log.commits - commits0  # type: ignore[attr-defined]
    return out


async def bench_append_under_reads(log: EventLog, appends: int) -> dict[str, Any]:
    """Single-append latency alone, then while two tasks read 10,000-event pages nonstop."""
    big = unique("big")
    for b in range(10):
        await log.append(big, [make_event(b * 1000 + i) for i in range(1000)])

    async def latencies(stream: str) -> list[float]:
        out = []
        for i in range(appends):
            t0 = time.perf_counter()
            await log.append(stream, make_event(i))
            out.append(time.perf_counter() - t0)
        return out

    alone = await latencies(unique("alone"))
    stop = asyncio.Event()
    pages = 0

    async def reader() -> None:
        nonlocal pages
        while not stop.is_set():
            await log.read(big, limit=10_000)
            pages += 1

    readers = [asyncio.create_task(reader()) for _ in range(2)]
    try:
        loaded = await latencies(unique("loaded"))
    finally:
        stop.set()
        await asyncio.gather(*readers)
    return {
        "alone": percentiles(alone),
        "with_2_readers_of_10000_events": percentiles(loaded),
        "pages_read": pages,
    }


# -- follow latency -----------------------------------------------------------------------

CHILD_APPENDER = textwrap.dedent(
    """
    import asyncio, sys, time
    from runstream.backends import open_backend
    from runstream.core.model import NewEvent

    async def main():
        async with open_backend(sys.argv[1]) as log:
            loop = asyncio.get_running_loop()
            print("ready", flush=True)
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                await log.append(sys.argv[2], NewEvent("n", {"t0": time.time()}))

    asyncio.run(main())
    """
)


async def bench_follow(url: str, log: EventLog, rounds: int) -> dict[str, Any]:
    """Latency from the start of an append to a follower receiving it (wall clock)."""
    out: dict[str, Any] = {}
    stream = unique("follow")
    await log.append(stream, NewEvent("n", {"t0": 0}))

    follower = log.follow(stream, after=1)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await log.append(stream, NewEvent("n", {"t0": 0}))
        await asyncio.wait_for(anext(follower), 10)
        samples.append(time.perf_counter() - t0)
    await follower.aclose()  # type: ignore[attr-defined]
    out["in_process"] = percentiles(samples)

    if url.startswith("memory"):
        out["cross_process"] = None
        return out
    stream = unique("xfollow")
    await log.append(stream, NewEvent("n", {"t0": 0}))
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "appender.py"
        script.write_text(CHILD_APPENDER)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            url,
            stream,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
            follower = log.follow(stream, after=1)
            samples = []
            for _ in range(rounds):
                # Random spacing, so appends do not fall into step with the poll interval.
                await asyncio.sleep(random.uniform(0, 0.05))
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
                event = await asyncio.wait_for(anext(follower), 10)
                samples.append(time.time() - event.data["t0"])  # type: ignore[union-attr]
            await follower.aclose()  # type: ignore[attr-defined]
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)
    out["cross_process"] = percentiles(samples)
    return out


# -- plain sqlite3, the engine's own rate ---------------------------------------------------


def raw_sqlite_rate(path: Path, size: int, batches: int, synchronous: str) -> float:
    """Events/s of plain ``executemany`` of the backend's rows, one transaction per batch.

    Same schema and pragmas as the backend, a fresh file, rows prepared up front
    exactly as the backend stores them (encoded JSON text, one timestamp per batch).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        for statement in _SCHEMA:
            conn.execute(statement)
        t = now()
        rows = [
            [(_base(1) + b * size + i + 1, e.type, e.data_json, t) for i, e in enumerate(events)]
            for b, events in enumerate(
                [make_event(b * size + i) for i in range(size)] for b in range(batches)
            )
        ]
        t0 = time.perf_counter()
        for batch in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT_EVENT, batch)
            conn.execute("COMMIT")
        return rate(size * batches, time.perf_counter() - t0)
    finally:
        conn.close()


async def bench_sqlite_vs_raw(log: SQLiteEventLog, scale: int, reps: int) -> dict[str, Any]:
    """The backend's append rate next to raw ``sqlite3`` on the same disk, interleaved.

    fsync times on a shared machine drift by several x within seconds, so each
    case alternates raw and backend runs ``reps`` times and compares medians.
    """
    out: dict[str, Any] = {}
    cases = (("single_sequential", 1, 25 * scale), ("batch_100", 100, 5 * scale))
    with tempfile.TemporaryDirectory(dir=Path(log.path).parent) as tmp:
        for label, size, batches in (*cases, ("batch_1000", 1000, scale)):
            raw_rates, backend_rates = [], []
            for rep in range(reps):
                path = Path(tmp) / f"raw-{label}-{rep}.db"
                raw_rates.append(raw_sqlite_rate(path, size, batches, log.synchronous.upper()))
                stream = unique(label)
                prepared = [[make_event(b * size + i) for i in range(size)] for b in range(batches)]
                t0 = time.perf_counter()
                for batch in prepared:
                    await log.append(stream, batch)
                backend_rates.append(rate(size * batches, time.perf_counter() - t0))
            raw, backend = statistics.median(raw_rates), statistics.median(backend_rates)
            out[label] = {
                "events": size * batches,
                "raw_events_per_s": raw,
                "backend_events_per_s": backend,
                "ratio": round(backend / raw, 3),
            }
    return out


# -- driver ---------------------------------------------------------------------------------


async def run_one(url: str, scale: int, rounds: int) -> dict[str, Any]:
    log = open_backend(url)
    async with log:
        result: dict[str, Any] = {"url": url}
        if isinstance(log, SQLiteEventLog):
            result["synchronous"] = log.synchronous
        result["append"] = await bench_backend(log, scale)
        result["follow"] = await bench_follow(url, log, rounds)
        result["append_latency_under_reads"] = await bench_append_under_reads(log, rounds)
        if isinstance(log, SQLiteEventLog):
            result["vs_raw_sqlite"] = await bench_sqlite_vs_raw(log, scale, reps=5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="*", help="backend URLs (default: memory:// and temp sqlite)")
    parser.add_argument("--redis", action="append", default=[], help="a redis:// URL to add")
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args()
    scale = 2 if args.quick else 20
    rounds = 20 if args.quick else 200

    with tempfile.TemporaryDirectory() as tmp:
        urls = list(args.urls) or ["memory://", f"sqlite:///{tmp}/bench.db"]
        urls += args.redis
        report: dict[str, Any] = {
            "env": {
                "python": platform.python_version(),
                "sqlite": sqlite3.sqlite_version,
                "cpus": os.cpu_count(),
                "payload": {"type": "stdout", "data_bytes": len(make_event(0).data_json)},
                "scale": scale,
            },
            "backends": {},
        }
        for url in urls:
            name = url.split(":", 1)[0]
            key = name if name not in report["backends"] else url
            report["backends"][key] = asyncio.run(run_one(url, scale, rounds))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
