"""The Durable Streams endpoint: ``PUT``/``POST``/``GET``/``HEAD``/``DELETE /v1/stream/{path}``.

One bare ASGI route (like the events fast path) so that every header is exactly
what the protocol says (no charset added to ``text/*`` types, no body on HEAD).
Requests pass the same :class:`~runstream.server.security.SecurityMiddleware`
(Host, CORS, Origin) and the same token scopes as the native API: ``read`` for
``GET``/``HEAD``, ``write`` for the rest; bodies are bounded by
``limits.max_body_bytes`` (413).

Decisions live in :mod:`runstream.core.durable`, the wire format in
:mod:`runstream.protocol.durable`, storage in the engine's
:class:`~runstream.backends.durable.DurableStore`; live reads are in
:mod:`runstream.server.durable_live`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from runstream.backends import engine_for
from runstream.backends.durable import DsReader, DurableStore
from runstream.core.durable import (
    RESERVED_PREFIX,
    AppendRequest,
    CreateRequest,
    DsConflict,
    DsError,
    DsNotFound,
    DsReadOnly,
    DsState,
    Outcome,
    ProducerClaim,
    ProducerState,
    format_expires_at,
    parse_decimal,
    parse_expires_at,
    parse_flag,
    parse_producer,
)
from runstream.errors import PayloadTooLarge, RunstreamError
from runstream.protocol.durable import format_offset, parse_live, parse_offset, parse_read_offset
from runstream.server.auth import check_access
from runstream.server.durable_live import catch_up, long_poll, sse
from runstream.server.durable_native import NativeView
from runstream.server.errors import error_response, runstream_error_response
from runstream.server.metrics import ROUTE_KEY
from runstream.server.runtime import Runtime

log = logging.getLogger("runstream.server")

DS_PATH: Final = "/v1/stream/{path:path}"
DS_PREFIX: Final = "/v1/stream/"
MAX_NAME: Final = 1024
COMMON: Final = {"cross-origin-resource-policy": "cross-origin"}
SWEEP_SECONDS: Final = 5.0

StoreOpener = Callable[[Runtime], DurableStore | None]


class DurableService:
    """The store (opened at start-up) and the endpoint serving it."""

    def __init__(self, open_store: StoreOpener) -> None:
        self._open = open_store
        self.store: DurableStore | None = None
        self.runtime: Runtime | None = None

    async def startup(self, runtime: Runtime) -> Callable[[], Awaitable[None]] | None:
        self.runtime = runtime
        store = self.store = self._open(runtime)
        if store is None:
            return None
        await store.start()
        sweeper = asyncio.create_task(self._sweep(store), name="ds-sweep")

        async def cleanup() -> None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await store.aclose()

        return cleanup

    async def _sweep(self, store: DurableStore) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await store.sweep(time.time())
            except RunstreamError as exc:
                log.warning("durable streams: expiry sweep failed: %s", exc)

    def route(self) -> Route:
        """The one bare route; put it first in the app's router (see :func:`install`)."""
        return Route(
            DS_PATH,
            endpoint=_Endpoint(self),
            methods=["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"],
            include_in_schema=False,
            name="durable_streams",
        )

    def install(self, app: FastAPI) -> None:
        """Match ``/v1/stream/...`` before every routed handler (as the events fast path is):
        walking FastAPI's route list costs an append a fifth of its time."""
        app.router.routes.insert(0, self.route())


def engine_store(runtime: Runtime) -> DurableStore | None:
    """The Durable Streams store of the engine serving ``server.backend`` (``None``: none)."""
    url = runtime.settings.server.backend
    engine = engine_for(url)
    if engine.open_durable is None:
        log.warning(
            "the %s engine does not serve Durable Streams: /v1/stream/ answers 501", engine.name
        )
        return None
    return engine.open_durable(url, runtime.backend)


def _name(scope: Scope) -> str:
    name: str = scope["path_params"]["path"]
    if not name or len(name) > MAX_NAME or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise DsError(f"a stream name is 1-{MAX_NAME} printable characters")
    return name


class _Endpoint:
    def __init__(self, service: DurableService) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ROUTE_KEY] = DS_PATH
        request = Request(scope, receive)
        method = scope["method"]
        response: Response
        try:
            response = await self._handle(request, method)
        except DsError as exc:
            response = _error(exc)
        except RunstreamError as exc:
            response = runstream_error_response(exc)
        except Exception:  # never a stack trace to the client
            log.exception("unhandled error on %s %s", method, scope["path"])
            response = error_response(500, "internal", "internal server error")
        response.headers.update(COMMON)
        await response(scope, receive, send)

    async def _handle(self, request: Request, method: str) -> Response:
        if method == "OPTIONS":
            return Response(status_code=204, headers={"allow": "GET, HEAD, PUT, POST, DELETE"})
        denied = check_access(request, "read" if method in ("GET", "HEAD") else "write")
        if denied is not None:
            status, code, message = denied
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return error_response(status, code, message, headers=headers)
        store, runtime = self.service.store, self.service.runtime
        if runtime is None:
            return error_response(503, "starting", "the server is starting")
        if store is None:
            return error_response(
                501, "not_implemented", "this server's engine does not serve Durable Streams"
            )
        name = _name(request.scope)
        if method in ("PUT", "POST", "DELETE") and name.startswith(RESERVED_PREFIX):
            raise DsReadOnly(f"streams named {RESERVED_PREFIX}* are read-only")
        now = time.time()
        native = NativeView(runtime.backend)
        try:
            if method == "PUT":
                return await _create(request, store, native, runtime, name, now)
            if method == "POST":
                return await _append(request, store, runtime, name, now)
            if method == "DELETE":
                await store.delete(name, now)
                return Response(status_code=204)
            if method == "HEAD":
                return _head(await store.head(name, now))
            return await _read(request, store, runtime, name)
        except DsNotFound:
            if not await _is_native(native, name, now):
                raise
        # An event stream (the native API's): readable here, written there.
        if method != "GET" and method != "HEAD":
            raise DsReadOnly(f"{name!r} is an event stream: write it with /v1/streams/")
        if method == "HEAD":
            return _head(await native.head(name, now))
        return await _read(request, native, runtime, name)


