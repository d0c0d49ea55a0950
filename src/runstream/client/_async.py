"""``AsyncClient``: the asyncio SDK for a runstream server."""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from runstream.client import _env
from runstream.client._http import (
    RETRYABLE_STATUS,
    error_from_response,
    event_from_json,
    expect_json,
    retry_after,
    stream_info_from_json,
)
from runstream.client.checkpoint import CheckpointStore, CheckpointWriter, Watermark
from runstream.client.follow import Follower, FollowOptions, Transport
from runstream.client.handlers import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_QUEUE_SIZE,
    Context,
    DeadLetter,
    EventHandler,
    HandlerRegistry,
    KeyFn,
    ResetHandler,
    Where,
    WorkerPool,
    dispatch,
)
from runstream.client.metrics import Metrics
from runstream.client.policy import GiveUp, ReconnectState, RetryPolicy
from runstream.client.publisher import DEFAULT_LINGER, DEFAULT_MAX_EVENTS, AsyncPublisher
from runstream.client.runs import (
    DEFAULT_MAX_RUNS,
    RUNS_FEED,
    RUNS_FEED_PATH,
    RunFilter,
    RunsListener,
)
from runstream.core.model import JSON, AppendResult, Event, NewEvent, Page, StreamInfo
from runstream.errors import RemoteError, RetriesExhausted, ValidationError

log = logging.getLogger("runstream.client")

DEFAULT_URL = "http://127.0.0.1:8787"
DEFAULT_TIMEOUT = 30.0
REQUEST_RETRY = RetryPolicy(max_attempts=5, max_elapsed=60.0, fallback_after=0)
"""Retries of single requests (publish, info, ...): short, and no polling fallback."""

TokenRefresh = Callable[[], Awaitable[str]]


@dataclass(slots=True)
class _Producer:
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _to_new_event(item: NewEvent | Mapping[str, Any] | tuple[str, Any]) -> NewEvent:
    if isinstance(item, NewEvent):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return NewEvent(item[0], item[1])
    if isinstance(item, Mapping):
        return NewEvent.from_json(item)
    raise ValidationError('events must be NewEvent, (type, data) or {"type", "data"}')


