"""Execute one run: queued → running → its final status, recorded in the store and the stream.

:func:`execute_run` is what every worker (the in-process pool, ``runstream
worker``) calls for a run it took. In order it

1. moves the run ``queued → running`` in the store (compare-and-set: if another
   worker got there first, or the run was cancelled meanwhile, it returns that
   record and does nothing else) and appends ``status`` ``{"status":
   "running", "attempt", "worker"}`` to the run's stream (named by the run id);
2. runs the command with :func:`runstream.runner.process.run_process`, output
   lines going to the stream as ``stdout``/``stderr`` events in batches (see
   :func:`output_sink`), or the Python task with a
   :class:`~runstream.runs.context.RunContext`;
3. maps the outcome to a final status — exit 0 → ``succeeded``; non-zero exit or
   death by signal → ``failed`` (``exit_code`` kept; ``error`` names the
   signal); ``timed_out``; ``cancelled`` — and stores it with ``exit_code``,
   ``error`` and ``finished_at``, fenced on this worker and attempt (a worker
   that was presumed dead cannot overwrite what the janitor decided);
4. appends the final ``status`` event and closes the stream with the final
   status (the error, if any, as the close reason).

Cancellation reaches a running run two ways: the store's ``cancel_requested``
flag (polled every ``cancel_poll`` seconds, so any process sharing the store
can cancel) and :meth:`RunControl.cancel` (immediate, for the process that runs
it). The timeout is the run's own (``RunRecord.timeout``, which the service
caps at the task's) or else the task's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from runstream.backends.base import EventLog
from runstream.core.model import EncodedEvents, NewEvent, encode_data
from runstream.errors import IllegalTransition, RunstreamError
from runstream.runner.lines import DEFAULT_MAX_LINE, OutputLine, encode_runs
from runstream.runner.process import DEFAULT_FLUSH_INTERVAL, ProcessResult, Sink, run_process
from runstream.runs.context import RunContext
from runstream.runs.lifecycle import EffectFailed, Lifecycle, RunStatus, storable_text
from runstream.runs.model import RunRecord
from runstream.runs.store import RunStore
from runstream.runs.tasks import TaskSpec

__all__ = [
    "APPEND_CHUNK",
    "ATTEMPT_ENV",
    "CANCEL_POLL",
    "RUN_ID_ENV",
    "RunControl",
    "describe_exit",
    "execute_run",
    "new_worker_id",
    "output_sink",
]

APPEND_CHUNK = 1000
"""Most output events appended in one call (one transaction on SQLite)."""

CANCEL_POLL = 0.5
"""Seconds between checks of the store's cancel flag while a run executes."""

RUN_ID_ENV = "RUNSTREAM_RUN_ID"
"""Environment variable holding the run id in every command a run starts."""
ATTEMPT_ENV = "RUNSTREAM_ATTEMPT"
"""Environment variable holding the attempt number (1 unless the run was retried)."""

ABANDON_AFTER = 5.0
"""Seconds a cancelled Python task may take to unwind before it is left behind."""

log = logging.getLogger("runstream.runs")


async def _stop_task(task: asyncio.Task[None], run_id: str) -> None:
    """Cancel ``task`` and wait (bounded) for it to unwind; never raises its errors.

    Waiting with :func:`asyncio.wait` keeps a cancellation of the *caller* intact.
    """
    if not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=ABANDON_AFTER)
    if not task.done():
        log.warning("run %s: the Python task ignores cancellation; leaving it behind", run_id)
    elif not task.cancelled():
        task.exception()  # retrieved, so asyncio does not report it as never retrieved


def new_worker_id() -> str:
    """``host:pid:random`` — also what lost-run detection parses to decide if a worker lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


@dataclass(slots=True)
class RunControl:
    """The executing process's handle on a run: cancel it now, with a reason.

    ``reason`` ends up in the run's ``error``. Cancelling twice keeps the first reason.
    """

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None

    def cancel(self, reason: str = "cancelled by request") -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()


def output_sink(log: EventLog, stream: str, *, chunk: int = APPEND_CHUNK) -> Sink:
    """The sink through which a command's output reaches ``stream``: one event per record.

    Each record becomes a ``stdout``/``stderr`` event with
    :meth:`~runstream.runner.lines.OutputLine.to_data` as data, in order,
    appended in chunks of at most ``chunk`` events, each chunk atomic (one
    transaction on SQLite) and appended once the previous one is stored. The data
    JSON is made a run at a time by :func:`~runstream.runner.lines.encode_runs`
    and appended with :meth:`~runstream.backends.base.EventLog.append_encoded`,
    which stores exactly what appending ``NewEvent(line.stream, line.to_data())``
    for each record would, at a fraction of the cost per line.
    """

    async def sink(batch: Sequence[OutputLine]) -> None:
        for events in _append_chunks(batch, chunk):
            await log.append_encoded(stream, events)

    return sink


def _append_chunks(batch: Sequence[OutputLine], size: int) -> Iterator[list[EncodedEvents]]:
    """The batch's events in order, as appends of at most ``size``, encoded when reached."""
    pieces: list[tuple[str, list[str]]] = []  # neighbours of one type merged
    count = 0
    for type_, data_json in encode_runs(batch):
        start = 0
        while start < len(data_json):
            take = min(size - count, len(data_json) - start)
            part = data_json[start : start + take]
            if pieces and pieces[-1][0] == type_:
                pieces[-1][1].extend(part)
            else:
                pieces.append((type_, part))
            start += take
            count += take
            if count == size:
                yield [EncodedEvents(t, data) for t, data in pieces]
                pieces, count = [], 0
    if pieces:
        yield [EncodedEvents(t, data) for t, data in pieces]


