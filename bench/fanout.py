"""Fan-out: N SSE subscribers on one stream (or many), runstream next to a conventional baseline.

Usage::

    .venv/bin/python bench/fanout.py                      # 1,000 subscribers, 20 events/s
    .venv/bin/python bench/fanout.py --subscribers 1000 --rate 500 --no-resume   # capacity
    .venv/bin/python bench/fanout.py --subscribers 1000 --streams 1000 --rate 200
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

With ``--streams S`` subscriber ``i`` follows stream ``i % S`` and the events
go round robin over the streams (``--streams 1000 --subscribers 1000``: a
thousand streams with one subscriber each).

The load generator is ``--procs`` worker processes holding the subscribers as
bare asyncio protocols over HTTP/1.0 (no client library, no object per event).
Every subscriber counts the events it receives; every ``--sample-every``-th one
(about 100 in all by default) also parses each event's send time, so the
generator stays cheap at hundreds of thousands of deliveries per second and
the latencies are those of whole streams. Its collector is off while measuring
(its own pauses would read as latency). The publisher POSTs one event at a time
at ``--rate`` events/s over raw keep-alive connections, at most 64 in flight,
each event carrying its send time; a delivery's latency is receive time minus
send time. Figures:

* ``deliveries_per_s`` — events received by all subscribers during the
  measurement window, per second (offered: subscribers per stream x events
  published per second);
* ``latency_ms`` p50/p99/max over the sampled subscribers' deliveries in the
  window (end to end: POST sent to event received; 0.1 ms buckets under 100 ms,
  1 ms under 10 s);
* ``server_cpu_share_in_window`` and ``load_generator_cpu_share_in_window`` —
  cores used by each while measuring (a saturated generator would show here);
* ``dropped_connections`` — responses the server ended while measuring (a slow
  consumer cut, say; the bench does not reconnect);
* ``memory_per_idle_subscriber_kb`` — server RSS growth with N connected idle
  subscribers, divided by N (Redis's own memory not included);
* ``resume_10k_ms`` — one client reconnecting with 10,000 missed events: time
  from request to the last of them received (median of 5; skip with
  ``--no-resume``).

``--server-cpus 0`` pins the servers to those CPUs and everything else (this
process, the publisher, the generator, redis-server) to the others: with more
events offered than one server core can deliver, the server is the bottleneck
and the generator visibly is not (its CPU share stays below its cores). That is
how ``--compare-processes 2`` is measured on a machine with too few cores for
two server processes *and* a generator: both processes share the pinned core,
so the ratio is the efficiency of running N processes (what N processes on N
free cores would deliver is N times that ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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
                # Below redis-py's default 5 s socket timeout, or an idle stream's read fails.
                found = await r.xread({key: cursor}, block=2_000, count=100)
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
"""Start of the data line of every published event (both servers write it as is)."""


def _bucket(ms: float) -> float:
    """Histogram bucket of a latency: 0.1 ms under 100 ms, 1 ms under 10 s, else 100 ms."""
    if ms < 100:
        return round(ms, 1)
    if ms < 10_000:
        return float(round(ms))
    return round(ms, -2)


class Stats:
    """What one load-generator process saw: counts for all subscribers, latencies for a sample."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.connected = 0
        self.errors = 0
        self.dropped = 0  # connections the server closed while measuring
        self.window = (float("inf"), float("-inf"))
        self.deliveries = 0
        self.sampled_deliveries = 0
        self.histogram: dict[float, int] = {}
        self.ready = asyncio.Event()


