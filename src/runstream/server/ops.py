"""Operations routes: delete runs, apply retention now, report the store's size.

* ``DELETE /v1/runs/{id}`` — delete a run that ended, with its stream (``409`` while it
  is queued or running, unless ``?force=1``: cancel, wait for the end, delete);
* ``DELETE /v1/runs?task=&status=&before=`` — delete the ended runs matching every
  filter given (an unfiltered bulk delete needs ``?all=1``);
* ``POST /v1/gc`` — run a retention pass now and answer what it removed;
* ``GET /v1/status`` — engine, store size and row counts, free disk, retention, gates.

:class:`OpsAPI` also owns what keeps a long-running server bounded: the
periodic retention pass (:class:`~runstream.runs.retention.Retention`), the
free-disk guard in front of every append and run creation
(:class:`~runstream.backends.space.SpaceGuard`, ``507 insufficient_storage``)
and the store-size metrics. Its start-up hook runs after the runs API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Annotated, Any, cast

from fastapi import APIRouter, Query
from prometheus_client import Counter, Gauge, Histogram
from starlette.responses import Response

from runstream.backends import engine_for
from runstream.backends.space import DiskProbe, SpaceGuard, free_disk
from runstream.errors import (
    BackendError,
    RunstreamError,
    ValidationError,
)
from runstream.runs.lifecycle import RunStatus, is_status
from runstream.runs.retention import Retention, RetentionPolicy, SweepResult, parse_time
from runstream.server import schemas
from runstream.server.auth import require_read, require_write
from runstream.server.errors import error_response
from runstream.server.responses import JSONResponse
from runstream.server.runtime import Runtime

if TYPE_CHECKING:
    from runstream.server.runs import RunsAPI

__all__ = ["OpsAPI"]

_FORCE = "Cancel a queued or running run, wait for its end, then delete it."

_STORE_KEYS = ("file_bytes", "used_memory", "free_pages")
"""Store statistics exported as bytes/pages gauges; every other one is a row count."""
_PASS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0, 300.0, 900.0)
"""Seconds: a paced pass lasts up to half an ``interval`` (default 300 s) and more."""


class OpsMetrics:
    """The store-size and retention metrics, on the app's registry."""

    def __init__(self, runtime: Runtime) -> None:
        r = runtime.metrics.registry
        self.store_bytes = Gauge(
            "runstream_store_bytes",
            "Size of the store: SQLite file (database, WAL, shm) or Redis used_memory.",
            registry=r,
        )
        self.store_free_pages = Gauge(
            "runstream_store_free_pages", "SQLite pages free inside the file.", registry=r
        )
        self.store_rows = Gauge(
            "runstream_store_rows", "Rows in the store by kind.", ["kind"], registry=r
        )
        self.deleted = Counter(
            "runstream_retention_deleted",
            "Items removed by retention passes and deletions.",
            ["kind"],
            registry=r,
        )
        self.passes = Histogram(
            "runstream_retention_pass_seconds",
            "Duration of retention passes, pauses included.",
            buckets=_PASS_BUCKETS,
            registry=r,
        )
        self.pass_work = Histogram(
            "runstream_retention_pass_busy_seconds",
            "Time retention passes spent working (their duration without the pauses).",
            buckets=_PASS_BUCKETS,
            registry=r,
        )
        self.refusals = Gauge(
            "runstream_storage_refusals",
            "Appends and run creations refused for lack of free disk (cumulative).",
            registry=r,
        )
        self.free_disk = Gauge(
            "runstream_storage_free_bytes", "Free disk where the store writes.", registry=r
        )

    def observe_sweep(self, result: SweepResult) -> None:
        self.deleted.labels("runs").inc(result.runs)
        self.deleted.labels("streams").inc(result.streams + result.orphans)
        self.deleted.labels("feed_events").inc(result.feed_events)
        self.passes.observe(result.duration)
        self.pass_work.observe(max(0.0, result.duration - result.paused))

    def observe_stats(self, store: dict[str, float], runs: dict[str, float]) -> None:
        size = store.get("file_bytes", store.get("used_memory"))
        if size is not None:
            self.store_bytes.set(size)
        if "free_pages" in store:
            self.store_free_pages.set(store["free_pages"])
        for kind, value in {**store, **runs}.items():
            if kind not in _STORE_KEYS and kind != "page_size":
                self.store_rows.labels(kind).set(value)