async def _is_native(native: NativeView, name: str, now: float) -> bool:
    try:
        await native.head(name, now)
    except DsNotFound:
        return False
    return True


def _head(state: DsState) -> Response:
    headers = {
        "content-type": state.content_type,
        "stream-next-offset": format_offset(state.tail),
        "cache-control": "no-store",
    }
    if state.ttl is not None:
        headers["stream-ttl"] = str(state.ttl)
    elif state.expires_at is not None:
        headers["stream-expires-at"] = format_expires_at(state.expires_at)
    if state.closed:
        headers["stream-closed"] = "true"
    return Response(status_code=200, headers=headers)


def _error(exc: DsError) -> Response:
    headers = dict(exc.headers)
    if exc.http_status == 405:
        headers["allow"] = "GET, HEAD"
    return error_response(exc.http_status, exc.code, str(exc), headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes", field="body")
    chunks: list[bytes] = []
    size = 0
    stream: AsyncIterator[bytes] = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


async def _create(
    request: Request,
    store: DurableStore,
    native: NativeView,
    runtime: Runtime,
    name: str,
    now: float,
) -> Response:
    h = request.headers
    ttl = h.get("stream-ttl")
    expires = h.get("stream-expires-at")
    fork_offset = h.get("stream-fork-offset")
    sub = h.get("stream-fork-sub-offset")
    source = h.get("stream-forked-from")
    if source is not None:
        source = source.strip()
        if source.startswith(DS_PREFIX):
            source = source[len(DS_PREFIX) :]
        elif "://" in source and DS_PREFIX in source:
            source = source.split(DS_PREFIX, 1)[1]
        if not source:
            raise DsError("Stream-Forked-From names no stream")
    req = CreateRequest(
        content_type=h.get("content-type"),
        ttl=None if ttl is None else parse_decimal(ttl, "Stream-TTL"),
        expires_at=None if expires is None else parse_expires_at(expires),
        closed=parse_flag(h.get("stream-closed"), "Stream-Closed"),
        fork_source=source,
        fork_offset=None if fork_offset is None else parse_offset(fork_offset.strip()),
        sub_offset=0 if sub is None else parse_decimal(sub, "Stream-Fork-Sub-Offset"),
        body=await _body(request, runtime.settings.limits.max_body_bytes),
    )
    if sub is not None and source is None:
        raise DsError("Stream-Fork-Sub-Offset needs Stream-Forked-From")
    if await _is_native(native, name, now):
        raise DsConflict(f"{name!r} is an event stream (read it here, write it with /v1/streams/)")
    state, created = await store.create(name, req, now)
    headers = {
        "content-type": state.content_type,
        "stream-next-offset": format_offset(state.tail),
    }
    if state.closed:
        headers["stream-closed"] = "true"
    if created:
        headers["location"] = str(request.url.replace(query=""))
    return Response(status_code=201 if created else 200, headers=headers)


async def _append(
    request: Request, store: DurableStore, runtime: Runtime, name: str, now: float
) -> Response:
    h = request.headers
    claim = parse_producer(h.get("producer-id"), h.get("producer-epoch"), h.get("producer-seq"))
    seq = h.get("stream-seq")
    if seq is not None and (not seq or len(seq) > 256):
        raise DsError("Stream-Seq must be 1-256 characters")
    req = AppendRequest(
        content_type=h.get("content-type"),
        body=await _body(request, runtime.settings.limits.max_body_bytes),
        close=parse_flag(h.get("stream-closed"), "Stream-Closed"),
        producer=claim,
        stream_seq=seq,
    )
    try:
        write = await store.append(name, req, now)
    except DsError as exc:
        if exc.tail is not None:
            exc.headers["stream-next-offset"] = format_offset(exc.tail)
        raise
    state = write.state
    headers = {"stream-next-offset": format_offset(state.tail)}
    if state.closed:
        headers["stream-closed"] = "true"
    status = 204
    if claim is not None:
        headers.update(_producer_headers(claim, state.producers.get(claim.id)))
        if write.outcome is Outcome.APPENDED:
            status = 200
    return Response(status_code=status, headers=headers)


def _producer_headers(claim: ProducerClaim, current: ProducerState | None) -> dict[str, str]:
    """The producer's epoch and highest accepted seq (a duplicate's answer names the latter)."""
    if current is None:
        return {"producer-epoch": str(claim.epoch), "producer-seq": str(claim.seq)}
    return {"producer-epoch": str(current.epoch), "producer-seq": str(current.last_seq)}


async def _read(request: Request, store: DsReader, runtime: Runtime, name: str) -> Response:
    query = request.query_params
    start = parse_read_offset(query.getlist("offset"))
    live = parse_live(query.getlist("live"))
    cursor = query.get("cursor")
    if live and start is None:
        raise DsError(f"live={live} needs an offset")
    if live == "long-poll":
        assert start is not None
        return await long_poll(store, runtime, name, start, cursor)
    if live == "sse":
        assert start is not None
        return await sse(store, runtime, name, start, cursor)
    return await catch_up(store, name, start, request.headers.get("if-none-match"))
