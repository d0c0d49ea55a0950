"""Durable Streams: runstream next to the Node reference server, same workload, same run.

Usage::

    .venv/bin/python bench/durable.py            # all four servers
    .venv/bin/python bench/durable.py --quick    # small and fast, for a smoke run

Servers (each its own process on a free loopback port, one at a time):

* ``ref-memory`` / ``ref-file`` — npm ``@durable-streams/server`` 0.3.7 (the protocol's
  Node reference server; ``bench/durable/package.json``), in memory and file-backed
  (log files + LMDB);
* ``runstream-memory`` / ``runstream-sqlite`` — ``runstream serve`` on ``memory://`` and
  on a SQLite file (``synchronous=full``: every acknowledged append is on disk).

Workloads (``/v1/stream/...``, ``application/json`` streams):

* ``append`` — autocannon 9.0.0, 32 connections, one message per POST for
  ``--seconds``: requests/s and latency p50/p99 (ms), non-2xx counted;
* ``catch_up_10k_ms`` — reading a 10,000-message stream from ``-1`` to up-to-date
  (following ``Stream-Next-Offset``; the stream was written 100 messages per POST):
  median of 5, in ms;
* ``fanout`` — 1,000 SSE readers (``offset=now&live=sse``) on one stream; then
  ``--messages`` appends, one message per POST, at most 8 in flight: deliveries/s
  (all readers' messages over the time from the first POST to the last delivery)
  and delivery latency p50/p99 (POST sent to message parsed by a reader).

Prints one JSON object. The load generators (autocannon, this process's readers) run
on the same machine as the server, and the machine may be shared with other work:
compare figures of one run with each other, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
NPM_DIR = HERE / "durable"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def npm_ready() -> None:
    if not (NPM_DIR / "node_modules" / "autocannon").is_dir():
        # npm's report to stderr: stdout carries this bench's JSON only.
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NPM_DIR, check=True, stdout=sys.stderr
        )


@contextlib.contextmanager
def server(kind: str, workdir: Path) -> Iterator[str]:
    port = free_port()
    if kind.startswith("ref"):
        args = ["node", str(NPM_DIR / "ref_server.mjs"), str(port)]
        if kind == "ref-file":
            args.append(str(workdir / "ref-data"))
    else:
        backend = "memory://" if kind == "runstream-memory" else f"sqlite:///{workdir / 'rs.db'}"
        args = [PY, "-m", "runstream.cli.main", "serve", "--backend", backend]
        args += ["--port", str(port), "--workers", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
    env["RUNSTREAM_LOG_LEVEL"] = "warning"
    log = (workdir / f"{kind}.log").open("wb")
    proc = subprocess.Popen(args, cwd=NPM_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                httpx.put(f"{url}/v1/stream/ready-probe", headers={"Content-Type": "text/plain"})
                break
            assert proc.poll() is None and time.monotonic() < deadline, f"{kind} did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


JSON_TYPE = {"Content-Type": "application/json"}


def bench_append(url: str, seconds: int) -> dict[str, Any]:
    target = f"{url}/v1/stream/bench-append"
    httpx.put(target, headers=JSON_TYPE).raise_for_status()
    cannon = NPM_DIR / "node_modules" / ".bin" / "autocannon"
    out = subprocess.run(
        [
            *(str(cannon), "-j", "-c", "32", "-d", str(seconds), "-m", "POST"),
            *("-H", "content-type=application/json", "-b", '{"n":1}', target),
        ],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    result = json.loads(out)
    return {
        "requests_per_s": round(result["requests"]["average"], 1),
        "latency_ms_p50": result["latency"]["p50"],
        "latency_ms_p99": result["latency"]["p99"],
        "non_2xx": result["non2xx"],
        "errors": result["errors"] + result["timeouts"],
    }


def bench_catch_up(url: str, total: int) -> dict[str, Any]:
    target = f"{url}/v1/stream/bench-catchup"
    with httpx.Client(timeout=30) as http:
        http.put(target, headers=JSON_TYPE).raise_for_status()
        for start in range(0, total, 100):
            batch = [{"i": i, "pad": "x" * 64} for i in range(start, min(total, start + 100))]
            http.post(target, headers=JSON_TYPE, json=batch).raise_for_status()
        times = []
        for _ in range(5):
            began = time.perf_counter()
            got, offset = 0, "-1"
            while True:
                r = http.get(target, params={"offset": offset})
                r.raise_for_status()
                got += len(r.json())
                offset = r.headers["stream-next-offset"]
                if r.headers.get("stream-up-to-date") == "true":
                    break
            times.append((time.perf_counter() - began) * 1000)
            assert got == total, f"read {got} of {total}"
    return {"catch_up_10k_ms": round(statistics.median(times), 1)}


class Tally:
    """What all readers saw: live readers, messages, latencies; events when complete."""

    def __init__(self, readers: int, messages: int) -> None:
        self.readers = readers
        self.expected = readers * messages
        self.live = 0
        self.delivered = 0
        self.latencies: list[float] = []
        self.all_live = asyncio.Event()
        self.all_delivered = asyncio.Event()


class Reader(asyncio.Protocol):
    """A bare SSE reader: counts messages and records latencies from their send times."""

    def __init__(self, tally: Tally) -> None:
        self.buffer = b""
        self.tally = tally
        self.live = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        now = time.time()
        tally = self.tally
        for event in events:
            if b"event: control" in event:
                if not self.live:
                    self.live = True
                    tally.live += 1
                    if tally.live == tally.readers:
                        tally.all_live.set()
                continue
            payload = b"\n".join(
                line[5:] for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if payload:
                items = json.loads(payload)
                tally.delivered += len(items)
                tally.latencies += [now - item["t"] for item in items]
                if tally.delivered >= tally.expected:
                    tally.all_delivered.set()


async def fanout(url: str, readers: int, messages: int) -> dict[str, Any]:
    target = f"{url}/v1/stream/bench-fanout"
    host, port = url.removeprefix("http://").split(":")
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=8)) as http:
        (await http.put(target, headers=JSON_TYPE)).raise_for_status()
        tally = Tally(readers, messages)
        transports = []
        loop = asyncio.get_running_loop()
        request = (
            f"GET /v1/stream/bench-fanout?offset=now&live=sse HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        for _ in range(readers):
            transport, _proto = await loop.create_connection(lambda: Reader(tally), host, int(port))
            transport.write(request)
            transports.append(transport)
        await asyncio.wait_for(tally.all_live.wait(), 60)  # every reader is live
        began = time.time()
        gate = asyncio.Semaphore(8)

        async def post(i: int) -> None:
            async with gate:
                r = await http.post(target, headers=JSON_TYPE, json={"i": i, "t": time.time()})
                r.raise_for_status()

        await asyncio.gather(*(post(i) for i in range(messages)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.all_delivered.wait(), 60)
        ended = time.time()
        for transport in transports:
            transport.close()
    lat = sorted(tally.latencies)
    return {
        "readers": readers,
        "messages": messages,
        "delivered": tally.delivered,
        "deliveries_per_s": round(tally.delivered / (ended - began), 1),
        "latency_ms_p50": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "latency_ms_p99": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
    }


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="append duration per server")
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--catch-up", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--servers", default="ref-memory,ref-file,runstream-memory,runstream-sqlite"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.readers, args.messages = 3, 100, 50
    if shutil.which("node") is None:
        sys.exit("bench/durable.py needs Node.js and npm")
    npm_ready()
    raise_fd_limit()  # inherited by the servers: 1,000 readers need 1,000 sockets each side
    results: dict[str, Any] = {
        "tools": {"reference": "@durable-streams/server@0.3.7", "autocannon": "9.0.0"},
        "note": "load generators share the machine with the server; the machine may be shared",
        "cpus": os.cpu_count(),
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as tmp:
        for kind in args.servers.split(","):
            workdir = Path(tmp) / kind
            workdir.mkdir()
            with server(kind, workdir) as url:
                figures = {"append": bench_append(url, args.seconds)}
                figures.update(bench_catch_up(url, args.catch_up))
                figures["fanout"] = asyncio.run(fanout(url, args.readers, args.messages))
            results["servers"][kind] = figures
            print(f"{kind}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
