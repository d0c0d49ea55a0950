"""Resource gates: a queued run waits, with its reason visible, and starts when the gate opens.

The decisions are tested without I/O; the waiting and the start on every
worker kind: the in-process pool on memory and SQLite, and a Redis worker.
The probe is injected, so the test opens and closes the gate itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runstream.backends import EventLog, open_backend, open_run_store
from runstream.core.model import END_TYPE, Event
from runstream.errors import ConfigError
from runstream.runs.context import RunContext
from runstream.runs.gates import (
    WAITING_KEY,
    Gate,
    Gates,
    Resources,
    closed_reason,
    gates_from_settings,
)
from runstream.runs.model import RunRecord
from runstream.runs.scheduler import Job, Scheduler
from runstream.runs.service import LocalWorkerPool, RunService
from runstream.runs.store import RunStore
from runstream.runs.tasks import TaskRegistry, TaskSpec

GiB = 2**30


# -- decisions -----------------------------------------------------------------------


def test_closed_reason_names_every_unmet_minimum() -> None:
    gate = Gate(min_free_memory=2 * GiB, min_free_disk=10 * GiB, max_load=2.0)
    now = Resources(free_memory=int(1.2 * GiB), free_disk=20 * GiB, load=3.1)
    assert closed_reason(gate, now) == "free memory 1.2 GiB < 2.0 GiB; load 3.10 per CPU > 2.00"
    assert closed_reason(gate, Resources(4 * GiB, 20 * GiB, 0.5)) is None
    assert closed_reason(gate, Resources()) is None, "what cannot be measured does not close"
    assert closed_reason(Gate(), now) is None


def test_the_stricter_of_two_gates_wins() -> None:
    merged = Gate(min_free_memory=GiB, max_load=4.0).stricter(Gate(2 * GiB, GiB, 2.0))
    assert merged == Gate(2 * GiB, GiB, 2.0)
    assert Gate().stricter(Gate(max_load=1.0)) == Gate(max_load=1.0)


@pytest.mark.parametrize(
    "table",
    [{"min_free_memory": -1}, {"min_free_disk": "1G"}, {"max_load": 0}, {"nope": 1}, 5],
)
def test_a_bad_gate_table_is_a_config_error(table: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[tasks.t\]"):
        TaskSpec.from_config("t", {"command": ["true"], "gate": table})


def test_a_task_declares_its_gate_and_retention() -> None:
    spec = TaskSpec.from_config(
        "t",
        {
            "command": ["true"],
            "gate": {"min_free_memory": GiB, "max_load": 1.5},
            "retention": {"max_age": 3600, "max_runs": 10},
        },
    )
    assert spec.gate == Gate(min_free_memory=GiB, max_load=1.5)
    assert spec.to_json()["gate"] == {"min_free_memory": GiB, "max_load": 1.5}
    assert spec.to_json()["retention"] == {"max_age": 3600.0, "max_runs": 10}
    with pytest.raises(ConfigError, match="max_runs"):
        TaskSpec.from_config("t", {"command": ["true"], "retention": {"max_runs": -1}})


async def test_the_scheduler_holds_a_gated_job_and_starts_it_on_recheck() -> None:
    closed: list[str | None] = ["no memory"]
    waits: list[tuple[str, str | None]] = []
    started = asyncio.Event()

    async def run() -> None:
        started.set()

    scheduler = Scheduler(
        2,
        gate=lambda job: closed[0] if job.gate == "gated" else None,
        on_wait=lambda job, reason: waits.append((job.key, reason)),
        gate_interval=3600,
    )
    gated = Job("a", "t", run, gate="gated")
    free = Job("b", "t", lambda: asyncio.sleep(0))
    scheduler.submit(gated)
    scheduler.submit(free)
    assert scheduler.pending == ["a"] and gated.waiting == "no memory"
    assert waits == [("a", "no memory")]
    scheduler.recheck()
    assert waits == [("a", "no memory")], "the same reason is reported once"
    closed[0] = None
    scheduler.recheck()
    await asyncio.wait_for(started.wait(), 10)
    await scheduler.wait_idle()


# -- on every worker kind ------------------------------------------------------------


@dataclass
class Probe:
    """The machine as the test says it is."""

    free_memory: int = GiB
    calls: int = 0

    def __call__(self) -> Resources:
        self.calls += 1
        return Resources(free_memory=self.free_memory)


async def quick(ctx: RunContext) -> str:
    await ctx.emit("hi", {})
    return "done"


@dataclass
class Workers:
    service: RunService
    store: RunStore
    log: EventLog
    stops: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def gated_registry() -> TaskRegistry:
    registry = TaskRegistry()
    registry.python("heavy", quick, gate=Gate(min_free_memory=2 * GiB))
    registry.python("light", quick)
    return registry


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def workers(
    request: pytest.FixtureRequest, tmp_path: Path, probe: Probe
) -> AsyncIterator[Workers]:
    kind = request.param
    registry = gated_registry()
    gates = Gates(probe=probe, interval=0.05)
    if kind == "redis":
        from runstream.backends.redis.dispatch import RedisRunQueue, RedisWorker, WorkerOptions

        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?prefix=g{uuid.uuid4().hex[:10]}"
    else:
        url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'g.db'}"
    log = open_backend(url)
    store = open_run_store(url)
    async with log:
        await store.start()
        service = RunService(registry, store, log)
        env = Workers(service, store, log)
        if kind == "redis":
            worker = RedisWorker(
                store,  # type: ignore[arg-type]
                log,
                registry,
                options=WorkerOptions(concurrency=2, name=f"w-{uuid.uuid4().hex[:6]}"),
                gates=gates,
            )
            service.dispatcher = RedisRunQueue(worker.store)
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            await asyncio.wait_for(worker.ready.wait(), 10)

            async def stop_worker() -> None:
                stop.set()
                await asyncio.wait_for(task, 30)

            env.stops.append(stop_worker)
        else:
            pool = LocalWorkerPool(registry, store, log, workers=2, gates=gates)
            service.dispatcher = pool
            await pool.start()
            env.stops.append(pool.shutdown)
        try:
            yield env
        finally:
            for stop_fn in env.stops:
                await stop_fn()
            await store.aclose()


@pytest.fixture
def probe() -> Probe:
    return Probe()


async def until_end(log: EventLog, run_id: str) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(30):
        async for item in log.follow(run_id):
            assert isinstance(item, Event)
            out.append(item)
    assert out[-1].type == END_TYPE
    return out


async def waiting_note(store: RunStore, run_id: str) -> RunRecord:
    """The run's record once its waiting reason is stored (written by a background task)."""
    deadline = time.monotonic() + 10
    while WAITING_KEY not in (record := await store.get(run_id)).extra:
        assert time.monotonic() < deadline, "the waiting reason never appeared"
        await asyncio.sleep(0.01)
    return record


