"""The runs service (create, get, list, cancel) and the in-process worker pool.

:class:`RunService` is what the HTTP API and the CLI call. It validates a run
against its task, stores the record, creates the run's stream with a first
``status`` ``{"status": "queued", "attempt": 1}`` event and hands the run to a
:class:`Dispatcher`: the in-process :class:`LocalWorkerPool` for SQLite and
memory, or the Redis queue when workers run elsewhere. Without a dispatcher a
run stays queued until a pool sharing the store picks it up (pools scan for
queued runs at start and every ``rescan_interval`` seconds).

:class:`LocalWorkerPool` is what ``runstream serve --workers N`` runs:

* at most ``workers`` runs at once, and at most ``concurrency`` runs of one
  task; runs start in the order they were submitted, a run waiting for its
  task's limit does not hold up runs of other tasks;
* on start it marks runs left ``running`` by a dead process (same SQLite
  file; the worker id names host and pid) as ``lost``, kills what is left of
  their commands (:func:`kill_orphans`), and queues them again with the next
  attempt if the task's ``retries`` allow, else closes their stream with
  ``lost``; then it queues every ``queued`` run it finds;
* :meth:`~LocalWorkerPool.shutdown` stops taking work, lets running runs
  finish for ``grace`` seconds, then cancels the rest cleanly (each child gets
  SIGTERM, then SIGKILL after its task's grace; the run ends ``cancelled``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any, Protocol

from runstream.backends.base import EventLog
from runstream.config import RUN_GRACE
from runstream.core.model import END_TYPE, Event, StreamInfo
from runstream.errors import (
    ConfigError,
    IllegalTransition,
    RunNotFound,
    RunstreamError,
    StreamNotFound,
)
from runstream.runs.executor import (
    CANCEL_POLL,
    RUN_ID_ENV,
    execute_run,
    new_worker_id,
)
from runstream.runs.feed import RUN_FEED, is_final
from runstream.runs.gates import Gates, WaitNotes
from runstream.runs.lifecycle import FINISHED, TERMINAL, Lifecycle, RunStatus
from runstream.runs.metrics import RunMetrics
from runstream.runs.model import RUN_ID_RE, RunRecord, new_run_id
from runstream.runs.retention import DELETE_BATCH, RUN_PAGE
from runstream.runs.scheduler import Job, Scheduler
from runstream.runs.store import RunStore
from runstream.runs.tasks import TaskRegistry, TaskSpec

__all__ = [
    "DEFAULT_SHUTDOWN_GRACE",
    "DEFAULT_WORKERS",
    "Dispatcher",
    "LocalWorkerPool",
    "RunService",
    "kill_orphans",
    "worker_alive",
]

log = logging.getLogger("runstream.runs")

DEFAULT_WORKERS = 4
"""Runs executed at once by ``runstream serve`` when ``--workers`` is not given."""

DEFAULT_SHUTDOWN_GRACE = RUN_GRACE
"""Seconds running runs get to finish on shutdown before they are cancelled."""

DEFAULT_RESCAN_INTERVAL = 5.0
"""Seconds between scans for queued runs that other processes created."""

RESCAN_COALESCE = 0.02
"""Seconds a pool woken by the runs feed waits before scanning, so a burst scans once."""

FORCE_DELETE_MARGIN = 15.0
"""Seconds beyond its task's grace that a forced delete waits for a cancelled run to end."""

END_CHECK_GUARD = 10.0
"""A run finished less than this long ago is left alone by :meth:`RunService.end_check`:
its executor is still writing the final status event and closing the stream."""

_SCAN_PAGE = 500

RUN_ID_PREFIX = "run-"
"""Every run id starts with this (see :func:`runstream.runs.model.new_run_id`); other
streams are not runs and cost the end check no store lookup."""

_LIVE_WORKERS: set[str] = set()
"""Worker ids of the pools running in this process (a pool in this process is alive
exactly while it is listed here; other processes are checked by pid)."""


