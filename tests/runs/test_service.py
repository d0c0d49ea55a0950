"""RunService and the in-process worker pool: validation, cancel, limits, shutdown, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runstream.backends import open_backend, open_run_store
from runstream.backends.base import EventLog
from runstream.core.model import END_TYPE, Event
from runstream.errors import InvalidParams, RunNotFound, TaskNotFound
from runstream.runs import service as service_module
from runstream.runs.context import RunContext
from runstream.runs.executor import new_worker_id
from runstream.runs.model import RunRecord
from runstream.runs.service import LocalWorkerPool, RunService, worker_alive
from runstream.runs.store import RunStore
from runstream.runs.tasks import TaskRegistry

PY = sys.executable


@dataclass
class Env:
    registry: TaskRegistry
    store: RunStore
    log: EventLog
    service: RunService

    def pool(self, **kwargs: Any) -> LocalWorkerPool:
        pool = LocalWorkerPool(self.registry, self.store, self.log, **kwargs)
        self.service.dispatcher = pool
        return pool


@pytest.fixture(params=["memory", "sqlite"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'svc.db'}"
    registry = TaskRegistry()
    log = open_backend(url)
    store = open_run_store(url)
    async with log:
        await store.start()
        try:
            yield Env(registry, store, log, RunService(registry, store, log))
        finally:
            await store.aclose()


async def all_events(log: EventLog, run_id: str) -> list[Event]:
    return list((await log.read(run_id, 0, 10_000)).events)


async def statuses(log: EventLog, run_id: str) -> list[str]:
    return [e.data["status"] for e in await all_events(log, run_id) if e.type == "status"]


async def wait_status(store: RunStore, run_id: str, *wanted: str, within: float = 20) -> RunRecord:
    deadline = time.monotonic() + within
    while True:
        record = await store.get(run_id)
        if record.status in wanted:
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} is {record.status}, not {wanted}")
        await asyncio.sleep(0.02)  # polling the run store; it has no change notification


# -- create / get / list ------------------------------------------------------------


async def test_create_queues_the_run_and_opens_its_stream(env: Env) -> None:
    env.registry.command("echo", ["echo", "{word}"], params={"word": {"default": "hi"}}, timeout=60)
    record = await env.service.create("echo", {"word": "yo"}, timeout=5)
    assert (record.status, record.params, record.timeout, record.attempt) == (
        "queued", {"word": "yo"}, 5.0, 1,
    )  # fmt: skip
    assert await env.service.get(record.id) == record
    evs = await all_events(env.log, record.id)
    assert [(e.type, e.data) for e in evs] == [("status", {"status": "queued", "attempt": 1})]
    page, _ = await env.service.list(task="echo")
    assert [r.id for r in page] == [record.id]


async def test_invalid_runs_are_refused_before_anything_is_stored(env: Env) -> None:
    env.registry.command("n", ["echo", "{n}"], params={"n": "integer"}, timeout=10)
    with pytest.raises(TaskNotFound):
        await env.service.create("missing")
    with pytest.raises(InvalidParams) as info:
        await env.service.create("n", {"n": "seven"})
    assert info.value.field == "n"
    with pytest.raises(InvalidParams) as info:
        await env.service.create("n", {"n": 7}, timeout=11)
    assert info.value.field == "timeout"
    assert (await env.service.list())[0] == []
    with pytest.raises(RunNotFound):
        await env.service.get("run-nope")


async def test_cancel_of_a_queued_run_ends_it_at_once(env: Env) -> None:
    env.registry.command("t", ["true"])
    record = await env.service.create("t")
    cancelled = await env.service.cancel(record.id)
    assert (cancelled.status, cancelled.cancel_requested) == ("cancelled", True)
    info = await env.log.info(record.id)
    assert (info.closed, info.close_status) == (True, "cancelled")
    assert await statuses(env.log, record.id) == ["queued", "cancelled"]
    assert (await env.service.cancel(record.id)).status == "cancelled"  # idempotent


async def test_bulk_deletion_lists_every_page_and_skips_runs_not_ended(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs are listed a small page at a time; matches on every page go, the queued one stays.
    monkeypatch.setattr(service_module, "RUN_PAGE", 2)
    env.registry.command("t", ["true"])
    env.registry.command("other", ["true"])
    ended = [(await env.service.cancel((await env.service.create("t")).id)).id for _ in range(5)]
    queued = await env.service.create("t")
    elsewhere = await env.service.cancel((await env.service.create("other")).id)

    deleted, skipped = await env.service.delete_matching(task="t")

    assert (sorted(deleted), skipped) == (sorted(ended), 1)
    assert [r.id for r in (await env.service.list(task="t"))[0]] == [queued.id]
    assert (await env.service.get(elsewhere.id)).status == "cancelled"
    for run_id in ended:
        with pytest.raises(RunNotFound):
            await env.service.get(run_id)


# -- the pool ---------------------------------------------------------------------------


async def test_pool_runs_submitted_and_previously_queued_runs(env: Env) -> None:
    env.registry.command("echo", [PY, "-c", "import sys; print(sys.argv[1])", "{w}"],
                         params={"w": "string"})  # fmt: skip
    earlier = await env.service.create("echo", {"w": "earlier"})  # no pool yet: stays queued
    pool = env.pool(workers=2)
    await pool.start()
    try:
        later = await env.service.create("echo", {"w": "later"})
        for rec, word in ((earlier, "earlier"), (later, "later")):
            final = await wait_status(env.store, rec.id, "succeeded", "failed")
            await wait_closed(env.log, rec.id)
            assert final.status == "succeeded"
            assert final.worker == pool.worker_id
            lines = [
                e.data["line"] for e in await all_events(env.log, rec.id) if e.type == "stdout"
            ]
            assert lines == [word]
            assert await statuses(env.log, rec.id) == ["queued", "running", "succeeded"]
    finally:
        await pool.shutdown()


async def test_task_concurrency_and_worker_limits_are_respected(env: Env) -> None:
    gate = asyncio.Event()
    now_running: dict[str, int] = {"limited": 0, "free": 0}
    peak: dict[str, int] = {"limited": 0, "free": 0}

    def make(name: str) -> Any:
        async def body(ctx: RunContext) -> None:
            now_running[name] += 1
            peak[name] = max(peak[name], now_running[name])
            try:
                await gate.wait()
            finally:
                now_running[name] -= 1

        return body

    env.registry.python("limited", make("limited"), concurrency=2)
    env.registry.python("free", make("free"))
    pool = env.pool(workers=3)
    await pool.start()
    try:
        limited = [await env.service.create("limited") for _ in range(5)]
        free = [await env.service.create("free") for _ in range(2)]
        # Two limited runs take two of three slots; the third slot goes to a run of
        # the other task even though limited runs were submitted before it.
        await wait_status(env.store, free[0].id, "running")
        assert pool.running_of("limited") == 2
        assert len(pool.running) == 3
        assert pool.pending == [r.id for r in limited[2:]] + [free[1].id]
        gate.set()
        await asyncio.wait_for(pool.wait_idle(), 30)
        for rec in [*limited, *free]:
            assert (await env.store.get(rec.id)).status == "succeeded"
        assert peak == {"limited": 2, "free": 1}
    finally:
        await pool.shutdown()


async def test_cancel_of_a_running_run_stops_its_process(env: Env) -> None:
    env.registry.command(
        "sleep", [PY, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    )
    pool = env.pool(workers=1)
    await pool.start()
    try:
        record = await env.service.create("sleep")
        await wait_for_output(env.log, record.id, "up")
        started = time.monotonic()
        await env.service.cancel(record.id)
        final = await wait_status(env.store, record.id, "cancelled", "failed", "succeeded")
        assert final.status == "cancelled"
        assert time.monotonic() - started < 10
        await wait_closed(env.log, record.id)
        assert (await env.log.info(record.id)).close_status == "cancelled"
    finally:
        await pool.shutdown()


async def test_shutdown_lets_quick_runs_finish_and_cancels_the_rest(env: Env) -> None:
    env.registry.command(
        "quick", [PY, "-c", "import time; print('up', flush=True); time.sleep(0.5)"]
    )
    env.registry.command("slow", [PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                         grace=0.5)  # fmt: skip
    env.registry.command("later", ["true"])
    pool = env.pool(workers=2)
    await pool.start()
    quick = await env.service.create("quick")
    slow = await env.service.create("slow")
    waiting = await env.service.create("later")
    await wait_for_output(env.log, quick.id, "up")
    await wait_for_output(env.log, slow.id, "up")
    started = time.monotonic()
    await pool.shutdown(grace=2.0)
    assert time.monotonic() - started < 15
    assert (await env.store.get(quick.id)).status == "succeeded"
    slow_final = await env.store.get(slow.id)
    assert slow_final.status == "cancelled"
    assert slow_final.error == "cancelled: the worker is shutting down"
    assert (await env.log.info(slow.id)).close_status == "cancelled"
    assert (await env.store.get(waiting.id)).status == "queued"  # left for the next pool


async def wait_for_output(log: EventLog, run_id: str, text: str) -> None:
    async def look() -> None:
        async for item in log.follow(run_id):
            if isinstance(item, Event) and item.type == "stdout" and item.data["line"] == text:
                return

    await asyncio.wait_for(look(), 20)


async def wait_closed(log: EventLog, run_id: str) -> None:
    """Follow the run's stream to its end entry (the executor closes it after the store)."""

    async def drain() -> None:
        async for _ in log.follow(run_id):
            pass

    await asyncio.wait_for(drain(), 20)