class Subscriber(asyncio.Protocol):
    """One SSE subscriber as a bare protocol: no stream reader, no per-event objects.

    Every subscriber counts the events it receives (``bytes.count`` of the data
    line's start, in C). A *sampled* subscriber also parses each event's send
    time and records its latency. Sampling every k-th subscriber keeps the
    generator's own cost per delivery small, so at high rates it measures the
    server rather than itself; the latencies are those of complete streams,
    not of a subset of events.
    """

    def __init__(self, request: bytes, stats: Stats, sampled: bool) -> None:
        self.request = request
        self.stats = stats
        self.sampled = sampled
        self.head = b""
        self.open = False
        self.carry = b""  # counted subscribers: the last bytes, in case MARK straddles reads
        self.rest = b""  # sampled subscribers: the unfinished last line
        self.answered = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = b" 200 " in self.head[: self.head.find(b"\r\n")]
            data, self.head, self.open = self.head[end + 4 :], b"", True
            if not self.answered.done():
                self.answered.set_result(ok)
            if not ok:
                self.transport.close()
                return
        now = time.time()
        stats = self.stats
        start, stop = stats.window
        in_window = start <= now <= stop
        if not self.sampled:
            if in_window:
                joined = self.carry + data
                stats.deliveries += joined.count(MARK)
                self.carry = joined[-(len(MARK) - 1) :]
            else:
                self.carry = data[-(len(MARK) - 1) :]
            return
        joined = self.rest + data
        cut = joined.rfind(b"\n")
        if cut < 0:
            self.rest = joined
            return
        self.rest = joined[cut + 1 :]
        if not in_window:
            return
        hist, n = stats.histogram, 0
        pos = joined.find(MARK, 0, cut)
        while pos >= 0:
            comma = joined.find(b",", pos)
            key = _bucket((now - float(joined[pos + len(MARK) : comma])) * 1000)
            hist[key] = hist.get(key, 0) + 1
            n += 1
            pos = joined.find(MARK, comma, cut)
        stats.deliveries += n
        stats.sampled_deliveries += n

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)


async def _subscriber(
    port: int, path: str, stats: Stats, gate: asyncio.Semaphore, sampled: bool
) -> None:
    loop = asyncio.get_running_loop()
    request = _request("127.0.0.1", port, path, {})
    async with gate:
        try:
            transport, proto = await loop.create_connection(
                lambda: Subscriber(request, stats, sampled), "127.0.0.1", port
            )
            ok = await proto.answered
        except OSError:
            stats.errors += 1
            return
    if not ok:
        stats.errors += 1
        transport.close()
        return
    stats.connected += 1
    if stats.connected == stats.target:
        stats.ready.set()
    try:
        await proto.closed
        stats.dropped += 1  # the server ended the response; we never do while measuring
    finally:
        transport.close()


async def _worker_main(port: int, n: int, first: int, streams: int, sample_every: int) -> None:
    """Hold subscribers ``first .. first+n-1``; subscriber ``i`` follows stream ``i % streams``.

    Protocol with the controller on stdin/stdout, one JSON line each way.
    """
    stats = Stats(n)
    gate = asyncio.Semaphore(64)
    tasks = [
        asyncio.ensure_future(
            _subscriber(
                port,
                f"/v1/streams/{stream_name(i % streams, streams)}/events?after=now",
                stats,
                gate,
                i % sample_every == 0,
            )
        )
        for i in range(first, first + n)
    ]
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):  # report how many did connect
        await asyncio.wait_for(stats.ready.wait(), timeout=180)
    print(json.dumps({"connected": stats.connected, "errors": stats.errors}), flush=True)
    # The generator's own collector pauses would show up as latency: none while measuring.
    gc.collect()
    gc.freeze()
    gc.disable()
    line = await loop.run_in_executor(None, sys.stdin.readline)  # "<start> <end> <drain>"
    start, end, drain = (float(x) for x in line.split())
    stats.window = (start, end)
    await asyncio.sleep(max(0.0, start - time.time()))
    cpu_start = time.process_time()
    await asyncio.sleep(max(0.0, end - time.time()))
    cpu = time.process_time() - cpu_start
    dropped_in_window = stats.dropped
    await asyncio.sleep(drain)
    print(
        json.dumps(
            {
                "connected": stats.connected,
                "errors": stats.errors,
                "dropped": dropped_in_window,
                "deliveries": stats.deliveries,
                "sampled_deliveries": stats.sampled_deliveries,
                "histogram": [[k, v] for k, v in stats.histogram.items()],
                "cpu_s": cpu,
            }
        ),
        flush=True,
    )
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def stream_name(index: int, streams: int) -> str:
    return STREAM if streams == 1 else f"{STREAM}{index}"


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


