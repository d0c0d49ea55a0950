"""Redis backend: append rate next to raw pipelined XADD, follow latency, memory per event.

Usage::

    .venv/bin/python bench/redis_append.py                 # starts a private redis-server
    .venv/bin/python bench/redis_append.py --fsync always  # AOF fsync per write (default everysec)
    .venv/bin/python bench/redis_append.py --redis redis://127.0.0.1:7777/0   # use a server
    .venv/bin/python bench/redis_append.py --quick

Prints one JSON object. ``vs_raw_xadd`` compares, interleaved and over the same
entries (same fields ``t``/``d``/``ts``, same explicit ``<n>-0`` ids, data
already JSON-encoded), the backend's ``append`` with plain redis-py doing what a
hand-rolled producer would: one ``XADD`` per event, a batch sent as one
pipeline (``transaction=False``), so both cost one round trip per batch. The
backend additionally checks/updates metadata, the producer rule and publishes a
wake-up inside its Lua script; the ratio is the price of that. ``redis_benchmark``
is ``redis-benchmark -P 100`` doing XADD on the same server, for scale. Generic
throughput and follow latency come from ``bench/append.py``'s functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import append as common  # bench/append.py: shared helpers, generic benches

from runstream.backends.redis.log import RedisEventLog
from runstream.core.model import NewEvent, now


@contextmanager
def private_redis(fsync: str) -> Iterator[str]:
    """A throwaway redis-server on a free port (AOF on, ``appendfsync`` = ``fsync``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        # fmt: off
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
             "--appendonly", "yes", "--appendfsync", fsync, "--logfile", f"{tmp}/redis.log"],
            stdout=subprocess.DEVNULL,
        )
        # fmt: on
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                        c.sendall(b"PING\r\n")
                        if c.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)  # waiting for a child process to listen; nothing to await
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def batches_of(size: int, count: int) -> list[list[NewEvent]]:
    return [[common.make_event(b * size + i) for i in range(size)] for b in range(count)]


async def raw_xadd(client: aioredis.Redis, batches: list[list[NewEvent]]) -> float:
    """Events/s of plain XADD of the same entries: one pipeline (one round trip) per batch."""
    key = f"raw:{{{uuid.uuid4().hex}}}:log"
    offset = 0
    ts = str(now())
    t0 = time.perf_counter()
    for batch in batches:
        if len(batch) == 1:
            offset += 1
            e = batch[0]
            await client.xadd(key, {"t": e.type, "d": e.data_json, "ts": ts}, id=f"{offset}-0")
            continue
        async with client.pipeline(transaction=False) as pipe:
            for e in batch:
                offset += 1
                pipe.xadd(key, {"t": e.type, "d": e.data_json, "ts": ts}, id=f"{offset}-0")
            await pipe.execute()
    seconds = time.perf_counter() - t0
    await client.delete(key)
    return common.rate(offset, seconds)


async def backend_append(log: RedisEventLog, batches: list[list[NewEvent]]) -> float:
    stream = common.unique("vsraw")
    t0 = time.perf_counter()
    for batch in batches:
        await log.append(stream, batch)
    seconds = time.perf_counter() - t0
    await log.delete(stream)
    return common.rate(sum(map(len, batches)), seconds)


async def bench_vs_raw(log: RedisEventLog, url: str, scale: int, reps: int) -> dict[str, Any]:
    """Backend append next to raw XADD, alternating runs and comparing medians.

    For batches, each repetition also runs ``redis-benchmark -P <size>`` for the
    same number of XADDs, so the server's own ceiling is measured under the same
    load as the other two.
    """
    out: dict[str, Any] = {}
    client = aioredis.Redis.from_url(url)
    try:
        for label, size, count in (
            ("single_sequential", 1, 200 * scale),
            ("batch_100", 100, 20 * scale),
            ("batch_1000", 1000, 4 * scale),
        ):
            raw_rates, backend_rates, bench_rates = [], [], []
            for _ in range(reps):
                batches = batches_of(size, count)
                raw_rates.append(await raw_xadd(client, batches))
                backend_rates.append(await backend_append(log, batches))
                if size > 1:
                    measured = redis_benchmark(url, size * count, pipeline=size)
                    if measured and "requests_per_s" in measured:
                        bench_rates.append(measured["requests_per_s"])
            raw, backend = statistics.median(raw_rates), statistics.median(backend_rates)
            entry: dict[str, Any] = {
                "events": size * count,
                "raw_xadd_events_per_s": raw,
                "backend_events_per_s": backend,
                "ratio": round(backend / raw, 3),
            }
            if bench_rates:
                ceiling = statistics.median(bench_rates)
                entry["redis_benchmark_xadd_per_s"] = ceiling
                entry["ratio_vs_redis_benchmark"] = round(backend / ceiling, 3)
            out[label] = entry
    finally:
        await client.aclose()
    return out


