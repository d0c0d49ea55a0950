"""HTTP append throughput: one event per POST, N connections, next to the Node reference server.

Usage::

    .venv/bin/python bench/append.py --http                 # via append.py (same JSON shape)
    .venv/bin/python bench/http_append.py                   # memory, sqlite, redis, node
    .venv/bin/python bench/http_append.py --compare-src /tmp/base/src   # + the base tree
    .venv/bin/python bench/http_append.py --only memory --only node --duration 5

Needs ``npm ci`` in ``bench/`` (``autocannon@9.0.0`` and
``@durable-streams/server@0.3.7``, pinned by ``bench/package-lock.json``) and
``redis-server`` for the Redis target (a private one is started on a free port,
AOF off). Every target runs as its own process on loopback and gets the same
load in the same run: ``autocannon -c <connections> -d <duration>`` POSTing one
``{"type": "stdout", "data": {"line": <100 x>}}`` event per request, after a
warm-up of the same load. Per target:

* ``requests_per_s`` — 2xx answers per second (``non_2xx`` and ``errors`` beside);
* ``latency_ms`` — autocannon's p50/p99;
* ``server_cpu_ms_per_1k`` — the server process's CPU (user+system, from
  ``/proc``) over the measured run, per 1,000 answered requests; for Redis
  ``redis_cpu_ms_per_1k`` too (the engine's own share);
* ``generator_cpu_share`` — autocannon's CPU over the run, in cores (a
  saturated generator would show here; the machine's cores are shared).

The Node reference server is ``DurableStreamTestServer`` in memory (its
protocol: ``PUT`` creates the stream, each ``POST`` appends the JSON body).
``ratios`` divides each runstream target's rate by the reference's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BODY = json.dumps({"type": "stdout", "data": {"line": "x" * 100}}, separators=(",", ":"))
TARGETS = ("memory", "sqlite", "redis", "node", "granian_memory")
DEFAULT_TARGETS = ("memory", "sqlite", "redis", "node")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed for the redis target")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return proc, port


def start_target(
    name: str, tmp: Path, redis_port: int | None, src: Path, processes: int
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start one server; returns (process, port, the path to POST to)."""
    port = free_port()
    if name == "node":
        cmd = ["node", str(BENCH / "ds_server.mjs"), str(port)]
        proc = subprocess.Popen(cmd, cwd=BENCH, stdout=subprocess.DEVNULL)
        wait_port(port, proc)
        path = f"/bench-{uuid.uuid4().hex[:6]}"
        _request(port, "PUT", path, "")
        return proc, port, path
    backend = {
        "memory": "memory://",
        "granian_memory": "memory://",
        "sqlite": f"sqlite:///{tmp}/append-{uuid.uuid4().hex[:6]}.db",
        "redis": f"redis://127.0.0.1:{redis_port}/0?prefix=b{uuid.uuid4().hex[:6]}",
    }[name]
    env = {**os.environ, "PYTHONPATH": str(src), "RUNSTREAM_LOG_LEVEL": "warning"}
    if name.startswith("granian_"):
        # The same app under granian (bench/granian_app.py): the HTTP server's share.
        env.update({"RUNSTREAM_BACKEND": backend, "PYTHONPATH": f"{src}:{ROOT}"})
        cmd = [str(Path(sys.executable).with_name("granian")), "--interface", "asgi"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        cmd += ["--log-level", "warning", "--factory", "bench.granian_app:app"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        wait_port(port, proc)
        return proc, port, "/v1/streams/bench/events"
    cmd = [sys.executable, "-m", "runstream.cli.main", "serve", "--backend", backend]
    cmd += ["--port", str(port)]
    if src == ROOT / "src":  # this tree (a base tree may predate --processes: one process)
        cmd += ["--processes", str(processes)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    wait_port(port, proc)
    if src == ROOT / "src" and processes > 1:  # every process listening before the load
        from fanout import _listeners

        deadline = time.monotonic() + 30
        while _listeners(proc.pid, port) < processes:
            if time.monotonic() > deadline:
                raise RuntimeError("not every server process listens")
            time.sleep(0.05)
    return proc, port, "/v1/streams/bench/events"


def _request(port: int, method: str, path: str, body: str) -> int:
    import httpx

    r = httpx.request(
        method,
        f"http://127.0.0.1:{port}{path}",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    return r.status_code


def _tree_cpu(pid: int) -> float:
    """CPU of a server and its child processes (``--processes N``)."""
    total = cpu_s(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):
            total += _tree_cpu(int(child))
    return total


def autocannon(
    port: int, path: str, connections: int, duration: float
) -> tuple[dict[str, Any], float]:
    """Run autocannon; returns its JSON result and its CPU seconds."""
    binary = BENCH / "node_modules" / ".bin" / "autocannon"
    if not binary.exists():
        raise SystemExit("run `npm ci` in bench/ first (autocannon)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            str(binary),
            "-j",
            "-c",
            str(connections),
            "-d",
            str(duration),
            "-m",
            "POST",
            "-H",
            "content-type=application/json",
            "-b",
            BODY,
            f"http://127.0.0.1:{port}{path}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out.stdout), cpu


def measure(
    name: str,
    tmp: Path,
    redis: tuple[subprocess.Popen[bytes], int] | None,
    args: argparse.Namespace,
    src: Path,
) -> dict[str, Any]:
    proc, port, path = start_target(
        name, tmp, redis[1] if redis else None, src, args.processes if name != "node" else 1
    )
    try:
        autocannon(port, path, args.connections, args.warmup)
        server0 = _tree_cpu(proc.pid)
        redis0 = cpu_s(redis[0].pid) if name == "redis" and redis else 0.0
        result, gen_cpu = autocannon(port, path, args.connections, args.duration)
        server_cpu = _tree_cpu(proc.pid) - server0
        redis_cpu = cpu_s(redis[0].pid) - redis0 if name == "redis" and redis else 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ok = int(result["2xx"])
    seconds = float(result["duration"]) or args.duration
    out: dict[str, Any] = {
        "requests_per_s": round(ok / seconds, 1),
        "non_2xx": int(result["non2xx"]),
        "errors": int(result["errors"]),
        "latency_ms": {"p50": result["latency"]["p50"], "p99": result["latency"]["p99"]},
        "server_cpu_share": round(server_cpu / seconds, 2),
        "server_cpu_ms_per_1k": round(server_cpu * 1e6 / max(1, ok), 1),
        "generator_cpu_share": round(gen_cpu / seconds, 2),
    }
    if name == "redis":
        out["redis_cpu_ms_per_1k"] = round(redis_cpu * 1e6 / max(1, ok), 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = args.only or list(DEFAULT_TARGETS)
    report: dict[str, Any] = {
        "bench": "http_append",
        "config": {
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "processes": args.processes,
            "body_bytes": len(BODY),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "targets": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis = start_redis(tmp) if "redis" in targets else None
        try:
            trees = [("", ROOT / "src")]
            if args.compare_src:
                trees.append(("base_", Path(args.compare_src)))
            for name in targets:
                for prefix, src in trees if name in DEFAULT_TARGETS[:3] else trees[:1]:
                    key = prefix + name
                    report["targets"][key] = measure(name, tmp, redis, args, src)
                    print(json.dumps({key: report["targets"][key]}), file=sys.stderr)
        finally:
            if redis is not None:
                redis[0].terminate()
                redis[0].wait()
    found = report["targets"]
    node = found.get("node", {}).get("requests_per_s")
    if node:
        report["ratios_to_node"] = {
            k: round(v["requests_per_s"] / node, 2) for k, v in found.items() if k != "node"
        }
    if found.get("redis") and found.get("sqlite"):
        report["redis_to_sqlite"] = round(
            found["redis"]["requests_per_s"] / found["sqlite"]["requests_per_s"], 2
        )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=1, help="runstream serve --processes")
    parser.add_argument("--only", action="append", choices=TARGETS, help="targets to run")
    parser.add_argument("--compare-src", help="another runstream src/ to measure as base_*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