class AsyncClient:
    """Talks to a runstream server: runs, streams, and reliable following.

    Use it as ``async with AsyncClient(url, token=...) as client:`` (or call
    :meth:`aclose`): closing stops every follower it started and closes its
    connections. ``token_refresh`` is an async function returning a new
    bearer token; it is called once when the server answers 401, then the
    request is retried. ``follow_options`` sets the defaults of every
    :meth:`follow` (watchdogs, retry budget, fallback, transport, reset mode).

    What is not given here comes from the environment, then the defaults:
    ``url`` from ``RUNSTREAM_URL`` (else ``RUNSTREAM_SERVER``, else
    ``http://127.0.0.1:8787``), ``token`` from ``RUNSTREAM_TOKEN``, and
    ``follow_options`` from :meth:`FollowOptions.from_env` (watchdog,
    reconnect and transport variables). Raises :class:`ConfigError` for an
    invalid variable.

    One client may be used by many tasks at once; it must be used from the
    event loop it was first used on.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        token_refresh: TokenRefresh | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = REQUEST_RETRY,
        follow_options: FollowOptions | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = (url or _env.server_url() or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else _env.token()
        self.token_refresh = token_refresh
        self.retry = retry
        self.follow_options = follow_options or FollowOptions.from_env()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout,
            headers=dict(headers or {}),
            transport=transport,
        )
        self._producers: dict[str, _Producer] = {}
        self._followers: weakref.WeakSet[Follower] = weakref.WeakSet()
        self._refresh_lock = asyncio.Lock()
        self.registry = HandlerRegistry()
        self.run_registry = HandlerRegistry()
        """Handlers for the events of every run (:meth:`on_run`, :meth:`handle_runs`)."""
        self._listeners: set[RunsListener] = set()
        self._closed = False

    # -- session (used by followers) ---------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def refresh_auth(self) -> bool:
        """Ask ``token_refresh`` for a new token; False when there is no hook."""
        if self.token_refresh is None:
            return False
        async with self._refresh_lock:
            self.token = await self.token_refresh()
        return True

    # -- plumbing ------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        stream: str = "",
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
        ok: tuple[int, ...] = (200, 201, 202, 204),
    ) -> httpx.Response:
        """Send a request, retrying what is safe to retry; raise a runstream error otherwise.

        Non-idempotent requests are retried only when they could not have
        reached the server (connection refused).
        """
        if self._closed:
            raise ValidationError("this client is closed")
        state = ReconnectState(self.retry, allow_fallback=False)
        loop = asyncio.get_running_loop()
        refreshed = False
        while True:
            reason: str
            wait_floor: float | None = None
            try:
                resp = await self._http.request(
                    method,
                    path,
                    json=json,
                    params=params,
                    headers={**self.auth_headers(), **(headers or {})},
                )
            except httpx.ConnectError as exc:
                reason = "connect"
                last_exc: Exception = exc
            except httpx.TransportError as exc:
                if not idempotent:
                    raise RemoteError(
                        f"{what}: {exc!r}; not retried: the request may have reached the "
                        "server and is not idempotent"
                    ) from exc
                reason, last_exc = "network", exc
            else:
                if resp.status_code in ok:
                    return resp
                if resp.status_code == 401 and not refreshed and await self.refresh_auth():
                    refreshed = True
                    continue
                if resp.status_code not in RETRYABLE_STATUS or not idempotent:
                    raise error_from_response(resp.status_code, resp.text, what=what, stream=stream)
                reason = f"http_{resp.status_code}"
                wait_floor = retry_after(resp.headers)
                last_exc = error_from_response(
                    resp.status_code, resp.text, what=what, stream=stream
                )
            decision = state.on_failure(reason, loop.time(), retry_after=wait_floor)
            if isinstance(decision, GiveUp):
                raise RetriesExhausted(f"{what}: {decision.message}") from last_exc
            log.info("runstream %s: retrying in %.2fs (%s)", what, decision.delay, reason)
            await asyncio.sleep(decision.delay)

    async def _json(self, method: str, path: str, *, what: str, **kw: Any) -> Any:
        resp = await self._request(method, path, what=what, **kw)
        return expect_json(resp.text, what=what) if resp.content else None

    # -- streams ---------------------------------------------------------------------

    async def publish(self, stream: str, type: str, data: JSON = None) -> AppendResult:
        """Append one event; see :meth:`publish_many`."""
        return await self.publish_many(stream, [NewEvent(type, data)])

    async def publish_many(
        self,
        stream: str,
        events: Iterable[NewEvent | Mapping[str, Any] | tuple[str, Any]],
    ) -> AppendResult:
        """Append a batch atomically (all or none); returns the ids it got.

        Each call takes this client's next producer seq for ``stream`` and every
        retry of the call (network error, 5xx, 429) resends that same seq, so
        an append whose answer was lost is not stored twice (the result then
        has ``duplicate=True``). Appends to one stream from one client are
        serialised so that seqs reach the server in order.

        Raises :class:`StreamClosed`, :class:`ValidationError`,
        :class:`PayloadTooLarge`, or :class:`RetriesExhausted` when the server
        stayed unreachable — the batch may or may not be stored then; a new
        call uses a new seq and would store it again if it was.
        """
        batch = [_to_new_event(e) for e in events]
        if not batch:
            raise ValidationError("publish needs at least one event", field="events")
        body: Any = [{"type": e.type, "data": e.data} for e in batch]
        if len(body) == 1:
            body = body[0]
        producer = self._producers.setdefault(stream, _Producer())
        async with producer.lock:
            producer.seq += 1
            obj = await self._json(
                "POST",
                f"/v1/streams/{stream}/events",
                what=f"publishing to {stream!r}",
                stream=stream,
                json=body,
                headers={"Producer-Id": producer.id, "Producer-Seq": str(producer.seq)},
            )
        return AppendResult(
            stream=str(obj.get("stream", stream)),
            epoch=str(obj["epoch"]),
            first_id=int(obj["first_id"]),
            last_id=int(obj["last_id"]),
            duplicate=bool(obj.get("duplicate", False)),
        )

    def publisher(
        self, stream: str, *, linger: float = DEFAULT_LINGER, max_events: int = DEFAULT_MAX_EVENTS
    ) -> AsyncPublisher:
        """A batching publisher for ``stream`` (see :mod:`runstream.client.publisher`):
        ``await pub.publish(type, data)`` queues, batches go out after ``linger`` seconds or
        at ``max_events``, each one :meth:`publish_many` with its own producer seq."""
        return AsyncPublisher(self, stream, linger=linger, max_events=max_events)

    def producer_id(self, stream: str) -> str:
        """The producer id this client uses for ``stream`` (created on first publish)."""
        return self._producers.setdefault(stream, _Producer()).id

    async def close_stream(
        self, stream: str, status: str | None = None, reason: str | None = None
    ) -> Any:
        """Close ``stream`` (idempotent); followers receive the end event with this status."""
        body = {k: v for k, v in (("status", status), ("reason", reason)) if v is not None}
        return await self._json(
            "POST",
            f"/v1/streams/{stream}/close",
            what=f"closing {stream!r}",
            stream=stream,
            json=body,
        )

    async def info(self, stream: str) -> StreamInfo:
        """State of ``stream``; raises :class:`StreamNotFound`."""
        obj = await self._json(
            "GET", f"/v1/streams/{stream}", what=f"info of {stream!r}", stream=stream
        )
        return stream_info_from_json(obj)

    async def read(
        self, stream: str, after: int | str = 0, *, limit: int = 1000, wait: float | None = None
    ) -> Page:
        """One page of events after ``after`` (``wait``: long-poll seconds when nothing is new).

        Raises :class:`HistoryLost` when the position was trimmed or is from another epoch.
        """
        params = {"after": str(after), "limit": str(limit)}
        if wait is not None:
            params["wait"] = f"{wait:g}"
        obj = await self._json(
            "GET",
            f"/v1/streams/{stream}/events",
            what=f"reading {stream!r}",
            stream=stream,
            params=params,
            headers={"Accept": "application/json"},
        )
        return Page(
            stream=str(obj.get("stream", stream)),
            epoch=str(obj["epoch"]),
            events=tuple(event_from_json(e) for e in obj["events"]),
            next_after=int(obj["next_after"]),
            closed=bool(obj.get("closed", False)),
        )

    async def delete_stream(self, stream: str) -> None:
        await self._request(
            "DELETE", f"/v1/streams/{stream}", what=f"deleting {stream!r}", stream=stream
        )

    async def list_streams(self, **params: str) -> Any:
        return await self._json("GET", "/v1/streams", what="listing streams", params=params)

    # -- runs --------------------------------------------------------------------------

    async def list_tasks(self) -> Any:
        """The tasks the server declares (``GET /v1/tasks``)."""
        return await self._json("GET", "/v1/tasks", what="listing tasks")

    async def create_run(
        self,
        task: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- the run's limit (SPEC §3), not ours
    ) -> dict[str, Any]:
        """Start a run of ``task``; returns the run object (its ``id`` names its stream).

        Not retried once the request may have reached the server (it would
        start a second run). Raises :class:`TaskNotFound`, :class:`ValidationError`.
        """
        body: dict[str, Any] = {"task": task, "params": dict(params or {})}
        if timeout is not None:
            body["timeout"] = timeout
        result: dict[str, Any] = await self._json(
            "POST", "/v1/runs", what=f"starting {task!r}", json=body, idempotent=False
        )
        return result

    async def list_runs(
        self,
        *,
        status: str | None = None,
        task: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Any:
        params = {
            k: str(v)
            for k, v in (("status", status), ("task", task), ("limit", limit), ("cursor", cursor))
            if v is not None
        }
        return await self._json("GET", "/v1/runs", what="listing runs", params=params)

    async def get_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(
            "GET", f"/v1/runs/{run_id}", what=f"run {run_id!r}"
        )
        return result

    async def cancel_run(self, run_id: str) -> Any:
        return await self._json("POST", f"/v1/runs/{run_id}/cancel", what=f"cancelling {run_id!r}")

    async def delete_run(self, run_id: str, *, force: bool = False) -> dict[str, Any]:
        """Delete a run that ended, with its stream; ``force`` cancels a live one first.

        Returns ``{"deleted": run}``. Raises :class:`RunNotFound`, or
        :class:`HTTPStatusError` (409) for a queued or running run without ``force``.
        """
        params = {"force": "1"} if force else None
        result: dict[str, Any] = await self._json(
            "DELETE", f"/v1/runs/{run_id}", what=f"deleting {run_id!r}", params=params
        )
        return result

    async def delete_runs(
        self,
        *,
        task: str | None = None,
        status: str | None = None,
        before: str | float | None = None,
        all: bool = False,
    ) -> dict[str, Any]:
        """Delete the ended runs matching every filter given; ``{"deleted": [ids], "skipped": n}``.

        ``before`` is unix seconds or an RFC 3339 time (creation). Without any
        filter the server refuses unless ``all``.
        """
        params = {
            k: str(v) for k, v in (("task", task), ("status", status), ("before", before)) if v
        }
        if all:
            params["all"] = "1"
        result: dict[str, Any] = await self._json(
            "DELETE", "/v1/runs", what="deleting runs", params=params
        )
        return result

    async def gc(self) -> dict[str, Any]:
        """Apply the server's retention policy now; returns what it removed."""
        result: dict[str, Any] = await self._json(
            "POST", "/v1/gc", what="retention pass", idempotent=False
        )
        return result

    async def status(self) -> dict[str, Any]:
        """The server's store size, row counts, free disk, retention and gates."""
        result: dict[str, Any] = await self._json("GET", "/v1/status", what="server status")
        return result

    # -- following ---------------------------------------------------------------------

    def follow(
        self,
        stream: str,
        after: int | str | None = None,
        *,
        stop_event: asyncio.Event | None = None,
        metrics: Metrics | None = None,
        options: FollowOptions | None = None,
        run: bool = False,
        transport: Transport | None = None,
        path: str | None = None,
        **overrides: Any,
    ) -> Follower:
        """Follow ``stream`` from ``after`` (``None``: the beginning; ``"now"``; an id;
        ``"<epoch>:<id>"``) until it ends.

        Yields :class:`Event` items and, when history was lost, :class:`Reset`
        items (or raises :class:`HistoryLost` with ``reset="raise"``); the last
        item is the end event (``event.is_end``; ``data`` holds the final
        status). ``transport`` is ``"auto"`` (SSE, falling back to long-poll
        while streaming keeps failing), ``"sse"``, ``"ws"`` (WebSocket) or
        ``"poll"``; every one gives the same guarantees. ``overrides`` set
        other :class:`FollowOptions` fields for this call, e.g.
        ``first_event=10, idle=30, stale=0, reset="raise"``. ``run=True``
        follows a run through ``/v1/runs/{id}/events`` (``/ws``); ``path``
        reads another endpoint of the same kind (``…/events``, its WebSocket
        at ``…/ws``), as :meth:`follow_runs` does.

        Close it (``async with`` / :meth:`Follower.aclose`) if you stop early;
        setting ``stop_event`` ends the iteration promptly.
        """
        if transport is not None:
            overrides["transport"] = transport
        opts = replace(options or self.follow_options, **overrides)
        if run:
            path = f"/v1/runs/{stream}/events"
        follower = Follower(
            self,
            stream,
            path=path,
            after=after,
            options=opts,
            metrics=metrics,
            stop_event=stop_event,
        )
        self._followers.add(follower)
        return follower

    def follow_run(self, run_id: str, after: int | str | None = None, **kw: Any) -> Follower:
        """:meth:`follow` for a run's stream."""
        return self.follow(run_id, after, run=True, **kw)

    def on(
        self, *types: str, where: Where | None = None, key: KeyFn | None = None
    ) -> Callable[[EventHandler], EventHandler]:
        """Register a handler for :meth:`run_forever` (see :class:`HandlerRegistry.on`)."""
        return self.registry.on(*types, where=where, key=key)

    def on_reset(self, fn: ResetHandler) -> ResetHandler:
        return self.registry.on_reset(fn)

    async def run_forever(
        self,
        stream: str,
        after: int | str | None = None,
        *,
        stop_event: asyncio.Event | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        metrics: Metrics | None = None,
        run: bool = False,
        checkpoint: CheckpointStore | None = None,
        checkpoint_name: str | None = None,
        handler_retry: RetryPolicy | None = None,
        dead_letter: DeadLetter | None = None,
        registry: HandlerRegistry | None = None,
        extra: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> Event | None:
        """Follow ``stream`` and hand every event to the registered handlers until it ends.

        Returns the end event (``None`` if stopped first). Stops when
        ``stop_event`` is set or this client closes: the read and any backoff
        sleep are cancelled, then running and queued handler jobs get
        ``drain_timeout`` seconds to finish. Raises what :meth:`follow` raises.

        ``checkpoint`` (a :class:`CheckpointStore`) makes the position durable
        under ``checkpoint_name`` (default: the stream name): a saved position
        replaces ``after`` at start, and the position saved moves only past
        items whose handlers all finished, so after a crash every event is
        handled at least once (give ``ctx.idempotency_key(event)`` to what your
        handler writes to).

        A handler that raises is called again per ``handler_retry`` (a
        :class:`RetryPolicy`: ``max_attempts`` retries after the first call,
        full-jitter backoff; ``None``: no retry). Once retries are spent the
        item goes to ``dead_letter(item, ctx, exc)`` (or is logged as given up)
        and counts as handled: the checkpoint moves past it. If ``dead_letter``
        raises, the listener stops with :class:`HandlerFailed` and the
        checkpoint stays before that item.

        ``registry`` replaces the handlers registered with :meth:`on` (as
        :meth:`handle_runs` does with :meth:`on_run`'s); ``extra`` is
        ``ctx.extra`` in every handler.
        """
        metrics = metrics or Metrics()
        writer: CheckpointWriter | None = None
        watermark: Watermark | None = None
        if checkpoint is not None:
            name = checkpoint_name or stream
            saved = await checkpoint.load(name)
            if saved is not None:
                after = saved
                metrics.checkpoint = saved
            writer = CheckpointWriter(checkpoint, name, metrics, saved=saved)
            watermark = Watermark(saved, on_advance=writer.update)
        follower = self.follow(
            stream, after, stop_event=stop_event, metrics=metrics, run=run, **overrides
        )
        ctx = Context(
            stream=stream, metrics=metrics, client=self, follower=follower, extra=dict(extra or {})
        )
        pool = WorkerPool(
            metrics,
            concurrency=concurrency,
            queue_size=queue_size,
            retry=handler_retry,
            dead_letter=dead_letter,
            watermark=watermark,
        )
        pump = asyncio.create_task(self._pump(follower, pool, ctx, registry or self.registry))
        failed = asyncio.ensure_future(pool.failed.wait())
        try:
            await asyncio.wait((pump, failed), return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()
        finally:
            failed.cancel()
            if not pump.done():
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            await follower.aclose()
            self._followers.discard(follower)
            await pool.drain(drain_timeout)
            if writer is not None:
                await writer.aclose()
        if pool.failure is not None:
            raise pool.failure
        return follower.end

    async def _pump(
        self, follower: Follower, pool: WorkerPool, ctx: Context, registry: HandlerRegistry
    ) -> None:
        while True:
            try:
                item, received = await follower.next_with_receipt()
            except StopAsyncIteration:
                return
            await dispatch(registry, pool, item, ctx, received)

    # -- every run ---------------------------------------------------------------------

    def follow_runs(self, after: int | str | None = None, **kw: Any) -> Follower:
        """Follow the runs feed: one item per run lifecycle move, for every run.

        Items are :class:`Event` of type ``created``, ``status`` or ``ended``
        whose ``data`` is the run object (as :meth:`get_run` returns it) plus
        ``"previous"`` (the status it moved from; ``None`` when unknown). The
        feed never ends; ``after`` and every option are :meth:`follow`'s, so
        ``follower.position`` is a resume point like any other. See
        ``docs/listening.md`` ("Every run") for what the feed guarantees.
        """
        return self.follow(RUNS_FEED, after, path=RUNS_FEED_PATH, **kw)

    def on_run(
        self, *types: str, where: Where | None = None, key: KeyFn | None = None
    ) -> Callable[[EventHandler], EventHandler]:
        """Register a handler for the events of *every* run (see :meth:`handle_runs`).

        Like :meth:`on`; in the handler, ``ctx.stream`` is the run id and
        ``ctx.extra["run"]`` the run object from the feed item that revealed it.
        """
        return self.run_registry.on(*types, where=where, key=key)

    async def handle_runs(
        self,
        after: int | str | None = None,
        *,
        where: RunFilter | None = None,
        stop_event: asyncio.Event | None = None,
        checkpoint: CheckpointStore | None = None,
        checkpoint_name: str = "runs",
        max_runs: int = DEFAULT_MAX_RUNS,
        metrics: Metrics | None = None,
        **run_options: Any,
    ) -> None:
        """One listener for every run: follow the runs feed and, for each run, its stream.

        Each run the feed reveals (and ``where(run)`` accepts) is followed to its
        end with :meth:`run_forever` and the handlers registered with
        :meth:`on_run`; ``run_options`` (``concurrency``, ``queue_size``,
        ``handler_retry``, ``dead_letter``, watchdogs, ``transport``...) apply
        to each. At most ``max_runs`` runs are followed at once (the feed waits
        for a free slot). Runs until ``stop_event`` is set or the client
        closes; a run's listener that fails (:class:`HandlerFailed`,
        :class:`RetriesExhausted`) stops it and is raised.

        ``checkpoint`` keeps positions durable: the feed's under
        ``checkpoint_name``, each run's under ``"<checkpoint_name>:<run id>"``.
        The feed's only moves past a run once that run was handled to its
        end, so a restarted listener resumes every unfinished run and skips
        none (at least once, like :meth:`run_forever`).
        """
        listener = RunsListener(
            self,
            self.run_registry,
            where=where,
            max_runs=max_runs,
            checkpoint=checkpoint,
            checkpoint_name=checkpoint_name,
            stop_event=stop_event,
            metrics=metrics,
            run_options=run_options,
        )
        self._listeners.add(listener)
        try:
            await listener.run(after)
        finally:
            self._listeners.discard(listener)

    # -- lifecycle ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop every follower of this client and close its connections."""
        if self._closed:
            return
        self._closed = True
        for listener in list(self._listeners):
            listener.stop.set()
        followers = list(self._followers)
        self._followers.clear()
        await asyncio.gather(*(f.aclose() for f in followers), return_exceptions=True)
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