def redis_benchmark(url: str, requests: int, pipeline: int = 100) -> dict[str, Any] | None:
    """``redis-benchmark -P <pipeline>`` XADD rate (auto ids, same payload), one client."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    data = common.make_event(0).data_json
    key = f"rb:{{{uuid.uuid4().hex}}}"
    # fmt: off
    args = [binary, "-h", host, "-p", port, "-n", str(requests), "-P", str(pipeline), "-c", "1",
            "-q", "XADD", key, "*", "t", "stdout", "d", data, "ts", "0"]
    # fmt: on
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    subprocess.run([binary.replace("-benchmark", "-cli"), "-h", host, "-p", port, "DEL", key],
                   capture_output=True, check=False)  # fmt: skip
    # The quiet output ends its (carriage-return-updated) line with "<n> requests per second".
    found = re.findall(r"([\d.]+) requests per second", result.stdout)
    if found:
        return {
            "command": f"XADD * (pipeline {pipeline}, 1 client)",
            "requests_per_s": float(found[-1]),
        }
    return {"error": result.stderr.strip() or result.stdout.strip()}


async def memory_per_event(log: RedisEventLog, url: str, events: int) -> dict[str, Any]:
    """Bytes per stored event (``MEMORY USAGE`` of the stream key) for the bench payload."""
    stream = common.unique("mem")
    for batch in batches_of(1000, events // 1000):
        await log.append(stream, batch)
    client = aioredis.Redis.from_url(url)
    try:
        log_key, meta_key, _ = log.keys(stream)
        used = await client.memory_usage(log_key, samples=0) or 0
        meta = await client.memory_usage(meta_key, samples=0) or 0
    finally:
        await client.aclose()
    await log.delete(stream)
    return {
        "events": events,
        "data_bytes": len(common.make_event(0).data_json),
        "stream_bytes": used,
        "bytes_per_event": round(used / events, 1),
        "meta_bytes": meta,
    }


async def run(url: str, scale: int, rounds: int, reps: int) -> dict[str, Any]:
    result: dict[str, Any] = {"url": url}
    async with RedisEventLog.from_url(f"{url}?prefix=bench{uuid.uuid4().hex[:6]}") as log:
        result["vs_raw_xadd"] = await bench_vs_raw(log, url, scale, reps)
        result["append"] = await common.bench_backend(log, scale)
        result["follow"] = await common.bench_follow(
            f"{url}?prefix={log.options.prefix}", log, rounds
        )
        result["memory"] = await memory_per_event(log, url, 10_000)
    result["redis_benchmark"] = redis_benchmark(url, 20_000 * scale)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="use this redis:// URL instead of a private server")
    parser.add_argument("--fsync", default="everysec", choices=["always", "everysec", "no"])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args()
    scale, rounds, reps = (1, 20, 3) if args.quick else (5, 200, 5)
    report: dict[str, Any] = {
        "env": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "payload": {"type": "stdout", "data_bytes": len(common.make_event(0).data_json)},
            "scale": scale,
        }
    }
    if args.redis:
        report["env"]["server"] = "given"
        report["redis"] = asyncio.run(run(args.redis, scale, rounds, reps))
    else:
        report["env"]["server"] = f"private redis-server, AOF appendfsync {args.fsync}"
        with private_redis(args.fsync) as url:
            report["redis"] = asyncio.run(run(url, scale, rounds, reps))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
