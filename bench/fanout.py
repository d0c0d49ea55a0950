"""Fan-out: N SSE subscribers on one stream, runstream next to a conventional baseline.

Usage::

    .venv/bin/python bench/fanout.py                      # 1,000 subscribers, 20 events/s
    .venv/bin/python bench/fanout.py --subscribers 200 --rate 20 --duration 5
    .venv/bin/python bench/fanout.py --quick              # small and fast, for a smoke run

Prints one JSON object. Both servers run as separate processes on the same
private ``redis-server`` (started here on a free port, AOF off) and are driven
by the same load generator in the same run:

* **runstream** — ``runstream serve --backend redis://...``: one backend reader
  per stream fanning out in memory, batched writes, bounded buffers.
* **baseline** — the way such endpoints are commonly written: FastAPI +
  ``sse-starlette``'s ``EventSourceResponse`` over an async generator that loops
  on ``XREAD BLOCK`` for each subscriber (one Redis connection per subscriber),
  with a correctly advancing cursor. Bench-only dependency: ``sse-starlette``.

The load generator is ``--procs`` worker processes of raw asyncio HTTP/1.0
clients (no client library in the measured path). The publisher POSTs one event
at a time at ``--rate`` events/s, each carrying its send time; a delivery's
latency is receive time minus send time. Figures:

* ``deliveries_per_s`` — events received by all subscribers during the
  measurement window, per second (offered: subscribers x rate);
* ``latency_ms`` p50/p99 over those deliveries (end to end: POST to receipt);
* ``memory_per_idle_subscriber_kb`` — server RSS growth with N connected idle
  subscribers, divided by N (Redis's own memory not included);
* ``resume_10k_ms`` — one client reconnecting with 10,000 missed events: time
  from request to the last of them received (median of 5).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request  # resolved by FastAPI from this module's globals

ROOT = Path(__file__).resolve().parent.parent
STREAM = "fan"
RESUME_EVENTS = 10_000


# -- the baseline server ----------------------------------------------------------


def baseline_app(redis_url: str) -> Any:
    """FastAPI + sse-starlette + one XREAD BLOCK loop per subscriber, written the usual way."""
    import redis.asyncio as aioredis
    from fastapi import FastAPI

    # Imported only in the baseline's own process (it is not a runstream dependency).
    from sse_starlette.sse import EventSourceResponse

    app = FastAPI()
    pool = aioredis.ConnectionPool.from_url(
        redis_url, max_connections=50_000, decode_responses=True
    )
    r = aioredis.Redis(connection_pool=pool)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/streams/{stream}/events")
    async def append(stream: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        items = body if isinstance(body, list) else [body]
        async with r.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.xadd(
                    f"bl:{stream}",
                    {
                        "type": item["type"],
                        "data": json.dumps(item.get("data"), separators=(",", ":")),
                    },
                )
            ids = await pipe.execute()
        return {"first_id": ids[0], "last_id": ids[-1]}

    @app.get("/v1/streams/{stream}/events")
    async def events(stream: str, request: Request) -> Any:
        key = f"bl:{stream}"
        last = request.headers.get("last-event-id") or request.query_params.get("after") or "0-0"
        if last == "now":
            tail = await r.xrevrange(key, count=1)
            last = tail[0][0] if tail else "0-0"

        async def generate() -> Any:
            cursor = last
            while True:
                if await request.is_disconnected():
                    return
                found = await r.xread({key: cursor}, block=15_000, count=100)
                for _, entries in found or ():
                    for entry_id, fields in entries:
                        cursor = entry_id
                        yield {"id": entry_id, "event": fields["type"], "data": fields["data"]}

        return EventSourceResponse(generate(), ping=15)

    return app


def serve_baseline(port: int, redis_url: str) -> None:
    import uvicorn

    uvicorn.run(
        baseline_app(redis_url), host="127.0.0.1", port=port, log_level="warning", backlog=4096
    )


# -- the load generator (worker processes) ------------------------------------------


def _request(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    # HTTP/1.0: the body comes unchunked and the connection closes at its end.
    return (
        f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n{extra}\r\n"
    ).encode()


MARK = b'data: {"t":'


class Stats:
    def __init__(self, target: int) -> None:
        self.target = target
        self.connected = 0
        self.errors = 0
        self.window = (float("inf"), float("-inf"))
        self.latencies: list[float] = []
        self.ready = asyncio.Event()


async def _subscriber(
    host: str, port: int, path: str, stats: Stats, gate: asyncio.Semaphore
) -> None:
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            writer.write(_request(host, port, path, {}))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            stats.errors += 1
            return
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        stats.errors += 1
        writer.close()
        return
    stats.connected += 1
    if stats.connected == stats.target:
        stats.ready.set()
    rest = b""
    try:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            now = time.time()
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1 :]
            start, end = stats.window
            if not start <= now <= end:
                continue
            pos = data.find(MARK, 0, cut)
            while pos >= 0:
                comma = data.find(b",", pos)
                stats.latencies.append(now - float(data[pos + len(MARK) : comma]))
                pos = data.find(MARK, comma, cut)
    except (ConnectionError, OSError):
        stats.errors += 1
    finally:
        writer.close()


async def _worker_main(port: int, n: int) -> None:
    """Hold ``n`` subscribers; protocol on stdin/stdout with the controller (one line each)."""
    stats = Stats(n)
    gate = asyncio.Semaphore(64)
    path = f"/v1/streams/{STREAM}/events?after=now"
    tasks = [
        asyncio.ensure_future(_subscriber("127.0.0.1", port, path, stats, gate)) for _ in range(n)
    ]
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):  # report how many did connect
        await asyncio.wait_for(stats.ready.wait(), timeout=180)
    print(json.dumps({"connected": stats.connected, "errors": stats.errors}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)  # "<start> <end> <drain>"
    start, end, drain = (float(x) for x in line.split())
    stats.window = (start, end)
    await asyncio.sleep(max(0.0, end - time.time()) + drain)
    lat = stats.latencies
    print(
        json.dumps(
            {
                "connected": stats.connected,
                "errors": stats.errors,
                "deliveries": len(lat),
                "latencies": lat,
            }
        ),
        flush=True,
    )
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the controller -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "20000",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def start_server(
    kind: str, redis_url: str, backend: str = "redis"
) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if kind == "runstream":
        env.update(
            {
                "RUNSTREAM_LOG_LEVEL": "warning",
                "RUNSTREAM_MAX_SUBSCRIBERS_PER_STREAM": "100000",
                "RUNSTREAM_MAX_SUBSCRIBERS": "100000",
            }
        )
        if backend == "redis":
            backend = f"{redis_url}?prefix=bench{uuid.uuid4().hex[:8]}"
        cmd = [
            sys.executable,
            "-m",
            "runstream.cli.main",
            "serve",
            "--backend",
            backend,
            "--port",
            str(port),
        ]
    else:
        cmd = [sys.executable, __file__, "--serve-baseline", str(port), "--redis", redis_url]
    # Server logs go to a file: a pipe nobody reads would block the server once full.
    with tempfile.NamedTemporaryFile(prefix=f"fanout-{kind}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log.name  # type: ignore[attr-defined]
    _wait_http(port, proc)
    return proc, port


async def _publish(
    port: int, rate: float, start: float, until: float, pid: int
) -> tuple[int, float, int]:
    """POST one event every 1/rate s, without waiting for earlier POSTs (at most 64 in flight).

    Returns the events published inside [start, until], the server's CPU seconds
    then, and how many POSTs failed (error status or no answer within 60 s).
    """
    import httpx

    interval = 1.0 / rate
    failures = [0]
    gate = asyncio.Semaphore(64)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits
    ) as http:

        async def post(i: int) -> None:
            async with gate:
                try:
                    r = await http.post(
                        f"/v1/streams/{STREAM}/events",
                        json={"type": "tick", "data": {"t": time.time(), "i": i}},
                    )
                    r.raise_for_status()
                except httpx.HTTPError:
                    failures[0] += 1

        tasks = []
        next_at = time.monotonic()
        i = 0
        cpu_start: float | None = None
        in_window = 0
        while time.time() < until:
            if cpu_start is None and time.time() >= start:
                cpu_start = _cpu_s(pid)
            if cpu_start is not None:
                in_window += 1
            tasks.append(asyncio.ensure_future(post(i)))
            i += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        cpu = _cpu_s(pid) - (cpu_start or 0.0)
        await asyncio.gather(*tasks)
    return in_window, cpu, failures[0]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _resume_once(port: int, stream: str, expect: int) -> float:
    """Time from request to receiving ``expect`` events from the start of ``stream``."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(_request("127.0.0.1", port, f"/v1/streams/{stream}/events?after=0", {}))
    await writer.drain()
    seen = 0
    rest = b""
    while seen < expect:
        chunk = await asyncio.wait_for(reader.read(1 << 18), timeout=60)
        if not chunk:
            break
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        # Whole lines only (an event line never straddles ``cut``); sse-starlette ends
        # lines with CRLF, runstream with LF.
        seen += data.count(b"event: r\n", 0, cut) + data.count(b"event: r\r\n", 0, cut)
    took = time.perf_counter() - start
    writer.close()
    if seen < expect:
        raise RuntimeError(f"resume got {seen} of {expect} events")
    return took * 1000


