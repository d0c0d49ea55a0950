"""Hostile clients against ``runstream serve``: stuck readers and a flood of idle sockets.

Usage::

    .venv/bin/python bench/hostile.py                       # both parts
    .venv/bin/python bench/hostile.py --part readers --hold 40
    .venv/bin/python bench/hostile.py --part flood --sockets 20000
    .venv/bin/python bench/hostile.py --before-src /tmp/base  # also a checkout without the limits

Prints one JSON object. The server is ``runstream serve`` in its own process
(``--backend``, default a SQLite file in a temporary directory); the load comes
from this script (and, for the flood, its worker processes).

**readers** (issue 13, row 5). A stream of ``--events`` events of 1 MB each
(appended first, 3 per request); then ``--readers`` clients request it as SSE
with a 16 KB receive buffer and never read. The server's RSS is sampled every
0.25 s for ``--hold`` seconds. Figures per server variant: ``rss_idle_mb`` (with
the stream stored, no reader), ``rss_peak_mb`` and ``rss_end_mb`` while the
readers are connected, ``readers_cut`` (slow-consumer disconnects) and
``cut_after_s`` (when the last one was released). Variants:

* ``after``: the defaults (``max_page_bytes`` 4 MiB, ``send_timeout`` 30 s);
* ``before_emulated``: the same code with the new limits set out of reach
  (``max_page_bytes``/``subscriber_buffer_bytes`` 2^50, ``send_timeout`` 10^9),
  which is how the code before them behaved: one catch-up read of up to 2000
  events, and a send that may wait forever;
* ``before_src`` with ``--before-src DIR``: the server from ``DIR/src``.

**flood** (row 7). ``--sockets`` connections (opened by worker processes,
5000 each) that send ``GET /healthz HTTP/1.1`` and part of a header, then
nothing. Once they are all connected, ``/healthz`` is requested
``--probes`` times, each on a new connection; ``healthz_ms`` gives min, median
and max (a probe that gets no answer in 10 s counts as ``null``). Each probe is
timed from ``connect()`` to the end of the answer. The server's
view, from ``/metrics``: ``server_open_connections`` (accepted and held),
``server_dropped`` (closed by reason: header timeout, evicted at the limit,
refused) and ``accept_errors``; ``server_fds`` counts its open file
descriptors. ``flood_closed_by_server`` is what the workers saw when told to
stop. The flood runs with ``header_timeout`` = ``--flood-header-timeout``
(default 60 s, so the sockets stay while measured: the cap does the work, not
the timeout) and with the defaults otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
EVENT_DATA = "x" * 1_000_000
PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Waiting: "
PER_WORKER = 5000
OUT_OF_REACH = {
    "RUNSTREAM_MAX_PAGE_BYTES": str(1 << 50),
    "RUNSTREAM_SUBSCRIBER_BUFFER_BYTES": str(1 << 50),
    "RUNSTREAM_SEND_TIMEOUT": str(10**9),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class ServeProcess:
    """``runstream serve`` on a free port; its stderr goes to a file (counted, not read live)."""

    def __init__(self, backend: str, env: dict[str, str], src: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
        full_env.update({"PYTHONPATH": str(src), "RUNSTREAM_LOG_LEVEL": "warning", **env})
        self.log = tempfile.NamedTemporaryFile(prefix="hostile-serve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "runstream.cli.main", "serve"),
                *("--backend", backend, "--port", str(self.port)),
            ],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_size(self) -> tuple[int, int]:
        data = Path(self.log.name).read_bytes()
        return len(data), data.count(b"\n")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def metric(text: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def server_metrics(url: str) -> str:
    try:
        return httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


# -- readers ------------------------------------------------------------------------------


def publish(url: str, stream: str, n: int) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        for start in range(0, n, 3):
            body = [{"type": "blob", "data": EVENT_DATA} for _ in range(min(3, n - start))]
            r = http.post(f"/v1/streams/{stream}/events", json=body)
            r.raise_for_status()


def stuck_reader(port: int, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def run_readers(args: argparse.Namespace, env: dict[str, str], src: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        backend = args.backend or f"sqlite:///{tmp}/hostile.db"
        server = ServeProcess(backend, env, src)
        try:
            publish(server.url, "big", args.events)
            time.sleep(1.0)  # let the appends' garbage go
            idle = rss_mb(server.pid)
            readers = [
                stuck_reader(server.port, "/v1/streams/big/events") for _ in range(args.readers)
            ]
            start = time.monotonic()
            samples: list[float] = []
            cut_after: float | None = None
            next_poll = start
            subscribers: float | None = None
            while time.monotonic() - start < args.hold:
                samples.append(rss_mb(server.pid))
                if time.monotonic() >= next_poll:
                    text = server_metrics(server.url)
                    subscribers = metric(text, "runstream_subscribers")
                    if cut_after is None and subscribers == 0:
                        cut_after = time.monotonic() - start
                    next_poll += 1.0
                time.sleep(0.25)
            text = server_metrics(server.url)
            slow = metric(text, "runstream_slow_consumer_disconnects_total", '{transport="sse"}')
            result = {
                "rss_idle_mb": round(idle, 1),
                "rss_peak_mb": round(max(samples), 1),
                "rss_end_mb": round(samples[-1], 1),
                "growth_peak_mb": round(max(samples) - idle, 1),
                "readers_cut": int(slow or 0),
                "cut_after_s": None if cut_after is None else round(cut_after, 1),
                "subscribers_at_end": metric(text, "runstream_subscribers"),
            }
            for sock in readers:
                sock.close()
            return result
        finally:
            server.stop()


# -- flood ----------------------------------------------------------------------------------


async def _flood_worker(port: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    failed = 0
    limit = asyncio.Semaphore(200)

    async def one() -> None:
        nonlocal failed
        async with limit:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                async with asyncio.timeout(30):
                    await loop.sock_connect(sock, ("127.0.0.1", port))
                    await loop.sock_sendall(sock, PARTIAL)
            except (OSError, TimeoutError):
                failed += 1
                sock.close()
                return
            socks.append(sock)

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    print(
        json.dumps(
            {"connected": len(socks), "failed": failed, "seconds": time.monotonic() - start}
        ),
        flush=True,
    )
    await loop.run_in_executor(None, sys.stdin.readline)
    closed = 0
    for sock in socks:
        try:
            while data := sock.recv(65536, socket.MSG_DONTWAIT):
                del data
            closed += 1  # b"": the server closed it
        except BlockingIOError:
            pass  # still open
        except OSError:
            closed += 1  # reset by the server
        sock.close()
    print(json.dumps({"closed_by_server": closed}), flush=True)


def probe_healthz(url: str, timeout: float = 10) -> float | None:
    """Milliseconds from connect to the whole ``/healthz`` answer on a new connection."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        return None
    took = (time.monotonic() - start) * 1000
    return took if answer.startswith(b"HTTP/1.1 200 ") else None