def _listeners(pid: int, port: int) -> int:
    """Processes in ``pid``'s tree listening on ``port`` (``serve --processes N``: N)."""
    pids = [pid]
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as fh:
        pids += [int(c) for c in fh.read().split()]
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":
                    listening.add(f[9])
    count = 0
    for p in pids:
        with contextlib.suppress(OSError):
            links = {os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")}
            count += any(f"socket:[{inode}]" in links for inode in listening)
    return count


def _wait_http(
    port: int, proc: subprocess.Popen[bytes], timeout: float = 30, listeners: int = 1
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200 and (
                listeners <= 1 or _listeners(proc.pid, port) >= listeners
            ):
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


PROCESSES = [1, 2]
"""``--processes``: runstream serve's processes (this tree only)."""
SERVER_CPUS: list[str] = []
"""``--server-cpus``: the CPU list the servers are pinned to (``taskset -c``), if any."""
COMPARE_SRC: list[str] = []
"""``--compare-src``: another runstream source tree (say, the base commit's) run as
``runstream_base`` in the same run, with the same load."""


def start_server(
    kind: str, redis_url: str, backend: str = "redis"
) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    src = COMPARE_SRC[0] if kind == "runstream_base" else str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": src}
    if kind.startswith("runstream"):
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
        if kind == "runstream":  # a base tree may predate --processes (one process)
            cmd += ["--processes", str(PROCESSES[0])]
        elif kind == "runstream_multi":
            cmd += ["--processes", str(PROCESSES[1])]
    else:
        cmd = [sys.executable, __file__, "--serve-baseline", str(port), "--redis", redis_url]
    if SERVER_CPUS:
        cmd = ["taskset", "-c", SERVER_CPUS[0], *cmd]
    # Server logs go to a file: a pipe nobody reads would block the server once full.
    with tempfile.NamedTemporaryFile(prefix=f"fanout-{kind}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log.name  # type: ignore[attr-defined]
    # With --processes N every process must listen before subscribers connect, or the
    # kernel hands them all to the first one up.
    wanted = {"runstream": PROCESSES[0], "runstream_multi": PROCESSES[1]}.get(kind, 1)
    _wait_http(port, proc, listeners=wanted)
    return proc, port


class _Poster:
    """One keep-alive HTTP/1.1 connection that POSTs an event and reads the answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, stream: str, body: bytes) -> bool:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST /v1/streams/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (stream.encode(), len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return head[9:12] in (b"200", b"201")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _publish(
    port: int, rate: float, start: float, until: float, pid: int, streams: int
) -> tuple[int, float, int]:
    """POST one event every 1/rate s (round robin over the streams), at most 64 in flight.

    Raw keep-alive connections, so the publisher costs little CPU even at
    thousands of events/s; each event carries its send time. A POST does not
    wait for earlier ones, and when the server answers late, the events due
    meanwhile are sent at once on the next free connections (the offered rate
    stays the rate asked for, as long as connections are free).

    Returns the events published inside [start, until], the server's CPU
    seconds then, and how many POSTs failed (error status or no answer within 60 s).
    """
    idle: asyncio.Queue[_Poster] = asyncio.Queue()
    posters = [_Poster(port) for _ in range(64)]
    for p in posters:
        idle.put_nowait(p)
    failures = [0]

    async def post(poster: _Poster, i: int) -> None:
        body = b'{"type":"tick","data":{"t":%r,"i":%d}}' % (time.time(), i)
        try:
            ok = await asyncio.wait_for(poster.post(stream_name(i % streams, streams), body), 60)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            ok = False
            poster.close()
            poster.writer = None
        if not ok:
            failures[0] += 1
        idle.put_nowait(poster)

    async def server_cpu_in_window() -> float:
        await asyncio.sleep(max(0.0, start - time.time()))
        before = _cpu_s(pid)
        await asyncio.sleep(max(0.0, until - time.time()))
        return _cpu_s(pid) - before

    cpu_task = asyncio.ensure_future(server_cpu_in_window())
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    sent = in_window = 0
    while time.time() < until:
        due = int((time.monotonic() - t0) * rate) + 1
        while sent < due:
            try:
                # A server too busy to answer keeps every connection: nothing more is sent.
                poster = await asyncio.wait_for(idle.get(), max(0.001, until - time.time()))
            except TimeoutError:
                break
            task = asyncio.ensure_future(post(poster, sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            if time.time() >= start:
                in_window += 1
        await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    cpu = await cpu_task
    await asyncio.gather(*tasks)
    for p in posters:
        p.close()
    return in_window, cpu, failures[0]


def _cpu_list(text: str) -> set[int]:
    """CPUs of a taskset-style list: ``0``, ``0,2``, ``0-3``."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (``serve --processes N``'s children)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):
            total += _cpu_s(child)
    return total


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


def _percentiles(histogram: dict[float, int]) -> dict[str, float | None]:
    total = sum(histogram.values())
    out: dict[str, float | None] = {"p50": None, "p99": None, "max": None}
    if not total:
        return out
    keys = sorted(histogram)
    for name, p in (("p50", 0.50), ("p99", 0.99)):
        rank, seen = p * total, 0
        for k in keys:
            seen += histogram[k]
            if seen >= rank:
                out[name] = k
                break
    out["max"] = keys[-1]
    return out


def _create_streams(port: int, streams: int) -> None:
    """One first event per stream, so every subscriber's ``after=now`` has a stream to follow."""
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        for s in range(streams):
            http.post(
                f"/v1/streams/{stream_name(s, streams)}/events",
                json={"type": "hello", "data": {"t": 0, "i": -1}},
            ).raise_for_status()


def run_one(kind: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    proc, port = start_server(kind, redis_url, args.runstream_backend)
    workers: list[subprocess.Popen[str]] = []
    try:
        _create_streams(port, args.streams)
        time.sleep(0.5)
        rss_before = _rss_kb(proc.pid)
        per = [
            args.subscribers // args.procs + (1 if i < args.subscribers % args.procs else 0)
            for i in range(args.procs)
        ]
        t_connect = time.monotonic()
        first = 0
        for n in per:
            cmd = [sys.executable, __file__, "--worker", str(port), str(n), str(first)]
            cmd += [str(args.streams), str(args.sample_every)]
            workers.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
            first += n
        connected = errors = 0
        for w in workers:
            assert w.stdout is not None
            hello = json.loads(w.stdout.readline())
            connected += hello["connected"]
            errors += hello["errors"]
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
            _publish(port, args.rate, start, end, proc.pid, args.streams)
        )
        deliveries = sampled = dropped = 0
        gen_cpu = 0.0
        histogram: dict[float, int] = {}
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if not line:
                errors += 1
                continue
            result = json.loads(line)
            deliveries += result["deliveries"]
            sampled += result["sampled_deliveries"]
            dropped += result["dropped"]
            errors += result["errors"]
            gen_cpu += result["cpu_s"]
            for k, v in result["histogram"]:
                histogram[k] = histogram.get(k, 0) + v
        for w in workers:
            w.wait(timeout=30)
        subs_per_stream = connected / args.streams
        return {
            "subscribers_connected": connected,
            "connect_s": round(connect_s, 2),
            "errors": errors,
            "dropped_connections": dropped,
            "published_per_s": round(published / args.duration, 1),
            "publish_failures": publish_failures,
            "offered_deliveries_per_s": round(subs_per_stream * published / args.duration, 1),
            "deliveries_per_s": round(deliveries / args.duration, 1),
            "latency_sampled_deliveries": sampled,
            "server_cpu_share_in_window": round(cpu_window / args.duration, 2),
            "server_cpu_ms_per_1k_deliveries": round(cpu_window * 1e6 / max(1, deliveries), 1),
            "load_generator_cpu_share_in_window": round(gen_cpu / args.duration, 2),
            "latency_ms": _percentiles(histogram),
            "memory_per_idle_subscriber_kb": round((rss_idle - rss_before) / max(1, connected), 2),
            "server_rss_mb": {
                "before": round(rss_before / 1024, 1),
                "idle_subscribers": round(rss_idle / 1024, 1),
            },
            "resume_10k_ms": None if args.no_resume else run_resume(kind, redis_url, args),
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
    errors_logged = text.count("Traceback")
    if errors_logged:
        print(f"{kind} server logged {errors_logged} tracebacks; see {log_path}", file=sys.stderr)
    else:
        log_path.unlink()


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
        help="seconds the subscribers stay connected after the window",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=1,
        help="streams; subscriber i follows stream i %% streams, events go round robin",
    )
    parser.add_argument(
        "--sample-every",
        type=int,
        default=0,
        help="record latencies on every k-th subscriber (default: about 100 sampled)",
    )
    parser.add_argument("--no-resume", action="store_true", help="skip the resume measurement")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--runstream-backend",
        default="redis",
        help="'redis' (the same redis-server as the baseline) or a backend URL",
    )
    parser.add_argument(
        "--compare-src",
        help="another runstream src/ directory (the base commit's, say) measured as"
        " runstream_base in the same run",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="runstream serve --processes (this tree)"
    )
    parser.add_argument(
        "--compare-processes",
        type=int,
        default=0,
        help="also measure this tree with that many processes (runstream_multi), same run",
    )
    parser.add_argument(
        "--server-cpus",
        help="pin the servers to these CPUs (taskset list, e.g. '0') and the rest to the others",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=5, type=int, help=argparse.SUPPRESS)
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
    if args.streams < 1 or args.subscribers < args.streams:
        parser.error("--streams must be between 1 and --subscribers")
    if args.sample_every <= 0:
        args.sample_every = max(1, args.subscribers // 100)
    if args.server_cpus:
        pinned = _cpu_list(args.server_cpus)
        others = os.sched_getaffinity(0) - pinned
        if not pinned or not others:
            parser.error("--server-cpus must leave at least one CPU for the rest")
        SERVER_CPUS.append(args.server_cpus)
        os.sched_setaffinity(0, others)  # inherited by redis-server and the workers
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, redis_url = start_redis(Path(tmp))
        try:
            results: dict[str, Any] = {
                "bench": "fanout",
                "config": {
                    "subscribers": args.subscribers,
                    "streams": args.streams,
                    "rate": args.rate,
                    "latency_sampled_every_kth_subscriber": args.sample_every,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "load_generator_procs": args.procs,
                    "server_cpus": args.server_cpus,
                    "other_cpus": sorted(os.sched_getaffinity(0)) if args.server_cpus else None,
                },
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg(),
                },
            }
            PROCESSES[0] = args.processes
            if args.compare_processes:
                PROCESSES[1] = args.compare_processes
                results["runstream_multi"] = run_one("runstream_multi", redis_url, args)
                print(json.dumps({"runstream_multi": results["runstream_multi"]}), file=sys.stderr)
            if args.compare_src:
                COMPARE_SRC.append(args.compare_src)
                results["runstream_base"] = run_one("runstream_base", redis_url, args)
                print(json.dumps({"runstream_base": results["runstream_base"]}), file=sys.stderr)
            results["runstream"] = run_one("runstream", redis_url, args)
            print(json.dumps({"runstream": results["runstream"]}), file=sys.stderr)
            if args.compare_src:
                base, new = results["runstream_base"], results["runstream"]
                results["comparison_with_base"] = {
                    "cpu_ms_per_1k_deliveries": [
                        base["server_cpu_ms_per_1k_deliveries"],
                        new["server_cpu_ms_per_1k_deliveries"],
                    ],
                    "p99_ms": [base["latency_ms"]["p99"], new["latency_ms"]["p99"]],
                }
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
