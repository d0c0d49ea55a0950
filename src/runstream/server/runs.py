"""The runs API (SPEC §3): ``/v1/tasks``, ``/v1/runs`` and a run's events over SSE/JSON/WS.

Wire it into the app with :class:`RunsAPI`, which owns the router and a
start-up hook (no server file needs to know about runs)::

    runs = RunsAPI.from_settings(settings)             # tasks from [tasks.*]
    app = create_app(settings, routers=[runs.router], on_startup=[runs.startup])

On start-up the hook opens the run store on the app's backend URL, builds the
:class:`~runstream.runs.service.RunService`, starts the in-process
:class:`~runstream.runs.service.LocalWorkerPool` for SQLite/memory (unless
``workers=0``) or, on Redis, queues runs for ``runstream worker`` processes
(and runs an in-process Redis worker too when ``workers`` is given), and registers the service's
:meth:`~runstream.runs.service.RunService.end_check` with the hub, so a run's
SSE/WS followers end when the run is finished in the registry even if the
close event was never written. Its cleanup stops the pool (running runs get
``shutdown_grace`` seconds, then are cancelled) and closes the store.

A run's events are its stream's: ``GET /v1/runs/{id}/events`` and
``/v1/runs/{id}/ws`` are served by the streams API's own SSE, long-poll and
WebSocket code, with the same positions, resets and end.

The runs feed (:mod:`runstream.runs.feed`), every run's lifecycle in one
stream, is served the same way as ``GET /v1/runs/events`` and
``/v1/runs/ws``; the start-up hook also runs its repair sweep
(:class:`~runstream.runs.feed.FeedRepair`) until shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field, Strict
from starlette.responses import Response

from runstream.backends import engine_for
from runstream.backends.engine import DispatchContext, RunDispatch
from runstream.config import Settings
from runstream.errors import (
    BackendError,
    ConfigError,
    InvalidParams,
    RunstreamError,
    StreamNotFound,
    ValidationError,
)
from runstream.runs.feed import FEED_REPAIR_INTERVAL, RUN_FEED, FeedRepair
from runstream.runs.gates import Gates, gates_from_settings
from runstream.runs.lifecycle import TERMINAL, RunStatus, is_status
from runstream.runs.metrics import RunMetrics
from runstream.runs.service import (
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_WORKERS,
    Dispatcher,
    LocalWorkerPool,
    RunService,
)
from runstream.runs.store import RunStore
from runstream.runs.tasks import TaskRegistry
from runstream.server import schemas
from runstream.server.auth import check_access, require_read, require_write
from runstream.server.errors import error_response
from runstream.server.responses import JSONResponse
from runstream.server.runtime import Runtime, get_runtime
from runstream.server.streams import (
    AfterQuery,
    LastEventIdHeader,
    LimitQuery,
    WaitForCreateQuery,
    WaitQuery,
    parse_json,
    read_body,
    read_response,
    read_responses,
)
from runstream.server.transports import deny_websocket, serve_websocket

__all__ = ["MAX_CREATE_BODY", "RunsAPI"]

log = logging.getLogger("runstream.runs")

MAX_CREATE_BODY = 1024 * 1024
"""Largest ``POST /v1/runs`` body, in bytes (also capped by ``limits.max_body_bytes``)."""


# -- OpenAPI shapes (handlers build JSON from RunRecord.to_json / TaskSpec.to_json) ------


class RunIn(BaseModel):
    """The body of ``POST /v1/runs``: params and timeout are checked against the task later."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    params: dict[str, Any] = {}
    timeout: Annotated[float, Strict(), Field(allow_inf_nan=False)] | None = None


class RunOut(BaseModel):
    id: str
    task: str
    params: dict[str, Any]
    status: str
    exit_code: int | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    worker: str | None
    attempt: int
    timeout: float | None
    cancel_requested: bool
    stream: str
    waiting: str | None = None
    """Only on a queued run held back by a resource gate: why it has not started."""


class RunListOut(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None


class TaskOut(BaseModel):
    name: str
    kind: str
    params: dict[str, Any]
    timeout: float | None
    concurrency: int | None
    grace: float
    retries: int
    description: str
    command: list[str] | None = None
    callable: str | None = None


class TaskListOut(BaseModel):
    tasks: list[TaskOut]


_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RunIn.model_json_schema()}},
    }
}


def _validation_response(exc: ValidationError) -> JSONResponse:
    if exc.field is None:
        return error_response(exc.http_status, exc.code, str(exc))
    return error_response(exc.http_status, exc.code, str(exc), field=exc.field)