async def _prepare_resume(port: int, stream: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for b in range(RESUME_EVENTS // 1000):
            body = [
                {"type": "r", "data": {"i": b * 1000 + i, "pad": "x" * 100}} for i in range(1000)
            ]
            r = await http.post(f"/v1/streams/{stream}/events", json=body)
            r.raise_for_status()


def run_one(kind: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    proc, port = start_server(kind, redis_url, args.runstream_backend)
    workers: list[subprocess.Popen[str]] = []
    try:
        httpx.post(
            f"http://127.0.0.1:{port}/v1/streams/{STREAM}/events",
            json={"type": "hello", "data": {"t": 0, "i": -1}},
            timeout=10,
        ).raise_for_status()
        time.sleep(0.5)
        rss_before = _rss_kb(proc.pid)
        per = [
            args.subscribers // args.procs + (1 if i < args.subscribers % args.procs else 0)
            for i in range(args.procs)
        ]
        t_connect = time.monotonic()
        for n in per:
            workers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(port), str(n)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        connected = errors = 0
        for w in workers:
            assert w.stdout is not None
            first = json.loads(w.stdout.readline())
            connected += first["connected"]
            errors += first["errors"]
        connect_s = time.monotonic() - t_connect
        time.sleep(1.0)
        rss_idle = _rss_kb(proc.pid)
        start = time.time() + args.warmup
        end = start + args.duration
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(f"{start} {end} {args.drain}\n")
            w.stdin.flush()
        published, cpu_window, publish_failures = asyncio.run(
            _publish(port, args.rate, start, end, proc.pid)
        )
        latencies: list[float] = []
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if not line:
                errors += 1
                continue
            result = json.loads(line)
            latencies.extend(result["latencies"])
            errors += result["errors"]
        for w in workers:
            w.wait(timeout=30)
        latencies.sort()

        def pct(p: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

        return {
            "subscribers_connected": connected,
            "connect_s": round(connect_s, 2),
            "errors": errors,
            "published_per_s": round(published / args.duration, 1),
            "publish_failures": publish_failures,
            "offered_deliveries_per_s": round(connected * published / args.duration, 1),
            "deliveries_per_s": round(len(latencies) / args.duration, 1),
            "server_cpu_share_in_window": round(cpu_window / args.duration, 2),
            "server_cpu_ms_per_1k_deliveries": round(cpu_window * 1e6 / max(1, len(latencies)), 1),
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0)},
            "memory_per_idle_subscriber_kb": round((rss_idle - rss_before) / max(1, connected), 2),
            "server_rss_mb": {
                "before": round(rss_before / 1024, 1),
                "idle_subscribers": round(rss_idle / 1024, 1),
            },
            "resume_10k_ms": run_resume(kind, redis_url, args),
        }
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        stop_server(kind, proc)


def run_resume(kind: str, redis_url: str, args: argparse.Namespace) -> dict[str, float]:
    """On a fresh server: 10,000 missed events read from the start, 5 times."""
    proc, port = start_server(kind, redis_url, args.runstream_backend)
    try:
        stream = f"resume{uuid.uuid4().hex[:6]}"
        asyncio.run(_prepare_resume(port, stream))
        resumes, resume_cpu = [], []
        for _ in range(5):
            before = _cpu_s(proc.pid)
            resumes.append(asyncio.run(_resume_once(port, stream, RESUME_EVENTS)))
            resume_cpu.append((_cpu_s(proc.pid) - before) * 1000)
        return {
            "median": round(statistics.median(resumes), 1),
            "min": round(min(resumes), 1),
            "server_cpu_ms_median": round(statistics.median(resume_cpu), 1),
        }
    finally:
        stop_server(kind, proc)


def stop_server(kind: str, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then report any traceback the server logged (to stderr)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log_path = Path(proc.log_path)  # type: ignore[attr-defined]
    text = log_path.read_text(errors="replace")
    log_path.unlink()
    errors_logged = text.count("Traceback")
    if errors_logged:
        first = text[text.index("Traceback") :][:1500]
        print(f"{kind} server logged {errors_logged} tracebacks; first:\n{first}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="events/s published")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--drain",
        type=float,
        default=3.0,
        help="seconds after the window for late deliveries of in-window events",
    )
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--runstream-backend",
        default="redis",
        help="'redis' (the same redis-server as the baseline) or a backend URL",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker_main(*args.worker))
        return
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, args.redis)
        return
    if args.quick:
        args.subscribers, args.rate, args.duration, args.warmup = 100, 20.0, 3.0, 1.0
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, redis_url = start_redis(Path(tmp))
        try:
            results: dict[str, Any] = {
                "bench": "fanout",
                "config": {
                    "subscribers": args.subscribers,
                    "rate": args.rate,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "load_generator_procs": args.procs,
                },
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg(),
                },
            }
            results["runstream"] = run_one("runstream", redis_url, args)
            print(json.dumps({"runstream": results["runstream"]}), file=sys.stderr)
            if not args.skip_baseline:
                results["baseline"] = run_one("baseline", redis_url, args)
                rs, bl = results["runstream"], results["baseline"]
                results["comparison"] = {
                    "deliveries_ratio": round(rs["deliveries_per_s"] / bl["deliveries_per_s"], 2)
                    if bl["deliveries_per_s"]
                    else None,
                    "p99_ratio": round(rs["latency_ms"]["p99"] / bl["latency_ms"]["p99"], 3)
                    if rs["latency_ms"]["p99"] and bl["latency_ms"]["p99"]
                    else None,
                }
        finally:
            redis_proc.terminate()
            redis_proc.wait()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