class OpsAPI:
    """The operations router plus its start-up hook; one per app, next to a :class:`RunsAPI`.

    ``disk_probe`` replaces the free-disk reading (tests);
    ``retention_interval`` overrides ``[retention] interval``.
    """

    def __init__(
        self,
        runs: RunsAPI,
        *,
        disk_probe: DiskProbe = free_disk,
        retention_interval: float | None = None,
    ) -> None:
        self.runs = runs
        self.disk_probe = disk_probe
        self.retention_interval = retention_interval
        self.retention: Retention | None = None
        self.guard: SpaceGuard | None = None
        self.metrics: OpsMetrics | None = None
        self.runtime: Runtime | None = None
        self.last_sweep: SweepResult | None = None
        self.last_sweep_at: float | None = None
        self.router = self._build_router()

    # -- start-up -------------------------------------------------------------------

    async def startup(self, runtime: Runtime) -> Any:
        """Start-up hook: the guard, the retention pass and the stats refresh."""
        settings = runtime.settings
        service = self.runs.service
        if service is None:
            raise BackendError("the ops API starts after the runs API")
        self.runtime = runtime
        self.metrics = metrics = OpsMetrics(runtime)
        path = runtime.backend.storage_path()
        if path is not None and settings.storage.min_free_disk > 0:
            self.guard = SpaceGuard(path, settings.storage.min_free_disk, probe=self.disk_probe)
            runtime.backend.space_guard = self.guard
            guard = self.guard
            metrics.refusals.set_function(lambda: float(guard.refusals))
        tasks = {t.name: t.retention for t in self.runs.registry if t.retention is not None}
        policy = RetentionPolicy.from_settings(settings.retention, tasks)
        interval = self.retention_interval or settings.retention.interval
        self.retention = Retention(
            policy,
            service.store,
            runtime.backend,
            interval=interval,
            scan_interval=settings.retention.scan_interval,
            duty_cycle=settings.retention.duty_cycle,
            on_sweep=self._swept,
        )
        loop = asyncio.get_running_loop()
        background = [loop.create_task(self._stats_forever(), name="runstream-store-stats")]
        if not policy.empty:
            background.append(
                loop.create_task(self.retention.run_forever(), name="runstream-retention")
            )

        async def shutdown() -> None:
            if runtime.backend.space_guard is self.guard:
                runtime.backend.space_guard = None
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        return shutdown

    def _swept(self, result: SweepResult) -> None:
        self.last_sweep, self.last_sweep_at = result, time.time()
        if self.metrics is not None:
            self.metrics.observe_sweep(result)

    async def _stats_forever(self) -> None:
        assert self.runtime is not None
        while True:
            with contextlib.suppress(RunstreamError):
                await self.stats()
            await asyncio.sleep(self.runtime.settings.storage.stats_interval)

    async def stats(self) -> dict[str, Any]:
        """Store size and row counts, now (and exported to the metrics)."""
        runtime, service = self.runtime, self.runs.service
        if runtime is None or service is None:
            raise BackendError("the ops API is not started")
        store = await runtime.backend.storage_stats()
        runs = await service.store.stats()
        if self.metrics is not None:
            self.metrics.observe_stats(store, runs)
            if self.guard is not None:
                self.metrics.free_disk.set(self.guard.free())
        return {"store": store, "runs": runs}

    # -- routes -----------------------------------------------------------------------

    def _build_router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", tags=["operations"])
        api = self

        @router.delete(
            "/runs/{run_id}",
            dependencies=[require_write],
            responses=schemas.errors(401, 403, 404, 409),
            summary="Delete a run that ended, with its stream (force=1: cancel it first)",
        )
        async def delete_run(
            run_id: str,
            force: Annotated[bool, Query(description=_FORCE)] = False,
        ) -> Response:
            record = await api._service().delete(run_id, force=force)
            return JSONResponse({"deleted": record.to_json()})

        @router.delete(
            "/runs",
            dependencies=[require_write],
            responses=schemas.errors(400, 401, 403),
            summary="Delete the ended runs matching every filter given",
        )
        async def delete_runs(
            task: Annotated[str | None, Query(max_length=100)] = None,
            status: Annotated[str | None, Query(description="An ended status.")] = None,
            before: Annotated[
                str | None, Query(description="Created before (unix seconds or RFC 3339).")
            ] = None,
            all: Annotated[bool, Query(description="Needed to delete without a filter.")] = False,
        ) -> Response:
            try:
                if status is not None and not is_status(status):
                    raise ValidationError(f"unknown run status {status!r}", field="status")
                cutoff = None if before is None else parse_time(before, field="before")
                if task is None and status is None and cutoff is None and not all:
                    raise ValidationError(
                        "refusing to delete every ended run without a filter: give task=, "
                        "status= or before=, or all=1",
                        field="all",
                    )
            except ValidationError as exc:
                return error_response(exc.http_status, exc.code, str(exc), field=exc.field)
            deleted, skipped = await api._delete_matching(
                task, cast("RunStatus | None", status), cutoff
            )
            return JSONResponse({"deleted": deleted, "skipped": skipped})

        @router.post(
            "/gc",
            dependencies=[require_write],
            responses=schemas.errors(401, 403),
            summary="Apply the retention policy now; answers what was removed",
        )
        async def gc() -> Response:
            retention = api.retention
            if retention is None:
                raise BackendError("the ops API is not started")
            result = await retention.sweep(full=True)
            with contextlib.suppress(RunstreamError):
                await api.stats()
            return JSONResponse(result.to_json())

        @router.get(
            "/status",
            dependencies=[require_read],
            responses=schemas.errors(401, 403),
            summary="Store size, row counts, free disk, retention and gates",
        )
        async def status() -> Response:
            return JSONResponse(await api.status())

        return router

    def _service(self) -> Any:
        service = self.runs.service
        if service is None:
            raise BackendError("the runs service is not started")
        return service

    async def _delete_matching(
        self, task: str | None, status: RunStatus | None, before: float | None
    ) -> tuple[list[str], int]:
        service = self._service()
        deleted, skipped = await service.delete_matching(task=task, status=status, before=before)
        if deleted:
            if self.metrics is not None:
                self.metrics.deleted.labels("runs").inc(len(deleted))
            with contextlib.suppress(RunstreamError):
                await service.log.reclaim_space()
        return deleted, skipped

    async def status(self) -> dict[str, Any]:
        """What ``GET /v1/status`` answers."""
        runtime = self.runtime
        if runtime is None:
            raise BackendError("the ops API is not started")
        settings = runtime.settings
        stats = await self.stats()
        guard = self.guard
        out: dict[str, Any] = {
            "engine": engine_for(settings.server.backend).name,
            "store": stats["store"],
            "runs": stats["runs"],
            "storage": {
                "path": None if guard is None else guard.path,
                "free_disk": None if guard is None else guard.free(),
                "min_free_disk": settings.storage.min_free_disk,
                "refusals": 0 if guard is None else guard.refusals,
            },
            "retention": {
                **settings.retention.model_dump(),
                "tasks": {
                    t.name: t.retention.to_json()
                    for t in self.runs.registry
                    if t.retention is not None
                },
                "passes": 0 if self.retention is None else self.retention.passes,
                "last_pass": None if self.last_sweep is None else self.last_sweep.to_json(),
                "last_pass_at": self.last_sweep_at,
            },
            "gates": {
                **settings.gates.model_dump(),
                "tasks": {t.name: t.gate.to_json() for t in self.runs.registry if t.gate},
            },
        }
        return out