class Dispatcher(Protocol):
    """Where new runs go and how a cancel reaches the process running them."""

    async def submit(self, record: RunRecord) -> None:
        """Queue ``record`` (status ``queued``, stored, stream created) for execution."""

    async def cancel(self, record: RunRecord) -> None:
        """The run's cancel flag is set; stop it now if this dispatcher runs it."""


def worker_alive(worker: str | None) -> bool:
    """Whether the worker that wrote ``worker`` (``host:pid:random``) may still be running.

    Only decidable on this host: a pool of this process is alive while it runs;
    another process is alive while its pid exists. Anything else (no worker,
    another host, an unparsable id) counts as gone — the local store is shared
    only by processes on one machine.
    """
    if not worker:
        return False
    if worker in _LIVE_WORKERS:
        return True
    host, _, rest = worker.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # ours, but no pool of this process has that id any more
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_orphans(run_id: str) -> int:
    """SIGKILL the process groups on this host still running a command of ``run_id``.

    A worker killed with ``kill -9`` cannot stop its children: they run in
    their own process groups and would go on (and, with a retry, run twice).
    They are found by the ``RUNSTREAM_RUN_ID`` variable the executor puts in
    every command's environment (``/proc/<pid>/environ``; Linux, same user).
    Best effort: a child that cleared its environment is not found. Blocking;
    returns how many groups were killed.
    """
    marker = f"{RUN_ID_ENV}={run_id}".encode()
    groups: set[int] = set()
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                variables = fh.read().split(b"\0")
        except OSError:
            continue  # gone, or not ours
        if marker in variables:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                groups.add(os.getpgid(int(pid)))
    groups.discard(os.getpgrp())  # never this process's own group
    killed = 0
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
            killed += 1
    return killed


def _same_host(worker: str | None) -> bool:
    return bool(worker) and str(worker).partition(":")[0] == socket.gethostname()