# -- the end check (streams end from state) ------------------------------------------


async def test_end_check_closes_the_stream_of_a_run_finished_long_ago(env: Env) -> None:
    env.registry.command("t", ["true"])
    record = await env.service.create("t")
    await env.store.transition(record.id, "running", worker="w")
    await env.store.transition(record.id, "failed", error="boom", finished_at=time.time())
    fresh_guarded = RunService(env.registry, env.store, env.log, end_check_guard=60)
    assert await fresh_guarded.end_check(record.id, await env.log.info(record.id)) is None
    assert not (await env.log.info(record.id)).closed  # finished too recently: left alone
    eager = RunService(env.registry, env.store, env.log, end_check_guard=0)
    assert await eager.end_check(record.id, await env.log.info(record.id)) is None
    info = await env.log.info(record.id)
    assert (info.closed, info.close_status, info.close_reason) == (True, "failed", "boom")
    assert (await all_events(env.log, record.id))[-1].type == END_TYPE


async def test_end_check_ignores_running_runs_and_other_streams(env: Env) -> None:
    env.registry.command("t", ["true"])
    record = await env.service.create("t")
    await env.store.transition(record.id, "running", worker="w")
    eager = RunService(env.registry, env.store, env.log, end_check_guard=0)
    assert await eager.end_check(record.id, await env.log.info(record.id)) is None
    assert await eager.end_check("plain-stream", None) is None
    assert not (await env.log.info(record.id)).closed