def run_flood(args: argparse.Namespace, env: dict[str, str], src: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        backend = args.backend or f"sqlite:///{tmp}/hostile.db"
        env = {"RUNSTREAM_HEADER_TIMEOUT": str(args.flood_header_timeout), **env}
        server = ServeProcess(backend, env, src)
        workers: list[subprocess.Popen[str]] = []
        try:
            baseline = [probe_healthz(server.url) for _ in range(3)]
            left = args.sockets
            start = time.monotonic()
            while left > 0:
                n = min(PER_WORKER, left)
                left -= n
                workers.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--flood-worker", str(server.port), str(n)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            ready = [json.loads(w.stdout.readline()) for w in workers]  # type: ignore[union-attr]
            opened_in = time.monotonic() - start
            text = server_metrics(server.url)
            held = metric(text, "runstream_http_connections")
            fds = fd_count(server.pid)
            probes = [probe_healthz(server.url) for _ in range(args.probes)]
            answered = [p for p in probes if p is not None]
            text = server_metrics(server.url)
            dropped = {
                reason: metric(
                    text, "runstream_http_connections_dropped_total", f'{{reason="{reason}"}}'
                )
                for reason in ("header_timeout", "evicted", "refused")
            }
            accept_errors = metric(text, "runstream_accept_errors_total")
            for w in workers:
                assert w.stdin is not None
                w.stdin.write("stop\n")
                w.stdin.flush()
            closed = sum(json.loads(w.stdout.readline())["closed_by_server"] for w in workers)  # type: ignore[union-attr]
            log_bytes, log_lines = server.log_size()
            return {
                "sockets": args.sockets,
                "flood_connected": sum(r["connected"] for r in ready),
                "flood_connect_failed": sum(r["failed"] for r in ready),
                "flood_opened_in_s": round(opened_in, 1),
                "server_open_connections": held,
                "server_fds": fds,
                "server_dropped": dropped,
                "accept_errors": accept_errors,
                "healthz_ms_before_flood": [None if p is None else round(p, 1) for p in baseline],
                "healthz_ms": {
                    "answered": f"{len(answered)}/{len(probes)}",
                    "min": round(min(answered), 1) if answered else None,
                    "median": round(statistics.median(answered), 1) if answered else None,
                    "max": round(max(answered), 1) if answered else None,
                },
                "flood_closed_by_server": closed,
                "server_rss_mb": round(rss_mb(server.pid), 1),
                "server_log": {"bytes": log_bytes, "lines": log_lines},
            }
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                w.wait()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("readers", "flood", "all"), default="all")
    parser.add_argument("--backend", default=None, help="backend URL (default: a SQLite file)")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--readers", type=int, default=5)
    parser.add_argument("--hold", type=float, default=40.0)
    parser.add_argument("--sockets", type=int, default=20_000)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--flood-header-timeout", type=float, default=60.0)
    parser.add_argument("--before-src", type=Path, default=None, help="checkout to compare with")
    parser.add_argument("--flood-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_worker:
        asyncio.run(_flood_worker(*args.flood_worker))
        return
    src = ROOT / "src"
    out: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "flood_worker"}}
    out["settings"]["before_src"] = str(args.before_src) if args.before_src else None
    if args.part in ("readers", "all"):
        out["readers"] = {
            "after": run_readers(args, {}, src),
            "before_emulated": run_readers(args, OUT_OF_REACH, src),
        }
        if args.before_src:
            out["readers"]["before_src"] = run_readers(args, {}, args.before_src / "src")
    if args.part in ("flood", "all"):
        out["flood"] = {"after": run_flood(args, {}, src)}
        if args.before_src:
            out["flood"]["before_src"] = run_flood(args, {}, args.before_src / "src")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
