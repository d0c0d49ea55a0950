"""``runstream worker`` as real processes on a real, private Redis: kill -9, SIGTERM, restarts.

Runs are created the way an API server creates them (``RunService`` with the Redis
queue as its dispatcher) and followed through the run's stream. Leases are short
(1 s) so that crash detection fits in a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from runstream.backends.redis.dispatch import GROUP, RedisRunQueue
from runstream.backends.redis.log import RedisEventLog
from runstream.backends.redis.runstore import RedisRunStore
from runstream.cli.worker import READY_LINE
from runstream.config import load_settings
from runstream.core.model import END_TYPE, Event
from runstream.runs.model import RunRecord
from runstream.runs.service import RunService
from runstream.runs.tasks import TaskRegistry
from tests.conftest import RedisServer, free_port
from tests.server.live import open_sse

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LEASE = 1.0
PY = sys.executable

SLEEPER = (
    "import os, sys, time\n"
    "print('pid', os.getpid(), flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
    "print('woke', flush=True)\n"
)
ONCE = (
    "import os, sys, time\n"
    "first = not os.path.exists(sys.argv[1])\n"
    "open(sys.argv[1], 'a').close()\n"
    # 'first' goes out before the pid line: the test kills the worker once it
    # has seen the pid, and lines are stored in order, so 'first' is kept.
    "print('first' if first else 'again', flush=True)\n"
    "print('pid', os.getpid(), flush=True)\n"
    "time.sleep(60 if first else 0)\n"
)
COUNT = "import sys\nopen(sys.argv[1], 'a').write('ran\\n')\nprint('counted', flush=True)\n"


def _toml(value: Any) -> str:
    # JSON strings and arrays of strings are valid TOML.
    return json.dumps(value)


def write_config(path: Path) -> Path:
    path.write_text(
        f"""
[tasks.sleeper]
command = {_toml([PY, "-u", "-c", SLEEPER, "{seconds}"])}
params = {{ seconds = {{ type = "number" }} }}
grace = 1

[tasks.once]
command = {_toml([PY, "-u", "-c", ONCE, "{marker}"])}
params = {{ marker = {{ type = "string" }} }}
retries = 1
grace = 1

[tasks.greet]
callable = "worker_tasks:greet"
params = {{ name = {{ type = "string" }} }}