# -- lost runs ---------------------------------------------------------------------------


def test_worker_alive_checks_this_host_by_pid() -> None:
    assert not worker_alive(None)
    assert not worker_alive("other-host:1:abc")
    me = new_worker_id()
    assert not worker_alive(me)  # this process, but no pool with that id runs
    host = me.split(":")[0]
    assert worker_alive(f"{host}:1:abc")  # pid 1 always exists


def alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie waiting for its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


async def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        await asyncio.sleep(0.02)  # no notification exists for another process's death


DEAD_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from runstream.backends import open_backend
    from runstream.runs.service import LocalWorkerPool, RunService
    from runstream.backends import open_run_store
    from runstream.runs.tasks import TaskRegistry

    SLOW = (
        "import os, sys, time\\n"
        "marker = sys.argv[1]\\n"
        "if os.path.exists(marker):\\n"
        "    print('second attempt', flush=True); sys.exit(0)\\n"
        "open(marker, 'w').write(str(os.getpid()))\\n"
        "print('started', flush=True)\\n"
        "time.sleep(120)\\n"
    )

    def registry(marker, retries):
        reg = TaskRegistry()
        reg.command("slow", [sys.executable, "-c", SLOW, marker], retries=retries)
        return reg

    async def main(url, marker, retries):
        reg = registry(marker, retries)
        log, store = open_backend(url), open_run_store(url)
        async with log:
            await store.start()
            pool = LocalWorkerPool(reg, store, log, workers=1)
            service = RunService(reg, store, log, dispatcher=pool)
            await pool.start()
            record = await service.create("slow")
            print(record.id, flush=True)
            await asyncio.sleep(3600)

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("retries", [0, 1])
async def test_run_left_running_by_a_killed_server_is_lost_or_retried(
    tmp_path: Path, retries: int
) -> None:
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    marker = tmp_path / "marker"
    script = tmp_path / "dead_worker.py"
    script.write_text(DEAD_WORKER)
    proc = await asyncio.create_subprocess_exec(
        PY, str(script), url, str(marker), str(retries), stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert proc.stdout is not None
    child_pid: int | None = None
    try:
        run_id = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert run_id.startswith("run-")
        log, store = open_backend(url), open_run_store(url)
        async with log:
            await store.start()
            try:
                await wait_for_output(log, run_id, "started")
                child_pid = int(marker.read_text())
                proc.kill()  # kill -9: no cleanup, the run stays "running" in the file
                await proc.wait()
                assert (await store.get(run_id)).status == "running"

                namespace: dict[str, Any] = {}
                exec(compile(DEAD_WORKER, "dead_worker", "exec"), namespace)
                registry = namespace["registry"](str(marker), retries)
                pool = LocalWorkerPool(registry, store, log, workers=1, shutdown_grace=2)
                await pool.start()
                try:
                    assert pool.lost_marked == 1
                    # The dead server's command was killed, not left to run (twice, on retry).
                    await wait_gone(child_pid)
                    if retries == 0:
                        final = await store.get(run_id)
                        assert final.status == "lost"
                        assert final.error is not None and "is gone" in final.error
                        info = await log.info(run_id)
                        assert (info.closed, info.close_status) == (True, "lost")
                        assert await statuses(log, run_id) == ["queued", "running", "lost"]
                    else:
                        final = await wait_status(store, run_id, "succeeded", "failed", "lost")
                        assert (final.status, final.attempt) == ("succeeded", 2)
                        await wait_closed(log, run_id)
                        assert await statuses(log, run_id) == [
                            "queued", "running", "lost", "queued", "running", "succeeded",
                        ]  # fmt: skip
                        assert (await log.info(run_id)).close_status == "succeeded"
                finally:
                    await pool.shutdown()
            finally:
                await store.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if child_pid is not None:
            # The killed server could not stop its child (it runs in its own group).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child_pid, signal.SIGKILL)