def describe_exit(result: ProcessResult) -> tuple[RunStatus, str | None]:
    """The final status and error text for a finished child (before cancel/timeout causes)."""
    if result.outcome == "failed_to_start":
        return "failed", result.error or "the program could not be started"
    if result.outcome == "timed_out":
        return "timed_out", None
    if result.outcome == "cancelled":
        return "cancelled", None
    if result.signal is not None:
        try:
            name = signal.Signals(result.signal).name
        except ValueError:
            name = f"signal {result.signal}"
        return "failed", f"killed by signal {name} ({result.signal})"
    if result.exit_code == 0:
        return "succeeded", None
    return "failed", f"exited with code {result.exit_code}"


@dataclass(slots=True)
class _Outcome:
    status: RunStatus
    exit_code: int | None = None
    error: str | None = None
    signal: int | None = None


async def execute_run(
    record: RunRecord,
    task: TaskSpec,
    log: EventLog,
    store: RunStore,
    *,
    worker: str | None = None,
    control: RunControl | None = None,
    cancel_poll: float = CANCEL_POLL,
    max_line: int = DEFAULT_MAX_LINE,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
) -> RunRecord:
    """Run ``record`` (which must be ``queued``) to its end and return the final record.

    Returns without running anything if the run is no longer ``queued`` (the
    returned record says what it is). Never raises for a failing task: the
    failure becomes the run's status. Raises only
    :class:`~runstream.errors.BackendError` when the store itself fails before
    the run started, or :class:`asyncio.CancelledError` if the calling task is
    cancelled (the child is killed and the run recorded as ``cancelled``
    first, best effort).
    """
    execution = _Execution(
        record, task, Lifecycle(store, log), worker or new_worker_id(), control or RunControl()
    )
    return await execution.run(
        cancel_poll=cancel_poll, max_line=max_line, flush_interval=flush_interval
    )