[tasks.count]
command = {_toml([PY, "-u", "-c", COUNT, "{path}"])}
params = {{ path = {{ type = "string" }} }}
"""
    )
    return path


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    new_line: threading.Condition = field(default_factory=threading.Condition)

    def drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.new_line:
                self.lines.append(line.rstrip("\n"))
                self.new_line.notify_all()
            if line.startswith(READY_LINE.format(name=self.name)):
                self.ready.set()

    def wait_for_line(self, text: str, timeout: float = 30) -> bool:
        """Block until a line of the worker's stderr contains ``text`` (thread-safe)."""
        with self.new_line:
            return self.new_line.wait_for(lambda: any(text in line for line in self.lines), timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class Cluster:
    """Worker processes plus an API-side RunService in the test, on one Redis prefix."""

    url: str
    config: Path
    tmp: Path
    store: RedisRunStore
    log: RedisEventLog
    service: RunService
    workers: list[WorkerProcess] = field(default_factory=list)
    children: list[int] = field(default_factory=list)

    async def spawn(
        self,
        name: str,
        *,
        lease: float = LEASE,
        grace: float = 10,
        argv0: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        wait_ready: bool = True,
    ) -> WorkerProcess:
        args = [
            *(argv0 or [PY, "-m", "runstream.cli.main"]),
            "worker",
            "--config",
            str(self.config),
            "--backend",
            self.url,
            "--lease",
            str(lease),
            "--name",
            name,
            "--grace",
            str(grace),
            "--log-level",
            "info",
        ]
        proc = await asyncio.to_thread(
            functools.partial(
                subprocess.Popen,
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        )
        worker = WorkerProcess(name, proc)
        self.workers.append(worker)
        worker.reader = threading.Thread(target=worker.drain, daemon=True)
        worker.reader.start()
        if not wait_ready:
            return worker
        ok = await asyncio.to_thread(worker.ready.wait, 30)
        assert ok, f"worker {name} did not start:\n" + "\n".join(worker.lines)
        return worker

    def by_name(self, name: str | None) -> WorkerProcess:
        return next(w for w in self.workers if w.name == name)

    async def child_pid(self, run_id: str) -> int:
        """The pid (= process group) of the run's command, from its `pid N` output line."""
        async with asyncio.timeout(30):
            async for item in self.log.follow(run_id):
                assert isinstance(item, Event)
                if item.type == "stdout" and item.data["line"].startswith("pid "):
                    pid = int(item.data["line"].split()[1])
                    self.children.append(pid)
                    return pid
        raise AssertionError("the run ended before printing its pid")

    async def until_end(self, run_id: str, within: float = 30) -> list[Event]:
        out: list[Event] = []
        async with asyncio.timeout(within):
            async for item in self.log.follow(run_id):
                assert isinstance(item, Event)
                out.append(item)
        assert out[-1].type == END_TYPE
        return out

    async def pending(self) -> int:
        return (await RedisRunQueue(self.store).stats()).pending

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.kill()
        for pid in self.children:
            # A worker killed with SIGKILL cannot take its child's process group with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
async def cluster(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    url = f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:12]}"
    config = write_config(tmp_path / "runstream.toml")
    store = RedisRunStore.from_url(url)
    await store.start()
    async with RedisEventLog.from_url(url) as log:
        registry = TaskRegistry.from_config(load_settings(config, env={}).tasks)
        service = RunService(registry, store, log, dispatcher=RedisRunQueue(store))
        c = Cluster(url, config, tmp_path, store, log, service)
        try:
            yield c
        finally:
            c.cleanup()
            await store.aclose()


def statuses(events: list[Event]) -> list[tuple[str, int | None]]:
    return [(e.data["status"], e.data.get("attempt")) for e in events if e.type == "status"]


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_until(condition: Callable[[], Awaitable[bool] | bool], within: float = 10) -> None:
    """Poll state that has no wake-up to await (a file, Redis queue entries) until it holds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def wait_until_running(cluster: Cluster, record: RunRecord) -> RunRecord:
    async with asyncio.timeout(30):
        async for item in cluster.log.follow(record.id):
            assert isinstance(item, Event)
            if item.type == "status" and item.data["status"] == "running":
                return await cluster.store.get(record.id)
    raise AssertionError("the run never started")


@pytest.mark.timeout(90)
async def test_a_worker_started_before_redis_waits_for_it(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    private_redis.stop()
    url = f"{private_redis.url}?prefix=early"
    config = write_config(tmp_path / "runstream.toml")
    store = RedisRunStore.from_url(url)
    async with RedisEventLog.from_url(url) as log:
        registry = TaskRegistry.from_config(load_settings(config, env={}).tasks)
        service = RunService(registry, store, log, dispatcher=RedisRunQueue(store))
        cluster = Cluster(url, config, tmp_path, store, log, service)
        try:
            worker = await cluster.spawn("early", wait_ready=False)
            assert await asyncio.to_thread(worker.wait_for_line, "waiting for it")
            assert worker.proc.poll() is None
            await asyncio.to_thread(private_redis.start)
            assert await asyncio.to_thread(worker.ready.wait, 30), worker.lines
            record = await service.create("sleeper", {"seconds": 0})
            events = await cluster.until_end(record.id)
            assert events[-1].data["status"] == "succeeded"
        finally:
            cluster.cleanup()
            await store.aclose()


def test_worker_refuses_a_backend_that_is_not_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        [PY, "-m", "runstream.cli.main", "worker", "--backend", f"sqlite:///{tmp_path}/x.db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "shared run queue, such as redis://" in result.stderr


@pytest.mark.timeout(90)
async def test_a_killed_workers_run_is_lost_within_two_leases(cluster: Cluster) -> None:
    await cluster.spawn("wa")
    await cluster.spawn("wb")
    record = await cluster.service.create("sleeper", {"seconds": 60})
    running = await wait_until_running(cluster, record)
    await cluster.child_pid(record.id)
    victim = cluster.by_name(running.worker)
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    events = await cluster.until_end(record.id)
    detected = time.monotonic() - killed
    print(f"\nkilled worker detected after {detected:.2f}s (lease {LEASE:g}s)")
    final = await cluster.store.get(record.id)
    assert final.status == "lost" and final.worker == victim.name
    assert events[-1].data["status"] == "lost"
    assert statuses(events)[-1] == ("lost", 1)
    # Design bound: 1.2 leases of idle time + a quarter-lease sweep after the last
    # heartbeat, so under 1.5 leases; "two leases" plus slack for a loaded machine.
    assert detected < 2 * LEASE + 1.0

    async def acknowledged() -> bool:  # right after the stream's close
        return await cluster.pending() == 0

    await wait_until(acknowledged)


@pytest.mark.timeout(90)
async def test_a_killed_workers_run_is_retried_on_another_worker(cluster: Cluster) -> None:
    await cluster.spawn("wa")
    await cluster.spawn("wb")
    marker = cluster.tmp / "once.marker"
    record = await cluster.service.create("once", {"marker": str(marker)})
    running = await wait_until_running(cluster, record)
    await cluster.child_pid(record.id)
    victim = cluster.by_name(running.worker)
    victim.proc.send_signal(signal.SIGKILL)
    events = await cluster.until_end(record.id)
    assert statuses(events) == [
        ("queued", 1),
        ("running", 1),
        ("lost", 1),
        ("queued", 2),
        ("running", 2),
        ("succeeded", 2),
    ]
    lines = [e.data["line"] for e in events if e.type == "stdout"]
    assert "first" in lines and "again" in lines
    final = await cluster.store.get(record.id)
    assert (final.status, final.attempt) == ("succeeded", 2)
    assert final.worker != victim.name


@pytest.mark.timeout(90)
async def test_two_worker_processes_never_run_the_same_run(cluster: Cluster) -> None:
    await asyncio.gather(cluster.spawn("wa"), cluster.spawn("wb"))
    queue = RedisRunQueue(cluster.store)
    records = []
    for i in range(12):
        record = await cluster.service.create("count", {"path": str(cluster.tmp / f"c{i}")})
        await queue.enqueue(record.id)  # a second entry for the same run
        records.append(record)
    for record in records:
        await cluster.until_end(record.id)
    for i, record in enumerate(records):
        assert (cluster.tmp / f"c{i}").read_text() == "ran\n"
        assert (await cluster.store.get(record.id)).status == "succeeded"

    async def drained() -> bool:  # duplicate entries are acknowledged without running
        stats = await queue.stats()
        return stats.pending == 0 and stats.waiting == 0

    await wait_until(drained)


@pytest.mark.timeout(90)
async def test_a_long_healthy_run_is_not_stolen_by_other_workers(cluster: Cluster) -> None:
    await cluster.spawn("wa")
    await cluster.spawn("wb")
    record = await cluster.service.create("sleeper", {"seconds": 3.5 * LEASE})
    events = await cluster.until_end(record.id)
    assert statuses(events) == [("queued", 1), ("running", 1), ("succeeded", 1)]
    assert [e.data["line"] for e in events if e.type == "stdout"][-1] == "woke"
    counters = (await RedisRunQueue(cluster.store).stats()).counters
    assert counters["lost"] == 0


@pytest.mark.timeout(90)
async def test_sigterm_lets_the_running_run_finish(cluster: Cluster) -> None:
    worker = await cluster.spawn("wa", grace=20)
    record = await cluster.service.create("sleeper", {"seconds": 1.5})
    await cluster.child_pid(record.id)
    worker.proc.send_signal(signal.SIGTERM)
    later = await cluster.service.create("sleeper", {"seconds": 0})
    assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    final = await cluster.store.get(record.id)
    assert final.status == "succeeded"
    assert (await cluster.store.get(later.id)).status == "queued"  # not taken while stopping
    events = await cluster.until_end(record.id)
    assert [e.data["line"] for e in events if e.type == "stdout"][-1] == "woke"
    assert await cluster.pending() == 0


@pytest.mark.timeout(90)
async def test_sigterm_cancels_runs_that_outlive_the_grace(cluster: Cluster) -> None:
    worker = await cluster.spawn("wa", grace=0.5)
    record = await cluster.service.create("sleeper", {"seconds": 60})
    pgid = await cluster.child_pid(record.id)
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    final = await cluster.store.get(record.id)
    assert final.status == "cancelled"
    assert "shut down" in (final.error or "")
    assert group_gone(pgid)
    events = await cluster.until_end(record.id)
    assert events[-1].data["status"] == "cancelled"
    assert await cluster.pending() == 0


WORKER_TASKS = """
async def greet(ctx):
    await ctx.log("info", "greeting " + ctx.params["name"])
    await ctx.progress(current=1, total=1)
    return {"hello": ctx.params["name"], "attempt": ctx.attempt}
"""


@pytest.mark.timeout(90)
async def test_a_python_task_from_the_config_runs_in_the_worker_process(
    cluster: Cluster,
) -> None:
    app = cluster.tmp / "app"
    app.mkdir()
    (app / "worker_tasks.py").write_text(WORKER_TASKS)
    # The console script, started in the application's directory, imports the task there.
    await cluster.spawn("wa", argv0=[str(Path(PY).with_name("runstream"))], cwd=app)
    record = await cluster.service.create("greet", {"name": "redis"})
    events = await cluster.until_end(record.id)
    assert [e.data for e in events if e.type == "result"] == [{"hello": "redis", "attempt": 1}]
    assert {"line": "greeting redis", "level": "info"} in [
        e.data for e in events if e.type == "stdout"
    ]
    assert (await cluster.store.get(record.id)).status == "succeeded"


HOLD_ACK = """
import asyncio, os, sys
from runstream.backends.redis import dispatch as redis_dispatch

async def hold(self, held):
    # The outcome is stored and the stream closed; stop right before XACK.
    with open(os.environ["HOLD_ACK_MARKER"], "w") as fh:
        fh.write(held.run_id)
    await asyncio.Event().wait()

redis_dispatch.RedisWorker._ack_outcome = hold
from runstream.cli.main import cli
cli(sys.argv[1:], prog_name="runstream")
"""


@pytest.mark.timeout(90)
async def test_a_kill_between_outcome_and_ack_does_not_run_twice(cluster: Cluster) -> None:
    marker = cluster.tmp / "held.marker"
    script = cluster.tmp / "hold_ack.py"
    script.write_text(HOLD_ACK)
    held = await cluster.spawn(
        "fixed", argv0=[PY, str(script)], env={"HOLD_ACK_MARKER": str(marker)}
    )
    counter = cluster.tmp / "count.txt"
    record = await cluster.service.create("count", {"path": str(counter)})
    await cluster.until_end(record.id)
    await wait_until(marker.exists)  # the worker signals through a file
    assert await cluster.pending() == 1  # outcome stored, entry not acknowledged
    held.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(held.proc.wait, 10)
    # Restarted under the same name: it re-reads its own pending entries from 0.
    await cluster.spawn("fixed")

    async def settled() -> bool:
        return await cluster.pending() == 0

    await wait_until(settled)
    assert counter.read_text() == "ran\n"
    events = await cluster.until_end(record.id)
    assert statuses(events) == [("queued", 1), ("running", 1), ("succeeded", 1)]
    assert [e.type for e in events].count(END_TYPE) == 1
    pending = await cluster.store.redis.xpending(cluster.store.keys.queue, GROUP)
    assert pending["pending"] == 0


SERVER = """
import asyncio, sys
from runstream.config import load_settings
from runstream.server.runs import RunsAPI
from runstream.server.app import create_app
from runstream.server.serve import make_server

config, backend, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = load_settings(config, backend=backend, port=port, workers=0, log_level="warning")
runs = RunsAPI.from_settings(settings, workers=0)
app = create_app(settings, routers=[runs.router], on_startup=[runs.startup])
asyncio.run(make_server(app, settings).serve())
"""


async def start_api_server(cluster: Cluster, script: Path) -> tuple[subprocess.Popen[Any], str]:
    """A real uvicorn process serving the runs API on the cluster's Redis (no workers)."""
    port = free_port()
    proc = await asyncio.to_thread(
        functools.partial(
            subprocess.Popen,
            [PY, str(script), str(cluster.config), cluster.url, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=base) as client:
        while True:  # a child process's readiness: nothing to await but the port
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/readyz")).status_code == 200:
                    return proc, base
            assert proc.poll() is None, "API server exited during start-up"
            assert time.monotonic() < deadline, "API server did not start in 30 s"
            await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_a_run_created_on_one_server_followed_on_another_is_cancelled_through_the_first(
    cluster: Cluster,
) -> None:
    script = cluster.tmp / "api_server.py"
    script.write_text(SERVER)
    started = await asyncio.gather(
        start_api_server(cluster, script),
        start_api_server(cluster, script),
        cluster.spawn("wa"),
        cluster.spawn("wb"),
        return_exceptions=True,
    )
    servers = [s for s in started[:2] if isinstance(s, tuple)]
    for outcome in started:
        if isinstance(outcome, BaseException):
            for proc, _ in servers:
                proc.kill()
                await asyncio.to_thread(proc.wait, 30)
            raise outcome
    (_, a_url), (_, b_url) = servers
    try:
        async with (
            httpx.AsyncClient(base_url=a_url, timeout=30) as a,
            httpx.AsyncClient(base_url=b_url, timeout=30) as b,
        ):
            created = await a.post("/v1/runs", json={"task": "sleeper", "params": {"seconds": 60}})
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            async with open_sse(b, f"/v1/runs/{run_id}/events") as sse:
                pgid = None
                while pgid is None:
                    message = await sse.next()
                    assert message is not None, "B's stream ended before the run started"
                    if message.event == "stdout":
                        line = json.loads(message.data)["line"]
                        if line.startswith("pid "):
                            pgid = int(line.split()[1])
                cluster.children.append(pgid)
                asked = time.monotonic()
                cancelled = await a.post(f"/v1/runs/{run_id}/cancel")
                assert cancelled.status_code == 202, cancelled.text
                rest = await sse.rest()
                took = time.monotonic() - asked
            print(f"\ncancel through A reached the worker and B's follower in {took:.2f}s")
            assert rest[-1].event == "end"
            assert json.loads(rest[-1].data)["status"] == "cancelled"
            status_events = [json.loads(m.data) for m in rest if m.event == "status"]
            assert status_events[-1]["status"] == "cancelled"
            final = (await b.get(f"/v1/runs/{run_id}")).json()
            assert final["status"] == "cancelled"
            assert final["worker"] in ("wa", "wb")
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)
            # SIGTERM to the group at once; the task's 1 s grace bounds the SIGKILL.
            assert took < 5
    finally:
        for proc, _ in servers:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
