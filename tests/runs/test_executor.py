"""Executing one run with real subprocesses and Python tasks: statuses, events, stream close."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from runstream.backends.base import EventLog
from runstream.backends.memory import MemoryRunStore
from runstream.backends.memory.log import MemoryEventLog
from runstream.backends.sqlite import SQLiteRunStore
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.core.model import END_TYPE, AppendResult, EncodedEvents, Event, NewEvent
from runstream.errors import BackendError
from runstream.runner.lines import LineSplitter, OutputBatch, OutputLine
from runstream.runs.context import RunContext
from runstream.runs.executor import APPEND_CHUNK, RunControl, execute_run, output_sink
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.store import RunStore
from runstream.runs.tasks import TaskSpec

PY = sys.executable


@pytest.fixture
async def log() -> AsyncIterator[EventLog]:
    async with MemoryEventLog() as backend:
        yield backend


@pytest.fixture
def store() -> RunStore:
    return MemoryRunStore()


async def submit(
    store: RunStore, log: EventLog, task: TaskSpec, params: dict[str, Any] | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - the run's timeout, not this call's
) -> RunRecord:  # fmt: skip
    record = RunRecord(
        id=new_run_id(), task=task.name, params=task.validate_params(params or {}),
        status="queued", created_at=time.time(), timeout=task.check_timeout(timeout),
    )  # fmt: skip
    await store.create(record)
    await log.append(record.id, NewEvent("status", {"status": "queued", "attempt": 1}))
    return record


async def events(log: EventLog, run_id: str) -> list[Event]:
    page = await log.read(run_id, 0, 10_000)
    return list(page.events)


def lines(evs: list[Event], stream: str = "stdout") -> list[str]:
    return [e.data["line"] for e in evs if e.type == stream]


def py(code: str) -> list[str]:
    return [PY, "-c", code]


async def test_exit_zero_succeeds_with_output_status_events_and_closed_stream(
    log: EventLog, store: RunStore
) -> None:
    task = TaskSpec.build(
        "hello",
        command=[
            *py("import sys; print('hello', sys.argv[1]); print('oops', file=sys.stderr)"),
            "{name}",
        ],
        params={"name": {"default": "world"}},
    )
    record = await submit(store, log, task)
    final = await execute_run(record, task, log, store, worker="w-test")
    assert final.status == "succeeded"
    assert final.exit_code == 0
    assert final.worker == "w-test"
    assert final.started_at is not None and final.finished_at is not None
    assert await store.get(record.id) == final
    evs = await events(log, record.id)
    assert lines(evs) == ["hello world"]
    assert lines(evs, "stderr") == ["oops"]
    statuses = [e.data for e in evs if e.type == "status"]
    assert statuses[0] == {"status": "queued", "attempt": 1}
    assert statuses[1] == {"status": "running", "attempt": 1, "worker": "w-test"}
    assert statuses[2]["status"] == "succeeded"
    assert statuses[2]["exit_code"] == 0
    assert evs[-1].type == END_TYPE
    assert evs[-1].data["status"] == "succeeded"
    info = await log.info(record.id)
    assert info.closed and info.close_status == "succeeded"


async def test_nonzero_exit_fails_and_keeps_the_exit_code(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build("t", command=py("import sys; sys.exit(3)"))
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert (final.status, final.exit_code, final.error) == ("failed", 3, "exited with code 3")
    info = await log.info(final.id)
    assert (info.close_status, info.close_reason) == ("failed", "exited with code 3")


async def test_signal_death_is_reported_as_such(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build(
        "t", command=py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    )
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert final.status == "failed"
    assert final.exit_code is None
    assert final.error == "killed by signal SIGKILL (9)"
    last_status = [e.data for e in await events(log, final.id) if e.type == "status"][-1]
    assert last_status["signal"] == 9


async def test_program_that_cannot_start_fails_with_a_reason(
    log: EventLog, store: RunStore
) -> None:
    task = TaskSpec.build("t", command=["/nonexistent/program-xyz"])
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert final.status == "failed"
    assert final.error is not None and "not found" in final.error
    assert (await log.info(final.id)).closed


@pytest.mark.parametrize("value", ["; rm -rf /", "$(id)", "`id` && echo pwned", "a\nb", "-x"])
async def test_hostile_param_arrives_verbatim_as_one_argv_item(
    log: EventLog, store: RunStore, value: str
) -> None:
    task = TaskSpec.build(
        "t",
        command=[*py("import sys, json; print(json.dumps(sys.argv[1:]))"), "{v}", "tail"],
        params={"v": {"type": "string"}, "e": {"env": "HOSTILE", "default": "$(id)"}},
    )
    final = await execute_run(await submit(store, log, task, {"v": value}), task, log, store)
    assert final.status == "succeeded"
    assert json.loads(lines(await events(log, final.id))[0]) == [value, "tail"]


async def test_env_param_reaches_the_child_unexpanded(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build(
        "t",
        command=py("import os; print(os.environ['HOSTILE'])"),
        params={"e": {"env": "HOSTILE"}},
    )
    final = await execute_run(
        await submit(store, log, task, {"e": "$(id); $HOME"}), task, log, store
    )
    assert lines(await events(log, final.id)) == ["$(id); $HOME"]


async def test_command_knows_its_run_and_attempt(log: EventLog, store: RunStore) -> None:
    code = "import os; print(os.environ['RUNSTREAM_RUN_ID'], os.environ['RUNSTREAM_ATTEMPT'])"
    task = TaskSpec.build("t", command=py(code))
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert lines(await events(log, final.id)) == [f"{final.id} 1"]


async def test_long_and_unterminated_lines_become_partial_events(
    log: EventLog, store: RunStore
) -> None:
    code = (
        "import sys; sys.stdout.write('a' * 2500 + '\\nlast without newline'); sys.stdout.flush()"
    )
    task = TaskSpec.build("t", command=py(code))
    final = await execute_run(await submit(store, log, task), task, log, store, max_line=1000)
    out = [e.data for e in await events(log, final.id) if e.type == "stdout"]
    assert [d.get("partial", False) for d in out[:3]] == [True, True, False]
    assert "".join(d["line"] for d in out[:3]) == "a" * 2500
    assert out[-1]["line"].endswith("last without newline")
    assert "".join(d["line"] for d in out[3:]) == "last without newline"


async def test_many_lines_are_batched_into_the_log_in_order(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = SQLiteRunStore.from_url(url)
    log = SQLiteEventLog.from_url(url)
    async with log:
        try:
            task = TaskSpec.build("t", command=py("for i in range(5000): print(i)"))
            final = await execute_run(await submit(store, log, task), task, log, store)
            assert final.status == "succeeded"
            assert lines(await events(log, final.id)) == [str(i) for i in range(5000)]
            assert log.commits < 5000 / 10  # batched, not one transaction per line
        finally:
            await store.aclose()


# -- the output sink ------------------------------------------------------------------------

OUTPUT = (
    b"plain\r\nERROR: failed\n[warn] w\n\n"
    b'quote " back\\slash \x00\x1b[1m\n'
    b"0%\r50%\r100%\r\n"
    + "héllo € 😀 \xff".encode()
    + b"\xff\n"
    + b"z" * 40
    + b"\n"
    + b"".join(b"line %d\n" % i for i in range(30))
    + b"no newline"
)


def output_batch() -> OutputBatch:
    """Tricky stdout and stderr output, interleaved, as run_process would hand it over."""
    out, err = LineSplitter("stdout", max_line=16), LineSplitter("stderr")
    batch = OutputBatch()
    for start in range(0, len(OUTPUT), 37):
        batch.extend(out.feed_batch(OUTPUT[start : start + 37]))
        batch.extend(err.feed_batch(OUTPUT[start : start + 37]))
    batch.extend(OutputBatch(out.close()))
    batch.extend(OutputBatch(err.close()))
    return batch


class CountingLog(MemoryEventLog):
    """Records the size of every encoded append; fails the one numbered ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.fail_at = fail_at

    async def _append_encoded(self, stream: str, runs: Sequence[EncodedEvents]) -> AppendResult:
        self.sizes.append(sum(len(run.data_json) for run in runs))
        if len(self.sizes) == self.fail_at:
            raise BackendError("disk full")
        return await super()._append_encoded(stream, runs)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize("chunk", [1, 7, APPEND_CHUNK])