class RunsAPI:
    """The runs router plus its start-up hook; one per app."""

    def __init__(
        self,
        registry: TaskRegistry,
        *,
        workers: int | None = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        store: RunStore | None = None,
        dispatcher: Dispatcher | None = None,
        feed_repair_interval: float = FEED_REPAIR_INTERVAL,
        gates: Gates | None = None,
    ) -> None:
        """``workers``: in-process runs at once (``None`` = default, 0 = API only).

        ``store``/``dispatcher`` replace the ones opened from the backend URL
        (for embedding and tests); a store passed in is neither started nor
        closed here. ``feed_repair_interval``: seconds between the sweeps that
        announce runs missing from the runs feed (see :class:`FeedRepair`).
        """
        if workers is not None and workers < 0:
            raise ConfigError("workers must be >= 0")
        self.registry = registry
        self.workers = DEFAULT_WORKERS if workers is None else workers
        self._workers_given = workers is not None
        self.shutdown_grace = shutdown_grace
        self._store = store
        self._dispatcher = dispatcher
        self.service: RunService | None = None
        self.pool: LocalWorkerPool | None = None
        self.queue: RunDispatch | None = None
        """The server's side of a shared queue, on engines that have one (Redis)."""
        self.feed_repair_interval = feed_repair_interval
        self.feed_repair: FeedRepair | None = None
        self.gates = gates
        """Resource gates checked before each run starts here (``[gates]``, tasks' ``gate``)."""
        self.router = self._build_router()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, workers: int | None = None, **kwargs: Any
    ) -> RunsAPI:
        """Tasks from ``settings.tasks``; ``workers`` defaults to ``settings.server.workers``.

        Raises :class:`ConfigError` for an invalid task declaration.
        """
        registry = TaskRegistry.from_config(settings.tasks)
        if workers is None:
            workers = settings.server.workers
        kwargs.setdefault("shutdown_grace", settings.server.run_grace)
        kwargs.setdefault("gates", gates_from_settings(settings, registry))
        return cls(registry, workers=workers, **kwargs)

    # -- start-up -------------------------------------------------------------------

    async def startup(self, runtime: Runtime) -> Any:
        """The app's start-up hook: returns the shutdown coroutine function."""
        url = runtime.settings.server.backend
        engine = engine_for(url)
        owns_store = self._store is None
        store = self._store if self._store is not None else engine.open_run_store(url)
        await store.start()
        metrics = RunMetrics(runtime.metrics.registry)
        service = RunService(
            self.registry, store, runtime.backend, dispatcher=self._dispatcher, metrics=metrics
        )
        pool: LocalWorkerPool | None = None
        queue: RunDispatch | None = None
        if self._dispatcher is None:
            if engine.start_dispatch is not None:
                # A shared queue: this server queues runs; with workers given explicitly
                # it also takes runs from the queue, like `runstream worker` would.
                queue = await engine.start_dispatch(
                    DispatchContext(
                        store,
                        runtime.backend,
                        self.registry,
                        workers=self.workers if self._workers_given else None,
                        shutdown_grace=self.shutdown_grace,
                        gates=self.gates,
                    )
                )
                service.dispatcher = queue.dispatcher
            elif self.workers > 0:
                pool = LocalWorkerPool(
                    self.registry,
                    store,
                    runtime.backend,
                    workers=self.workers,
                    shutdown_grace=self.shutdown_grace,
                    metrics=metrics,
                    gates=self.gates,
                )
                service.dispatcher = pool
                await pool.start()
        runtime.hub.add_end_check(service.end_check)
        self.service, self.pool, self.queue = service, pool, queue
        self.feed_repair = FeedRepair(store, runtime.backend, interval=self.feed_repair_interval)
        repair = asyncio.get_running_loop().create_task(
            self.feed_repair.run_forever(), name="runstream-runs-feed-repair"
        )

        async def shutdown() -> None:
            repair.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await repair
            try:
                if pool is not None:
                    await pool.shutdown()
                if queue is not None:
                    await queue.aclose()
            finally:
                if owns_store:
                    await store.aclose()

        return shutdown

    def _service(self) -> RunService:
        if self.service is None:
            raise BackendError("the runs service is not started (app start-up has not run)")
        return self.service

    # -- routes -----------------------------------------------------------------------

    def _build_router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", tags=["runs"])
        api = self

        @router.get(
            "/tasks",
            dependencies=[require_read],
            response_model=TaskListOut,
            responses=schemas.errors(401, 403),
            summary="Declared tasks",
        )
        async def list_tasks() -> Response:
            return JSONResponse({"tasks": [t.to_json() for t in api.registry]})

        @router.post(
            "/runs",
            status_code=201,
            dependencies=[require_write],
            response_model=RunOut,
            responses=schemas.errors(400, 401, 403, 404, 413, 422),
            openapi_extra=_CREATE_BODY,
            summary="Start a run of a declared task",
        )
        async def create_run(request: Request) -> Response:
            runtime = get_runtime(request)
            limit = min(MAX_CREATE_BODY, runtime.settings.limits.max_body_bytes)
            try:
                payload = parse_json(runtime, await read_body(request, limit))
                task, params, timeout = _parse_create(payload)
                record = await api._service().create(task, params, timeout=timeout)
            except ValidationError as exc:
                return _validation_response(exc)
            return JSONResponse(record.to_json(), status_code=201)

        @router.get(
            "/runs",
            dependencies=[require_read],
            response_model=RunListOut,
            responses=schemas.errors(400, 401, 403),
            summary="Runs, newest first (paginated)",
        )
        async def list_runs(
            status: Annotated[str | None, Query(description="Only runs in this status.")] = None,
            task: Annotated[str | None, Query(max_length=100)] = None,
            limit: Annotated[int, Query(ge=1, le=1000)] = 50,
            cursor: Annotated[str | None, Query(max_length=300, description="next_cursor")] = None,
        ) -> Response:
            try:
                runs, next_cursor = await api._service().list(
                    status=None if status is None else _status(status),
                    task=task,
                    limit=limit,
                    cursor=cursor,
                )
            except ValidationError as exc:
                return _validation_response(exc)
            return JSONResponse({"runs": [r.to_json() for r in runs], "next_cursor": next_cursor})

        @router.get(
            "/runs/events",
            dependencies=[require_read],
            response_model=schemas.PageOut,
            responses=read_responses("the feed"),
            summary="The runs feed: every run's lifecycle (created, status, ended), resumable",
        )
        async def runs_feed(
            request: Request,
            after: AfterQuery = None,
            limit: LimitQuery = None,
            wait: WaitQuery = 0.0,
            last_event_id: LastEventIdHeader = None,
        ) -> Response:
            # The feed exists for its readers before the first run: always waited for.
            return await read_response(
                request,
                get_runtime(request),
                RUN_FEED,
                after=after,
                limit=limit,
                wait=wait,
                last_event_id=last_event_id,
                wait_for_create="1",
                always_wait=True,
            )

        @router.websocket("/runs/ws")
        async def runs_feed_websocket(websocket: WebSocket) -> None:
            """Follow the runs feed over WebSocket (``?after=``, ``?token=``)."""
            runtime = get_runtime(websocket)
            denied = check_access(websocket, "read")
            if denied is not None:
                await deny_websocket(websocket, *denied)
                return
            await serve_websocket(runtime, websocket, RUN_FEED, wait_for_create=True)

        @router.get(
            "/runs/{run_id}",
            dependencies=[require_read],
            response_model=RunOut,
            responses=schemas.errors(401, 403, 404),
            summary="One run",
        )
        async def get_run(run_id: str) -> Response:
            record = await api._service().get(run_id)
            return JSONResponse(record.to_json())

        @router.post(
            "/runs/{run_id}/cancel",
            status_code=202,
            dependencies=[require_write],
            response_model=RunOut,
            responses=schemas.errors(401, 403, 404),
            summary="Cancel a run (idempotent); it stops within about a second",
        )
        async def cancel_run(run_id: str) -> Response:
            record = await api._service().cancel(run_id)
            return JSONResponse(record.to_json(), status_code=202)

        @router.get(
            "/runs/{run_id}/events",
            dependencies=[require_read],
            response_model=schemas.PageOut,
            responses=read_responses("the run"),
            summary="The run's events: JSON page (long-poll with wait=) or SSE",
        )
        async def run_events(
            request: Request,
            run_id: str,
            after: AfterQuery = None,
            limit: LimitQuery = None,
            wait: WaitQuery = 0.0,
            last_event_id: LastEventIdHeader = None,
            wait_for_create: WaitForCreateQuery = None,
        ) -> Response:
            runtime = get_runtime(request)
            await api._prepare_stream(runtime, run_id)
            return await read_response(
                request,
                runtime,
                run_id,
                after=after,
                limit=limit,
                wait=wait,
                last_event_id=last_event_id,
                wait_for_create=wait_for_create,
            )

        @router.websocket("/runs/{run_id}/ws")
        async def run_websocket(websocket: WebSocket, run_id: str) -> None:
            """Follow a run's events over WebSocket (``?after=``, ``?token=``)."""
            runtime = get_runtime(websocket)
            denied = check_access(websocket, "read")
            if denied is not None:
                await deny_websocket(websocket, *denied)
                return
            try:
                await api._prepare_stream(runtime, run_id)
            except RunstreamError as exc:
                await deny_websocket(websocket, exc.http_status, exc.code, str(exc))
                return
            await serve_websocket(runtime, websocket, run_id)

        return router

    async def _prepare_stream(self, runtime: Runtime, run_id: str) -> None:
        """404 unless the run exists; close its stream first if the run ended long ago.

        The second part is the end check done at once, so a client connecting
        to a finished run whose close was never written gets the ``end`` event
        instead of waiting for the reconciler. A finished run whose stream does
        not exist (it was deleted) is 404 too: nothing will ever be written to
        it, so waiting for its creation would be waiting forever.
        """
        service = self._service()
        record = await service.get(run_id)
        try:
            info = await runtime.backend.info(record.id)
        except StreamNotFound:
            if record.status in TERMINAL:
                raise
            return  # queued or running: its stream is about to be written
        except RunstreamError:
            return  # the transport reports backend trouble itself
        if not info.closed and record.finished_at is not None:
            await service.end_check(record.id, info)


def _status(value: str) -> RunStatus:
    if not is_status(value):
        raise ValidationError(f"unknown run status {value!r}", field="status")
    return value  # type: ignore[return-value]


def _parse_create(payload: Any) -> tuple[str, dict[str, Any], float | None]:
    invalid = {"params": InvalidParams, "timeout": InvalidParams}
    body = schemas.validate_body(RunIn, payload, invalid=invalid)
    return body.task, body.params, body.timeout