async def test_a_gated_run_waits_queued_with_its_reason_and_starts_when_the_gate_opens(
    workers: Workers, probe: Probe
) -> None:
    heavy = await workers.service.create("heavy")
    light = await workers.service.create("light")

    # An ungated task is not held up by the gated one.
    assert [e.type for e in await until_end(workers.log, light.id)][-1] == END_TYPE
    waiting = await waiting_note(workers.store, heavy.id)
    assert waiting.status == "queued"
    assert waiting.to_json()["waiting"] == "free memory 1.0 GiB < 2.0 GiB"

    probe.free_memory = 4 * GiB  # the gate opens; the next check starts the run
    events = await until_end(workers.log, heavy.id)
    assert [e.data["status"] for e in events if e.type == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
    final = await workers.store.get(heavy.id)
    assert final.status == "succeeded"
    assert WAITING_KEY not in final.extra
    assert "waiting" not in final.to_json()


def test_gates_from_settings_is_none_when_nothing_is_gated() -> None:
    from runstream.config import GateSettings, Settings

    assert gates_from_settings(Settings(), gated_registry()) is not None  # a task has a gate
    assert gates_from_settings(Settings(), TaskRegistry()) is None
    settings = Settings(gates=GateSettings(max_load=2.0, interval=1.0))
    gates = gates_from_settings(settings, TaskRegistry())
    assert gates is not None and gates.default == Gate(max_load=2.0) and gates.interval == 1.0