async def test_output_sink_stores_what_an_event_per_record_would(
    tmp_path: Path, backend: str, chunk: int
) -> None:
    batch = output_batch()
    records = list(batch)
    assert {r.stream for r in records} == {"stdout", "stderr"}
    assert any(r.partial for r in records) and any(r.cr for r in records)
    assert any(r.level for r in records)
    log: EventLog = MemoryEventLog() if backend == "memory" else SQLiteEventLog(tmp_path / "x.db")
    async with log:
        await output_sink(log, "fast", chunk=chunk)(batch)
        await output_sink(log, "from-list", chunk=chunk)(records)  # any sequence works
        await log.append("plain", [NewEvent(r.stream, r.to_data()) for r in records])
        expected = [(e.id, e.type, e.data) for e in await events(log, "plain")]
        assert [(e.id, e.type, e.data) for e in await events(log, "fast")] == expected
        assert [(e.id, e.type, e.data) for e in await events(log, "from-list")] == expected


async def test_output_sink_appends_in_chunks_and_stops_at_a_failed_one() -> None:
    records = [OutputLine("stdout" if i % 700 < 400 else "stderr", f"l{i}") for i in range(2500)]
    async with CountingLog() as log:
        await output_sink(log, "s", chunk=1000)(OutputBatch(records))
        assert log.sizes == [1000, 1000, 500]
        stored = await events(log, "s")
        assert [(e.type, e.data["line"]) for e in stored] == [(r.stream, r.line) for r in records]
    async with CountingLog(fail_at=2) as log:
        with pytest.raises(BackendError):
            await output_sink(log, "s", chunk=1000)(OutputBatch(records))
        assert log.sizes == [1000, 1000]  # the third chunk was never sent
        assert (await log.info("s")).last_id == 1000