class RunService:
    """Create, read, list and cancel runs. One per server; share it between requests."""

    def __init__(
        self,
        registry: TaskRegistry,
        store: RunStore,
        log: EventLog,
        *,
        dispatcher: Dispatcher | None = None,
        end_check_guard: float = END_CHECK_GUARD,
        metrics: RunMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.log = log
        self.dispatcher = dispatcher
        self.end_check_guard = end_check_guard
        self.metrics = metrics
        self.lifecycle = Lifecycle(store, log)

    def tasks(self) -> list[TaskSpec]:
        return list(self.registry)

    async def create(
        self,
        task: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the run's timeout (SPEC §3)
    ) -> RunRecord:
        """Validate and queue a run of ``task``; return its record (status ``queued``).

        Raises :class:`TaskNotFound` (404) or :class:`InvalidParams` (422, with
        ``field``) before anything is stored.
        """
        spec = self.registry.get(task)
        checked = spec.validate_params(params)
        effective_timeout = spec.check_timeout(timeout)
        self.log.check_space()  # InsufficientStorage (507) before anything is stored
        record = RunRecord(
            id=new_run_id(),
            task=spec.name,
            params=checked,
            status="queued",
            created_at=time.time(),
            timeout=effective_timeout,
        )
        await self.lifecycle.create(record)
        if self.metrics is not None:
            self.metrics.created.labels(spec.name).inc()
        if self.dispatcher is not None:
            await self.dispatcher.submit(record)
        return record

    async def get(self, run_id: str) -> RunRecord:
        return await self.store.get(run_id)

    async def list(
        self,
        *,
        status: RunStatus | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        return await self.store.list(status=status, task=task, limit=limit, cursor=cursor)

    async def cancel(self, run_id: str) -> RunRecord:
        """Cancel a run. Idempotent; a finished run is returned unchanged.

        A queued run is cancelled at once (its stream closes); a running run
        gets its cancel flag set and stops within about a second wherever it
        runs (SIGTERM, then SIGKILL after its task's grace). Raises
        :class:`RunNotFound` (404).
        """
        record = await self.store.get(run_id)
        if record.status == "queued":
            try:
                return await self.lifecycle.advance(
                    run_id,
                    "queued",
                    "cancelled",
                    cancel_requested=True,
                    error="cancelled before it started",
                    finished_at=time.time(),
                )
            except IllegalTransition:
                record = await self.store.get(run_id)  # it started meanwhile
        if record.status in TERMINAL:
            return record
        record = await self.store.request_cancel(run_id)
        if self.dispatcher is not None:
            await self.dispatcher.cancel(record)
        return record

    async def delete(self, run_id: str, *, force: bool = False) -> RunRecord:
        """Delete a run that ended, with its stream; return the record removed.

        A run that has not ended (``queued``, ``running``, ``lost`` about to be
        retried) is refused with :class:`IllegalTransition` (409) unless
        ``force``: then it is cancelled first and deleted once it has ended
        (within its task's grace plus :data:`FORCE_DELETE_MARGIN` seconds, else
        ``IllegalTransition``). Raises :class:`RunNotFound` (404).
        """
        record = await self.store.get(run_id)
        if record.status not in FINISHED or not is_final(record, time.time()):
            if not force:
                raise IllegalTransition(
                    f"run {run_id} is {record.status}: cancel it first, or delete with force"
                )
            await self.cancel(run_id)
            grace = self.registry.get(record.task).grace if record.task in self.registry else 0.0
            await self.wait_ended(run_id, timeout=grace + FORCE_DELETE_MARGIN)
        return await self.lifecycle.delete(run_id)

    async def delete_matching(
        self,
        *,
        task: str | None = None,
        status: RunStatus | None = None,
        before: float | None = None,
    ) -> tuple[builtins.list[str], int]:
        """Delete the ended runs matching every filter given (``before``: created earlier).

        Returns the ids deleted and how many matching runs were skipped because
        they have not ended. With no filter at all, every ended run goes: the
        caller decides whether that was asked for.
        """
        now = time.time()
        targets: builtins.list[str] = []
        skipped = 0
        cursor: str | None = None
        while True:
            page, cursor = await self.store.list(
                status=status, task=task, limit=RUN_PAGE, cursor=cursor
            )
            for record in page:
                if before is not None and record.created_at >= before:
                    continue
                if record.status in FINISHED and is_final(record, now):
                    targets.append(record.id)
                else:
                    skipped += 1
            if cursor is None:
                break
        deleted: builtins.list[str] = []
        for start in range(0, len(targets), DELETE_BATCH):
            removed, _failed = await self.lifecycle.delete_many(
                targets[start : start + DELETE_BATCH]
            )
            deleted += [r.id for r in removed]
        return deleted, skipped

    async def wait_ended(self, run_id: str, *, timeout: float) -> RunRecord:  # noqa: ASYNC109
        """Return the run once it has ended (its stream's ``end``), within ``timeout`` seconds.

        Raises :class:`IllegalTransition` if it has not ended by then.
        """
        try:
            async with asyncio.timeout(timeout):
                record = await self.store.get(run_id)
                if record.status not in TERMINAL:
                    with contextlib.suppress(StreamNotFound):
                        async for item in self.log.follow(run_id, after="now"):
                            if isinstance(item, Event) and item.type == END_TYPE:
                                break
                return await self.store.get(run_id)
        except TimeoutError:
            raise IllegalTransition(
                f"run {run_id} did not end within {timeout:g}s of being cancelled"
            ) from None

    async def end_check(self, stream: str, info: StreamInfo | None) -> str | None:
        """Hub reconciler hook: a finished run's stream must be closed, even if nobody did it.

        If the stream of a run that finished more than ``end_check_guard``
        seconds ago is still open (its executor died between recording the
        status and closing the stream, or a backend lost the close), close it
        with the run's status, so every follower gets the ``end`` event. Only
        if that fails does it return a reason to end the responses directly.

        A run's stream that does not exist (``info`` is ``None``; its readers
        wait for it to be created) will never be written if the run is gone
        or finished that long ago: ``"deleted"`` ends those waits.
        """
        if info is None:
            if not RUN_ID_RE.fullmatch(stream):
                return None
        elif info.closed or not stream.startswith(RUN_ID_PREFIX):
            return None
        try:
            record = await self.store.get(stream)
        except RunNotFound:
            return "deleted" if info is None else None
        if record.status not in FINISHED:
            return None
        finished = record.finished_at or record.created_at
        if time.time() - finished < self.end_check_guard:
            return None
        if info is None:
            return "deleted"
        try:
            await self.lifecycle.close_finished(record)
        except RunstreamError:
            return f"run {record.status}"
        return None


class LocalWorkerPool:
    """Executes queued runs in this process (SQLite and memory backends).

    Use ``await pool.start()`` then ``await pool.shutdown()``; it is the
    :class:`Dispatcher` of a :class:`RunService` (``service.dispatcher = pool``).
    The limits and the graceful stop are the :class:`~runstream.runs.scheduler.Scheduler`'s.
    """

    def __init__(
        self,
        registry: TaskRegistry,
        store: RunStore,
        log: EventLog,
        *,
        workers: int = DEFAULT_WORKERS,
        worker_id: str | None = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
        cancel_poll: float = CANCEL_POLL,
        metrics: RunMetrics | None = None,
        gates: Gates | None = None,
    ) -> None:
        """``gates``: resource gates checked before each run starts (see :mod:`.gates`)."""
        if workers < 1:
            raise ConfigError("a worker pool needs workers >= 1")
        self.registry = registry
        self.store = store
        self.log = log
        self.lifecycle = Lifecycle(store, log)
        self.workers = workers
        self.worker_id = worker_id or new_worker_id()
        self.shutdown_grace = shutdown_grace
        self.rescan_interval = rescan_interval
        self.cancel_poll = cancel_poll
        self.metrics = metrics
        self.gates = gates
        self.notes = WaitNotes(store)
        self.scheduler = self._new_scheduler()
        if metrics is not None:
            metrics.track_pool(
                lambda: float(len(self.scheduler.running)),
                lambda: float(len(self.scheduler.pending)),
            )
        self._rescanner: asyncio.Task[None] | None = None
        self._skipped: set[str] = set()
        self.lost_marked = 0
        self.executed = 0

    def _new_scheduler(self) -> Scheduler:
        gates = self.gates
        if gates is None:
            return Scheduler(self.workers, name="runstream-run")
        return Scheduler(
            self.workers,
            name="runstream-run",
            gate=lambda job: gates.reason(job.gate),
            on_wait=lambda job, reason: self.notes.note(job.key, reason),
            gate_interval=gates.interval,
        )

    # -- Dispatcher -----------------------------------------------------------------

    async def submit(self, record: RunRecord) -> None:
        self._enqueue(record.id, record.task)

    async def cancel(self, record: RunRecord) -> None:
        if record.id in self.scheduler.running:
            self.scheduler.cancel(record.id)

    # -- state ----------------------------------------------------------------------

    @property
    def running(self) -> list[str]:
        """Ids of the runs executing now."""
        return self.scheduler.running

    @property
    def pending(self) -> list[str]:
        """Ids of the runs waiting for a free slot, in order."""
        return self.scheduler.pending

    def running_of(self, task: str) -> int:
        return self.scheduler.running_of(task)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Recover runs a dead process left ``running``, queue the ``queued`` ones, start."""
        if self._rescanner is not None:
            return
        _LIVE_WORKERS.add(self.worker_id)
        if self.scheduler.stopping:
            self.scheduler = self._new_scheduler()
        await self.recover()
        await self._scan_queued()
        self._rescanner = asyncio.get_running_loop().create_task(
            self._rescan(), name=f"runstream-pool:{self.worker_id}"
        )

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop taking work; give running runs ``grace`` seconds, then cancel them.

        Runs still pending stay ``queued`` in the store for the next pool.
        Returns when every run this pool started has been recorded.
        """
        grace = self.shutdown_grace if grace is None else grace
        self.scheduler.stop_taking()
        if self._rescanner is not None:
            self._rescanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rescanner
            self._rescanner = None
        await self.scheduler.drain(grace, "cancelled: the worker is shutting down")
        _LIVE_WORKERS.discard(self.worker_id)

    # -- recovery -------------------------------------------------------------------

    async def recover(self) -> list[RunRecord]:
        """Mark runs whose worker is gone ``lost``; retry or close them. Returns what changed."""
        changed: list[RunRecord] = []
        for record in await self._all("running"):
            if worker_alive(record.worker):
                continue
            try:
                lost = await self.lifecycle.advance(
                    record.id,
                    "running",
                    "lost",
                    match={"worker": record.worker, "attempt": record.attempt},
                    error=f"worker {record.worker} is gone",
                    finished_at=time.time(),
                )
            except IllegalTransition:
                continue
            self.lost_marked += 1
            if _same_host(record.worker):
                killed = await asyncio.to_thread(kill_orphans, lost.id)
                if killed:
                    log.warning("run %s: killed %d process group(s) its dead worker left",
                                lost.id, killed)  # fmt: skip
            retries = self.registry.get(lost.task).retries if lost.task in self.registry else 0
            settled = await self.lifecycle.settle_lost(lost, retries=retries)
            if self.metrics is not None:
                self.metrics.lost.inc()
                if settled.status == "queued":
                    self.metrics.retried.inc()
            changed.append(settled)
            log.warning("run %s was left running by %s: now %s", lost.id, record.worker,
                        settled.status)  # fmt: skip
        return changed

    async def _all(self, status: RunStatus) -> list[RunRecord]:
        out: list[RunRecord] = []
        cursor: str | None = None
        while True:
            page, cursor = await self.store.list(status=status, limit=_SCAN_PAGE, cursor=cursor)
            out.extend(page)
            if cursor is None:
                return out

    async def _scan_queued(self) -> None:
        # Oldest first, so runs start in the order they were created.
        for record in reversed(await self._all("queued")):
            self._enqueue(record.id, record.task)

    # -- scheduling -----------------------------------------------------------------

    def _enqueue(self, run_id: str, task_name: str) -> None:
        if self.scheduler.stopping or run_id in self.scheduler:
            return
        if task_name not in self.registry:
            if run_id not in self._skipped:
                self._skipped.add(run_id)
                log.warning("run %s is of task %r, which this server does not declare; "
                            "leaving it queued", run_id, task_name)  # fmt: skip
            return
        task = self.registry.get(task_name)
        job = Job(run_id, task.name, lambda: self._execute(job, task), task.concurrency, task.grace)
        job.gate = task.gate
        self.scheduler.submit(job)

    async def _rescan(self) -> None:
        """Queue runs that other processes created: when the runs feed moves (a run created
        elsewhere is announced there; the engine wakes watchers across processes), at least
        every ``rescan_interval`` seconds."""
        notifier = self.log.notifier
        moved = notifier.watch(RUN_FEED)
        try:
            while True:
                await asyncio.wait((moved,), timeout=self.rescan_interval)
                if moved.done():
                    await asyncio.sleep(RESCAN_COALESCE)  # one scan for a burst of creations
                notifier.unwatch(RUN_FEED, moved)
                moved = notifier.watch(RUN_FEED)  # armed before the scan: none is missed
                try:
                    await self._scan_queued()
                except RunstreamError as exc:
                    log.warning("scan for queued runs failed: %s", exc)
        finally:
            notifier.unwatch(RUN_FEED, moved)

    async def _execute(self, job: Job, task: TaskSpec) -> None:
        run_id = job.key
        try:
            await self.notes.clear(run_id)
            record = await self.store.get(run_id)
            if record.status == "queued":
                final = await execute_run(
                    record,
                    task,
                    self.log,
                    self.store,
                    worker=self.worker_id,
                    control=job.control,
                    cancel_poll=self.cancel_poll,
                )
                self.executed += 1
                if self.metrics is not None and final.worker == self.worker_id:
                    self.metrics.observe_finished(final)
        except RunstreamError as exc:
            log.error("run %s could not be executed: %s", run_id, exc)
        except Exception:
            log.exception("run %s: executor failed", run_id)

    async def wait_idle(self) -> None:
        """Return once nothing is pending or running (for tests and embedding)."""
        await self.scheduler.wait_idle()