class _Execution:
    def __init__(
        self,
        record: RunRecord,
        task: TaskSpec,
        lifecycle: Lifecycle,
        worker: str,
        control: RunControl,
    ) -> None:
        self.record = record
        self.task = task
        self.lifecycle, self.log, self.store = lifecycle, lifecycle.log, lifecycle.store
        self.worker = worker
        self.control = control
        self.stop = asyncio.Event()
        """Set when the run must stop: cancelled (see ``control``) or timed out."""
        self.timed_out = False
        self.timeout = record.timeout if record.timeout is not None else task.timeout

    async def run(self, *, cancel_poll: float, max_line: int, flush_interval: float) -> RunRecord:
        started = time.monotonic()
        try:
            outcome = await self._start()
        except IllegalTransition:
            return await self.store.get(self.record.id)
        except asyncio.CancelledError:
            # The move may be stored: record it cancelled (fenced, so a no-op if it was not).
            await self._finish_cancelled(started)
            raise
        watcher = asyncio.create_task(self._watch_cancel(cancel_poll))
        try:
            try:
                if outcome is None:
                    if self.task.command is not None:
                        outcome = await self._run_command(max_line, flush_interval)
                    else:
                        outcome = await self._run_python()
            except asyncio.CancelledError:
                await self._finish_cancelled(started)
                raise
            except RunstreamError as exc:
                # The log or store failed under the run (e.g. the backend went away).
                outcome = _Outcome("failed", error=f"run could not be recorded: {exc}")
            return await self._finish(outcome, started)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _start(self) -> _Outcome | None:
        """``queued → running``; a ``failed`` outcome if the stream refused the status event
        (then the output could not be recorded either: the task is not started)."""
        fields: dict[str, Any] = {"worker": self.worker, "started_at": time.time()}
        try:
            self.record = await self.lifecycle.advance(
                self.record.id, "queued", "running", strict=True, **fields
            )
        except EffectFailed as exc:
            self.record = exc.record
            return _Outcome("failed", error=f"run could not be recorded: {exc.__cause__}")
        return None

    # -- stopping ---------------------------------------------------------------

    async def _watch_cancel(self, interval: float) -> None:
        """Set ``stop`` on a local cancel or the store's cancel flag (polled: no wake-up exists)."""
        if self.record.cancel_requested:
            self.control.cancel()
        while not self.control.cancelled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.control.event.wait(), interval)
            if self.control.cancelled:
                break
            try:
                current = await self.store.get(self.record.id)
            except RunstreamError:
                continue  # a store hiccup must not kill the run; try again next time
            if current.cancel_requested:
                self.control.cancel()
            elif (current.status, current.worker, current.attempt) != (
                "running",
                self.worker,
                self.record.attempt,
            ):
                # Someone else settled this attempt (e.g. declared it lost): stop the work;
                # the fenced final transition keeps their decision.
                self.control.cancel(f"run is {current.status} and no longer run by this worker")
        self.stop.set()

    def _stop_status(self) -> _Outcome:
        if self.timed_out:
            return _Outcome("timed_out", error=f"timed out after {self.timeout:g}s")
        return _Outcome("cancelled", error=self.control.reason or "cancelled by request")

    # -- commands -----------------------------------------------------------------

    async def _run_command(self, max_line: int, flush_interval: float) -> _Outcome:
        task, record = self.task, self.record
        argv = task.build_argv(record.params)
        env = task.build_env(record.params)
        # Tells the command which run it is, and lets a later process find (and stop)
        # what a crashed worker left running: see runstream.runs.service.kill_orphans.
        env[RUN_ID_ENV] = record.id
        env[ATTEMPT_ENV] = str(record.attempt)

        result = await run_process(
            argv,
            sink=output_sink(self.log, record.id),
            env=env,
            cwd=task.cwd,
            timeout=self.timeout,
            grace=task.grace,
            cancel=self.stop,
            max_line=max_line,
            flush_interval=flush_interval,
        )
        status, error = describe_exit(result)
        if result.outcome == "timed_out":
            self.timed_out = True
        if status in ("timed_out", "cancelled"):
            error = self._stop_status().error
        return _Outcome(status, result.exit_code, error, result.signal)

    # -- Python tasks ---------------------------------------------------------------

    async def _run_python(self) -> _Outcome:
        record, task = self.record, self.task
        ctx = RunContext(
            run_id=record.id,
            task=task.name,
            params=record.params,
            log=self.log,
            attempt=record.attempt,
            cancelled=asyncio.Event(),
        )
        try:
            fn = task.resolve()
        except RunstreamError as exc:
            return _Outcome("failed", error=str(exc))
        body = asyncio.create_task(self._call(fn, ctx), name=f"runstream-task:{record.id}")
        stopper = asyncio.create_task(self.stop.wait())
        try:
            done, _ = await asyncio.wait(
                (body, stopper), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if body not in done:
                if stopper not in done:
                    self.timed_out = True
                ctx.cancelled.set()
                # Cooperative first: the task sees ctx.cancelled and may return on its own.
                await asyncio.wait((body,), timeout=task.grace)
                await _stop_task(body, record.id)
                return self._stop_status()
        finally:
            stopper.cancel()
            if not body.done():
                await _stop_task(body, record.id)
        if body.cancelled():
            return _Outcome("failed", error="the task raised CancelledError by itself")
        error = body.exception()
        if error is None:
            return _Outcome("succeeded")
        return await self._python_failure(error)

    async def _call(self, fn: Any, ctx: RunContext) -> None:
        if inspect.isasyncgenfunction(fn):
            gen: AsyncIterator[Any] = fn(ctx)
            try:
                async for value in gen:
                    await ctx.emit("item", value)
            finally:
                aclose = getattr(gen, "aclose", None)
                if aclose is not None:
                    await aclose()
            return
        value = await fn(ctx)
        encode_data(value)  # a result that is not JSON fails the run, with a clear error
        await ctx.emit("result", value)

    async def _python_failure(self, exc: BaseException) -> _Outcome:
        # A message may hold what UTF-8 cannot (e.g. a surrogate-escaped file name).
        text = storable_text("".join(traceback.format_exception(exc)).rstrip("\n"))
        lines = [NewEvent("stderr", {"line": line, "level": "error"}) for line in text.split("\n")]
        with contextlib.suppress(RunstreamError):
            for i in range(0, len(lines), APPEND_CHUNK):
                await self.log.append(self.record.id, lines[i : i + APPEND_CHUNK])
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return _Outcome("failed", error=message)

    # -- the end ------------------------------------------------------------------------

    async def _finish_cancelled(self, started: float) -> None:
        self.control.cancel("the worker executing the run was stopped")
        with contextlib.suppress(BaseException):
            await asyncio.shield(
                self._finish(_Outcome("cancelled", error=self.control.reason), started)
            )

    async def _finish(self, outcome: _Outcome, started: float) -> RunRecord:
        record = self.record
        extra: dict[str, Any] = {"duration": round(time.monotonic() - started, 3)}
        if outcome.signal is not None:
            extra["signal"] = outcome.signal
        try:
            return await self.lifecycle.advance(
                record.id,
                "running",
                outcome.status,
                match={"worker": self.worker, "attempt": record.attempt},
                event=extra,
                exit_code=outcome.exit_code,
                error=outcome.error,
                finished_at=time.time(),
            )
        except IllegalTransition:
            # Someone else decided this attempt's fate (e.g. it was declared lost):
            # theirs stands, and closing the stream is theirs to do.
            return await self.store.get(record.id)
