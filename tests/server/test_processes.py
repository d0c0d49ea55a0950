"""``runstream serve --processes N``: real server processes sharing a port over loopback.

Subscribers spread over the processes must get every event appended through
any of them, in order; runs created through any process are executed once
(by the primary's pool); ``memory://`` refuses more than one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runstream.config import Settings
from runstream.errors import ConfigError
from runstream.protocol.sse import SSEDecoder
from runstream.server.processes import resolve_processes
from tests.cli.conftest import cli_env

CLI = (sys.executable, "-m", "runstream.cli.main")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The server processes ``serve`` started (not multiprocessing's resource tracker)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def connections_of(pid: int, port: int, state: str = "01") -> int:
    """TCP sockets of a process on local port ``port`` in ``state`` (01 established, 0A listen)."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError):  # a process that has gone has no sockets
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == state and fields[9] in inodes:
                    count += 1
    return count


@pytest.fixture
def serve_processes(tmp_path: Path) -> Iterator[object]:
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(backend: str, *extra: str, config: Path | None = None) -> tuple[int, int]:
        port = free_port()
        env = cli_env({"RUNSTREAM_CONFIG": str(config)} if config else None)
        log = tmp_path / f"serve-{port}.log"  # the servers' output, shown when one fails
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*CLI, "serve", "--backend", backend, "--port", str(port), *extra],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append((proc, log))
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success
                kids = children(proc.pid)
                # Ready when both processes listen (the first may answer before the second).
                if healthy and len(kids) == 2 and all(connections_of(k, port, "0A") for k in kids):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            time.sleep(0.05)
        return proc.pid, port

    yield start
    for proc, log in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), (
            f"serve exited with {proc.returncode}:\n{log.read_text()}"
        )


async def _subscriber(port: int, stream: str, n: int, opened: asyncio.Event) -> list[int]:
    got: list[int] = []
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http,
        http.stream(
            "GET",
            f"/v1/streams/{stream}/events",
            headers={"Accept": "text/event-stream"},
            params={"after": "0"},
        ) as response,
    ):
        assert response.status_code == 200
        opened.set()
        decoder = SSEDecoder()
        async for chunk in response.aiter_bytes():
            got += [json.loads(m.data)["i"] for m in decoder.feed(chunk) if m.event == "t"]
            if len(got) >= n:
                return got
    return got


async def fan_out_across_processes(port: int, pid: int) -> None:
    stream = f"s{uuid.uuid4().hex[:6]}"
    n, subs = 40, 16
    opened = [asyncio.Event() for _ in range(subs)]
    tasks = [asyncio.ensure_future(_subscriber(port, stream, n, e)) for e in opened]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 30)
    # The subscribers' connections are spread over both processes (kernel's choice by
    # address hash: with 16 connections, one process getting none is a 2**-15 chance).
    counts = [connections_of(child, port) for child in children(pid)]
    assert sum(counts) == subs and min(counts) > 0, counts
    # Every append on a fresh connection (which process takes it is the kernel's choice).
    for i in range(n):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            r = await http.post(
                f"/v1/streams/{stream}/events", json={"type": "t", "data": {"i": i}}
            )
            assert r.status_code == 201
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert all(got == list(range(n)) for got in results), results


async def test_subscribers_of_every_process_get_every_event_on_sqlite(
    serve_processes: object, tmp_path: Path
) -> None:
    pid, port = serve_processes(f"sqlite:///{tmp_path / 'rs.db'}", "--processes", "2")  # type: ignore[operator]
    await fan_out_across_processes(port, pid)


@pytest.mark.redis
async def test_subscribers_of_every_process_get_every_event_on_redis(
    serve_processes: object, redis_server: object
) -> None:
    url = f"{redis_server.url}?prefix=p{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    pid, port = serve_processes(url, "--processes", "2")  # type: ignore[operator]
    await fan_out_across_processes(port, pid)


async def test_runs_created_through_any_process_run_once(
    serve_processes: object, tmp_path: Path
) -> None:
    marker = tmp_path / "ran.txt"
    config = tmp_path / "runstream.toml"
    code = "import sys\nopen(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\n"
    command = json.dumps([sys.executable, "-c", code, str(marker), "{tag}"])
    config.write_text(
        f'[tasks.mark]\ncommand = {command}\nparams = {{ tag = {{ type = "string" }} }}\n'
    )
    _pid, port = serve_processes(  # type: ignore[operator]
        f"sqlite:///{tmp_path / 'rs.db'}", "--processes", "2", config=config
    )
    ids = []
    for i in range(10):  # fresh connections: created through both processes
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            r = await http.post("/v1/runs", json={"task": "mark", "params": {"tag": f"r{i}"}})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        deadline = time.monotonic() + 30
        for run_id in ids:
            while (
                status := (await http.get(f"/v1/runs/{run_id}")).json()["status"]
            ) != "succeeded":
                assert status in ("queued", "running"), status
                assert time.monotonic() < deadline, f"run {run_id} still {status}"
                await asyncio.sleep(0.05)
    assert sorted(marker.read_text().split()) == sorted(f"r{i}" for i in range(10))


def test_memory_refuses_more_than_one_process(tmp_path: Path) -> None:
    settings = Settings().replace(backend="memory://", processes=2)
    with pytest.raises(ConfigError, match="memory:// keeps streams inside one process"):
        resolve_processes(settings)
    assert resolve_processes(Settings().replace(backend="memory://")) == 1
    out = subprocess.run(
        [*CLI, "serve", "--backend", "memory://", "--processes", "2", "--port", str(free_port())],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "memory:// keeps streams inside one process" in out.stderr


async def test_connections_on_the_shared_port_are_not_delayed_by_nagle() -> None:
    """Answers on kept-alive connections go out at once (TCP_NODELAY on accepted sockets)."""
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Grab(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    from runstream.server.processes import reuse_port_socket

    sock = reuse_port_socket("127.0.0.1", 0)
    server = await asyncio.get_running_loop().create_server(Grab, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        assert await asyncio.wait_for(accepted, 10)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_children_die_with_a_killed_parent(serve_processes: object, tmp_path: Path) -> None:
    pid, port = serve_processes(f"sqlite:///{tmp_path / 'rs.db'}", "--processes", "2")  # type: ignore[operator]
    kids = children(pid)
    os.kill(pid, signal.SIGKILL)  # a crash: no signal is passed on
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{k}").exists() and b"Z" not in _state(k) for k in kids):
        assert time.monotonic() < deadline, "server processes outlived their parent"
        time.sleep(0.05)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"