async def test_timeout_ends_in_timed_out(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build(
        "t", command=py("import time; print('start', flush=True); time.sleep(60)")
    )
    record = await submit(store, log, task, timeout=0.5)
    started = time.monotonic()
    final = await execute_run(record, task, log, store)
    assert time.monotonic() - started < 20
    assert final.status == "timed_out"
    assert final.error == "timed out after 0.5s"
    assert lines(await events(log, final.id)) == ["start"]
    assert (await log.info(final.id)).close_status == "timed_out"


async def test_local_cancel_ends_in_cancelled(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build("t", command=py("import time; print('up', flush=True); time.sleep(60)"))
    record = await submit(store, log, task)
    control = RunControl()
    running = asyncio.create_task(execute_run(record, task, log, store, control=control))
    await wait_for_line(log, record.id, "up")
    control.cancel("stop it")
    final = await asyncio.wait_for(running, 20)
    assert (final.status, final.error) == ("cancelled", "stop it")
    assert (await log.info(final.id)).close_status == "cancelled"


async def test_cancel_flag_in_the_store_reaches_the_run(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build("t", command=py("import time; print('up', flush=True); time.sleep(60)"))
    record = await submit(store, log, task)
    running = asyncio.create_task(execute_run(record, task, log, store, cancel_poll=0.05))
    await wait_for_line(log, record.id, "up")
    await store.request_cancel(record.id)
    final = await asyncio.wait_for(running, 20)
    assert final.status == "cancelled"


async def test_child_ignoring_sigterm_is_killed_after_grace(log: EventLog, store: RunStore) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    task = TaskSpec.build("t", command=py(code), grace=0.3)
    record = await submit(store, log, task)
    control = RunControl()
    running = asyncio.create_task(execute_run(record, task, log, store, control=control))
    await wait_for_line(log, record.id, "up")
    control.cancel()
    final = await asyncio.wait_for(running, 20)
    assert final.status == "cancelled"
    last = [e.data for e in await events(log, final.id) if e.type == "status"][-1]
    assert last["signal"] == 9


async def test_run_no_longer_queued_is_not_executed(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build("t", command=py("print('should not run')"))
    record = await submit(store, log, task)
    await store.transition(record.id, "cancelled")
    final = await execute_run(record, task, log, store)
    assert final.status == "cancelled"
    assert lines(await events(log, record.id)) == []


async def test_decision_by_someone_else_is_not_overwritten_and_stops_the_work(
    log: EventLog, store: RunStore
) -> None:
    task = TaskSpec.build("t", command=py("import time; print('up', flush=True); time.sleep(60)"))
    record = await submit(store, log, task)
    running = asyncio.create_task(
        execute_run(record, task, log, store, worker="zombie", cancel_poll=0.05)
    )
    await wait_for_line(log, record.id, "up")
    await store.transition(record.id, "lost", error="declared dead")
    final = await asyncio.wait_for(running, 20)  # the child was stopped, not waited for
    assert (final.status, final.error) == ("lost", "declared dead")
    assert not (await log.info(record.id)).closed  # closing is the decider's job


async def wait_for_line(log: EventLog, run_id: str, text: str) -> None:
    async def look() -> None:
        async for item in log.follow(run_id):
            if isinstance(item, Event) and item.type == "stdout" and item.data["line"] == text:
                return

    await asyncio.wait_for(look(), 20)


# -- Python tasks -------------------------------------------------------------------------


async def test_python_function_result_progress_and_log(log: EventLog, store: RunStore) -> None:
    async def work(ctx: RunContext) -> dict[str, Any]:
        await ctx.progress(current=1, total=2, message="half")
        await ctx.log("info", "fine")
        await ctx.log("warn", "careful\nvery")
        await ctx.emit("custom", {"k": ctx.params["n"]})
        return {"answer": ctx.params["n"] * 2}

    task = TaskSpec.build("work", callable=work, params={"n": "integer"})
    final = await execute_run(await submit(store, log, task, {"n": 21}), task, log, store)
    assert final.status == "succeeded"
    evs = await events(log, final.id)
    body = [(e.type, e.data) for e in evs if e.type not in ("status", END_TYPE)]
    assert body == [
        ("progress", {"current": 1, "total": 2, "message": "half"}),
        ("stdout", {"line": "fine", "level": "info"}),
        ("stderr", {"line": "careful", "level": "warning"}),
        ("stderr", {"line": "very", "level": "warning"}),
        ("custom", {"k": 21}),
        ("result", {"answer": 42}),
    ]
    assert (await log.info(final.id)).close_status == "succeeded"


async def test_async_generator_yields_become_item_events(log: EventLog, store: RunStore) -> None:
    async def gen(ctx: RunContext) -> AsyncIterator[int]:
        for i in range(3):
            yield i

    task = TaskSpec.build("gen", callable=gen)
    final = await execute_run(await submit(store, log, task), task, log, store)
    evs = await events(log, final.id)
    assert [(e.type, e.data) for e in evs if e.type in ("item", "result")] == [
        ("item", 0), ("item", 1), ("item", 2),
    ]  # fmt: skip
    assert final.status == "succeeded"


async def test_python_exception_fails_the_run_with_its_traceback(
    log: EventLog, store: RunStore
) -> None:
    async def broken(ctx: RunContext) -> None:
        raise RuntimeError("bad input")

    task = TaskSpec.build("broken", callable=broken)
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert (final.status, final.error) == ("failed", "RuntimeError: bad input")
    err = lines(await events(log, final.id), "stderr")
    assert err[0].startswith("Traceback")
    assert err[-1] == "RuntimeError: bad input"


async def test_an_exception_text_utf8_cannot_hold_still_fails_the_run_cleanly(
    log: EventLog, store: RunStore
) -> None:
    async def broken(ctx: RunContext) -> None:
        raise FileNotFoundError("no such file: b'\udcff.txt'")

    task = TaskSpec.build("broken", callable=broken)
    final = await execute_run(await submit(store, log, task), task, log, store)
    expected = "FileNotFoundError: no such file: b'\ufffd.txt'"
    assert (final.status, final.error) == ("failed", expected)
    assert (await store.get(final.id)).error == expected
    evs = await events(log, final.id)
    assert lines(evs, "stderr")[-1] == expected
    assert evs[-2].data["error"] == expected
    assert (await log.info(final.id)).close_reason == expected


async def test_reserved_event_type_fails_the_python_run(log: EventLog, store: RunStore) -> None:
    async def cheat(ctx: RunContext) -> None:
        await ctx.emit("status", {"status": "succeeded"})

    task = TaskSpec.build("cheat", callable=cheat)
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert final.status == "failed"
    assert "reserved" in (final.error or "")


async def test_non_json_result_fails_the_run(log: EventLog, store: RunStore) -> None:
    async def odd(ctx: RunContext) -> object:
        return object()

    task = TaskSpec.build("odd", callable=odd)
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert final.status == "failed"
    assert "JSON" in (final.error or "")


async def test_cooperative_python_task_sees_cancelled_and_returns(
    log: EventLog, store: RunStore
) -> None:
    started = asyncio.Event()
    cleaned = asyncio.Event()

    async def patient(ctx: RunContext) -> None:
        started.set()
        await ctx.cancelled.wait()
        await ctx.log("info", "cleaning up")
        cleaned.set()

    task = TaskSpec.build("patient", callable=patient, grace=10)
    control = RunControl()
    record = await submit(store, log, task)
    running = asyncio.create_task(execute_run(record, task, log, store, control=control))
    await asyncio.wait_for(started.wait(), 10)
    control.cancel()
    final = await asyncio.wait_for(running, 10)
    assert cleaned.is_set()
    assert final.status == "cancelled"
    assert lines(await events(log, final.id)) == ["cleaning up"]


async def test_uncooperative_python_task_is_cancelled_after_grace(
    log: EventLog, store: RunStore
) -> None:
    interrupted = asyncio.Event()

    async def stubborn(ctx: RunContext) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    task = TaskSpec.build("stubborn", callable=stubborn, grace=0.2)
    final = await execute_run(await submit(store, log, task, timeout=0.3), task, log, store)
    assert interrupted.is_set()
    assert (final.status, final.error) == ("timed_out", "timed out after 0.3s")
    assert (await log.info(final.id)).close_status == "timed_out"


async def test_python_task_that_cannot_be_imported_fails(log: EventLog, store: RunStore) -> None:
    task = TaskSpec.build("ghost", callable="no_such_module_xyz:fn")
    final = await execute_run(await submit(store, log, task), task, log, store)
    assert final.status == "failed"
    assert "cannot import" in (final.error or "")
