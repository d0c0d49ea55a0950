"""The three ways to read a stream over HTTP: SSE, WebSocket, JSON long-poll.

Each is a thin writer over a :class:`~runstream.server.hub.Subscription`; the
positions, resets and hand-over live in the hub. These functions take the
stream name as an argument, so other routers (runs) can serve a stream under
their own paths with the same semantics.

Every page is bounded in bytes as well as events (``limits.max_page_bytes``):
JSON reads and catch-up reads ask the backend for no more, and SSE writes a
burst of live frames in writes of at most that size. Every write to a streaming
client is timed (``limits.send_timeout``): a client that stops reading, during
catch-up or live, is cut as a slow consumer and resumes from its last id. Its
connection is then aborted if it still has not taken what was queued after
``shutdown_grace`` (a plain close would wait for it forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from runstream.core.model import (
    HEARTBEAT_TYPE,
    Page,
    StreamInfo,
    now,
    rfc3339,
)
from runstream.errors import HistoryLost, RunstreamError, StreamNotFound, ValidationError
from runstream.protocol.cursor import WAIT_FOR_CREATE, Position, parse_position
from runstream.protocol.sse import encode_comment, encode_retry
from runstream.server.auth import ws_subprotocol
from runstream.server.connections import DirectTarget, abort_handle, direct_target
from runstream.server.errors import error_response
from runstream.server.frames import Frame
from runstream.server.hub import Subscription
from runstream.server.runtime import Runtime

log = logging.getLogger("runstream.server")

SSE_MEDIA_TYPE: Final = "text/event-stream"
PING: Final = encode_comment("ping")

# WebSocket close codes for the ways a subscription can end.
WS_CLOSE: Final[dict[str, tuple[int, str]]] = {
    "end": (1000, "stream closed"),
    "closed": (1000, "stream closed"),
    "deleted": (4404, "stream deleted"),
    "slow_consumer": (1013, "slow consumer: resume from your last id"),
    "shutdown": (1001, "server shutting down"),
    "backend_error": (1011, "backend error"),
}


def wants_sse(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return SSE_MEDIA_TYPE in accept.lower()


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def waits_for_create(runtime: Runtime, value: str | None) -> bool:
    """Whether a read of a stream that does not exist yet waits for it.

    ``value`` is the ``wait_for_create`` query parameter (``1``/``true``/``yes``/``on``
    or ``0``/``false``/``no``/``off``); absent, the server's ``wait_for_create``
    setting (default true). Raises :class:`ValidationError` (400) for anything else.
    """
    if value is None or value == "":
        return runtime.settings.server.wait_for_create
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValidationError("wait_for_create must be true or false (1 or 0)", field=WAIT_FOR_CREATE)


def start_position(last_event_id: str | None, after: str | None) -> tuple[Position, bool]:
    """The SSE/WS start: ``Last-Event-ID``, else ``after``, else 0. Returns (position, resumed)."""
    raw = last_event_id if last_event_id not in (None, "") else after
    position = parse_position(raw)
    return position, bool(raw) and (position.offset > 0 or position.epoch is not None)


def at_end(info: StreamInfo, position: Position) -> bool:
    """True if a reader at ``position`` has already seen the whole of a closed stream."""
    if not info.closed or position.now:
        return False
    if position.epoch is not None and position.epoch != info.epoch:
        return False
    return position.offset >= info.last_id


def _count_frames(runtime: Runtime, transport: str, frames: list[Frame]) -> None:
    m = runtime.metrics
    resets = sum(1 for f in frames if f.reset is not None)
    if resets:
        m.resets.labels(transport).inc(resets)
    m.delivered[transport].inc(len(frames) - resets)


# -- SSE ------------------------------------------------------------------------


class EventStreamResponse(Response):
    """A ``text/event-stream`` response fed by a subscription.

    Writes ``retry:``, then each batch of frames as one write, ``: ping`` when
    idle for ``keepalive`` seconds, and ends after the end entry, when the
    subscription ends (deleted, slow, shutdown) or when the client leaves.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(self, runtime: Runtime, sub: Subscription) -> None:
        super().__init__(
            status_code=200,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type=SSE_MEDIA_TYPE,
        )
        # A streamed body has no length; Response added one for its empty content.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.runtime = runtime
        self.sub = sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime, sub = self.runtime, self.sub
        metrics = runtime.metrics
        metrics.connections.labels("sse").inc()
        gauge = metrics.open_connections.labels("sse")
        gauge.inc()
        watch = SendWatchdog(runtime.settings.limits.send_timeout)
        try:
            await run_guarded(
                self._pump(scope, send, watch),
                sub,
                lambda: _wait_disconnect(receive),
                runtime.settings.server.shutdown_grace,
                watchdog=watch,
                abort=abort_handle(scope),
            )
        finally:
            gauge.dec()
            reason = sub.end_reason if sub.end_reason != "cancelled" else "client_left"
            sub.close()
            metrics.disconnects.labels("sse", reason or "client_left").inc()

    async def _pump(self, scope: Scope, send: Send, watch: SendWatchdog) -> None:
        sub, runtime = self.sub, self.runtime
        keepalive = runtime.settings.server.keepalive
        page_bytes = runtime.settings.limits.max_page_bytes
        timed = watch.timed
        now = time.monotonic
        await timed(
            send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
        )
        await timed(send(_body(encode_retry(runtime.settings.server.retry_ms))))
        target = direct_target(scope)
        if target is not None:
            sub.direct = _DirectSSE(target)
        while True:
            frames = await sub.get(idle=keepalive)
            if frames is None:
                break
            if not frames:
                await timed(send(_body(PING)))
                continue
            data = b"".join([f.sse() for f in frames])
            if len(data) <= page_bytes:
                watch.since = now()  # SendWatchdog.timed, inlined: the hot path
                await send(_body(data))
                watch.since = -1.0
            else:
                del data
                for chunk in _sse_writes(frames, page_bytes):
                    await timed(send(_body(chunk)))
            _count_frames(runtime, "sse", frames)
        await timed(send({"type": "http.response.body", "body": b"", "more_body": False}))


class _DirectSSE:
    """Writes live frames straight to an idle SSE client's socket (:attr:`Subscription.direct`).

    The feed calls it with the frames of one burst (one write), only while the
    response waits in ``get()``, so it never
    interleaves with the response's own ASGI sends. A socket that has not
    taken everything written before (``get_write_buffer_size() > 0``: the
    client is slow or the kernel buffer full) refuses, and the frame is
    buffered for the response's task, which coalesces what accumulated into
    one timed send: that is where the send timeout, byte limits and
    backpressure apply, exactly as before. An idle client pays no latency.
    """

    __slots__ = ("chunked", "transport")

    def __init__(self, target: DirectTarget) -> None:
        self.transport = target.transport
        self.chunked = target.chunked

    def __call__(self, frames: list[Frame]) -> bool:
        transport = self.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            return False
        if len(frames) == 1:  # the usual case: the frame's cached bytes, shared by all
            frame = frames[0]
            transport.write(frame.sse_chunk() if self.chunked else frame.sse())
            return True
        data = b"".join([f.sse() for f in frames])
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        return True


def _sse_writes(frames: list[Frame], page_bytes: int) -> Iterator[bytes]:
    """The SSE encoding of ``frames`` in writes of at most ``page_bytes`` (or one frame)."""
    parts: list[bytes] = []
    size = 0
    for frame in frames:
        data = frame.sse()
        if parts and size + len(data) > page_bytes:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(data)
        size += len(data)
    if parts:
        yield b"".join(parts)


class SendWatchdog:
    """Times each write to a streaming client; on one that takes too long, cuts the client.

    A writer stamps :attr:`since` with ``time.monotonic()`` before a send and sets it
    back to ``-1`` after (or wraps the send in :meth:`timed`): two attribute
    writes, because sends to a fan-out's clients run hundreds of thousands of
    times a second and a timer per send would cost more than the send. One
    :class:`_SendClock` per event loop checks the open watchdogs periodically
    and calls :attr:`on_expire` (set by :func:`run_guarded`) for a send that has
    been waiting longer than ``timeout``: the server's send only waits while the
    connection's buffer is full, that is while the client is not reading.
    """

    __slots__ = ("clock", "on_expire", "since", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.since = -1.0
        self.on_expire: Callable[[], None] | None = None
        self.clock = _SendClock.of(asyncio.get_running_loop())

    async def timed(self, write: Awaitable[None]) -> None:
        self.since = time.monotonic()
        try:
            await write
        finally:
            self.since = -1.0


class _SendClock:
    """The periodic check of one loop's :class:`SendWatchdog` instances (while any is open)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the clock is the value of a weak-keyed map keyed by this loop.
        self._loop = weakref.ref(loop)
        self.watches: set[SendWatchdog] = set()
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _SendClock:
        clock = _CLOCKS.get(loop)
        if clock is None:
            clock = _CLOCKS[loop] = cls(loop)
        return clock

    def add(self, watch: SendWatchdog) -> None:
        self.watches.add(watch)
        if self.handle is None:
            self._schedule()

    def _schedule(self) -> None:
        loop = self._loop()
        if loop is not None:
            self.handle = loop.call_later(self._interval(), self._tick)

    def discard(self, watch: SendWatchdog) -> None:
        self.watches.discard(watch)

    def _interval(self) -> float:
        # A quarter of the shortest timeout (at most 1 s): a send is cut within 125% of it.
        return min([1.0, *(w.timeout / 4 for w in self.watches)])

    def _tick(self) -> None:
        self.handle = None
        now = time.monotonic()
        late = [w for w in self.watches if w.since >= 0 and now - w.since > w.timeout]
        for watch in late:
            watch.since = -1.0
            if watch.on_expire is not None:
                watch.on_expire()
        if self.watches:
            self._schedule()


_CLOCKS: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SendClock]] = (
    weakref.WeakKeyDictionary()
)


async def run_guarded(
    writer: Coroutine[Any, Any, None],
    sub: Subscription,
    client_gone: Callable[[], Coroutine[Any, Any, None]],
    grace: float,
    *,
    watchdog: SendWatchdog | None = None,
    abort: Callable[[], None] | None = None,
) -> None:
    """Run ``writer`` in the current task until it returns, or cut it short.

    It is cancelled when ``client_gone()`` returns (the client left), when the
    subscription ended (end, slow consumer, shutdown) and the writer is still
    running ``grace`` seconds later (stuck sending to a client that does not
    read), or when a write timed by ``watchdog`` takes too long (the
    subscription then ends as ``"slow_consumer"``). In the last two cases
    ``abort`` (drop the connection) is called ``grace`` seconds after the cut
    unless the connection closed by then: what was queued for a client that
    does not read would otherwise be held until it does. The writer runs in the
    caller's task and only one helper task watches the client: a connection
    costs two tasks, not three.
    """
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    state = {"running": True, "cut": False}
    timer: list[asyncio.TimerHandle] = []

    def cut(*_: object) -> None:
        if state["running"] and not state["cut"]:
            state["cut"] = True
            task.cancel()

    def cut_stuck() -> None:
        if state["running"] and not state["cut"]:
            cut()
            if abort is not None:
                loop.call_later(grace, abort)

    def on_end(_: object) -> None:
        timer.append(loop.call_later(grace, cut_stuck))

    def on_slow_write() -> None:
        assert watchdog is not None
        sub.cut_slow(f"a write did not complete in {watchdog.timeout:g} s")
        cut_stuck()

    if watchdog is not None:
        watchdog.on_expire = on_slow_write
        watchdog.clock.add(watchdog)

    listen = asyncio.ensure_future(client_gone())
    listen.add_done_callback(cut)
    sub.ended.add_done_callback(on_end)
    try:
        await writer
    except asyncio.CancelledError:
        if not state["cut"]:
            raise
        task.uncancel()
    finally:
        state["running"] = False
        if watchdog is not None:
            watchdog.on_expire = None
            watchdog.clock.discard(watchdog)
        sub.ended.remove_done_callback(on_end)
        for handle in timer:
            handle.cancel()
        listen.remove_done_callback(cut)
        listen.cancel()
        with contextlib.suppress(BaseException):
            await listen


def _body(data: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": True}


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def open_subscription(
    runtime: Runtime,
    stream: str,
    position: Position,
    transport: str,
    *,
    resumed: bool,
    wait_for_create: bool = False,
) -> tuple[StreamInfo | None, Subscription | None]:
    """Check the stream exists and subscribe; no subscription if the reader is at the end.

    With ``wait_for_create``, a stream that does not exist yet is waited for
    (the subscription reads it from the beginning once it is created; ``now``
    then means everything it will hold) instead of answered with 404. Raises
    :class:`StreamNotFound` (404), :class:`TooManySubscribers` (429).
    """
    info: StreamInfo | None
    try:
        info = await runtime.backend.info(stream)
    except StreamNotFound:
        if not wait_for_create:
            raise
        info = None
    if info is not None and at_end(info, position):
        return info, None
    sub = runtime.hub.subscribe(
        stream, position, transport=transport, info=info, wait_for_create=wait_for_create
    )
    if resumed:
        runtime.metrics.resumes.labels(transport).inc()
    return info, sub


async def sse_response(
    runtime: Runtime,
    stream: str,
    *,
    last_event_id: str | None,
    after: str | None,
    wait_for_create: bool = False,
) -> Response:
    """The SSE answer for ``stream``: 200 event stream, 204 when already at the end.

    With ``wait_for_create``, a stream that does not exist yet gets the 200 at
    once (``retry:`` and keepalives flow) and its events from id 1 once it is
    created. Raises runstream errors (the app's handlers turn them into JSON answers).
    """
    position, resumed = start_position(last_event_id, after)
    _, sub = await open_subscription(
        runtime, stream, position, "sse", resumed=resumed, wait_for_create=wait_for_create
    )
    if sub is None:
        return Response(status_code=204)
    return EventStreamResponse(runtime, sub)


# -- JSON long-poll ---------------------------------------------------------------


async def long_poll(
    runtime: Runtime,
    stream: str,
    *,
    after: str | None,
    limit: int | None,
    wait: float,
    wait_for_create: bool = False,
) -> Page:
    """A page of events after ``after``; with ``wait`` > 0, wait up to that long for one.

    With ``wait_for_create``, a stream that does not exist yet is waited for up
    to ``wait`` seconds too; if it still does not exist then, the answer is an
    empty page with no epoch (``Page.epoch == ""``, sent as ``null``) and
    ``next_after`` the requested offset. Raises :class:`StreamNotFound` (404)
    otherwise, :class:`HistoryLost` (410) if the position cannot be served exactly.
    """
    settings = runtime.settings
    lim = settings.limits
    if limit is None:
        limit = lim.default_page_limit
    if not 1 <= limit <= lim.max_page_limit:
        raise ValidationError(f"limit must be 1-{lim.max_page_limit}", field="limit")
    if wait < 0:
        raise ValidationError("wait must be >= 0 seconds", field="wait")
    wait = min(wait, settings.server.long_poll_max_wait)
    position = parse_position(after)
    backend = runtime.backend
    offset, epoch = position.offset, position.epoch
    max_bytes = lim.max_page_bytes
    try:
        if position.now:
            info = await backend.info(stream)
            offset = info.last_id - 1 if info.closed else info.last_id
        page = await backend.read(stream, offset, limit, epoch=epoch, max_bytes=max_bytes)
    except HistoryLost:
        runtime.metrics.resets.labels("longpoll").inc()
        raise
    except StreamNotFound:
        if not wait_for_create:
            raise
        page = Page(stream, "", (), offset, False)
    if page.events or page.closed or wait <= 0 or runtime.shutting_down.is_set():
        return page
    start = Position(page.next_after, page.epoch or epoch)
    sub = runtime.hub.subscribe(stream, start, transport="longpoll", wait_for_create=not page.epoch)
    metrics = runtime.metrics
    metrics.connections.labels("longpoll").inc()
    gauge = metrics.open_connections.labels("longpoll")
    gauge.inc()
    try:
        await sub.get(idle=wait)
    finally:
        sub.close()
        gauge.dec()
    try:
        page = await backend.read(
            stream, start.offset, limit, epoch=start.epoch, max_bytes=max_bytes
        )
    except HistoryLost:
        runtime.metrics.resets.labels("longpoll").inc()
        raise
    except StreamNotFound:
        if not wait_for_create:
            raise
        return Page(stream, "", (), start.offset, False)
    metrics.events_delivered.labels("longpoll").inc(len(page.events))
    return page


# -- WebSocket ------------------------------------------------------------------


async def deny_websocket(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse a WebSocket handshake with an HTTP answer when the server supports it."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(status, code, message))
    else:
        await websocket.close(code=4000 + status, reason=message[:120])


async def serve_websocket(
    runtime: Runtime, websocket: WebSocket, stream: str, *, wait_for_create: bool | None = None
) -> None:
    """Serve ``stream`` over an (unaccepted) WebSocket until it ends or the client leaves.

    Position from the ``after`` query (or ``Last-Event-ID`` header). One text
    message per event (``Event.to_json()`` plus its ``epoch``), ``{"type":
    "reset", ...}`` for a reset, :func:`ws_heartbeat` when idle for
    ``keepalive`` seconds; after the end entry the socket is closed with 1000.
    ``wait_for_create`` (``None``: the ``wait_for_create`` query parameter,
    else the setting) accepts the handshake of a stream that does not exist
    yet and serves it once created.
    """
    try:
        position, resumed = start_position(
            websocket.headers.get("last-event-id"), websocket.query_params.get("after")
        )
        if wait_for_create is None:
            wait_for_create = waits_for_create(runtime, websocket.query_params.get(WAIT_FOR_CREATE))
        _, sub = await open_subscription(
            runtime, stream, position, "ws", resumed=resumed, wait_for_create=wait_for_create
        )
    except RunstreamError as exc:
        await deny_websocket(websocket, exc.http_status, exc.code, str(exc))
        return
    if sub is None:
        await websocket.accept(subprotocol=ws_subprotocol(websocket))
        await websocket.close(code=1000, reason="stream closed")
        return
    metrics = runtime.metrics
    metrics.connections.labels("ws").inc()
    gauge = metrics.open_connections.labels("ws")
    gauge.inc()
    grace = runtime.settings.server.shutdown_grace
    watch = SendWatchdog(runtime.settings.limits.send_timeout)
    try:
        await websocket.accept(subprotocol=ws_subprotocol(websocket))
        await run_guarded(
            _ws_pump(runtime, websocket, sub, watch),
            sub,
            lambda: _ws_listen(websocket),
            grace,
            watchdog=watch,
            abort=abort_handle(websocket.scope),
        )
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass
    finally:
        gauge.dec()
        reason = sub.end_reason
        sub.close()
        metrics.disconnects.labels(
            "ws", reason if reason not in (None, "cancelled") else "client_left"
        ).inc()
        code, text = WS_CLOSE.get(reason or "", (1000, ""))
        if reason not in (None, "cancelled"):
            # Bounded: the close frame waits behind whatever a stuck client has not taken.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(grace * 2):
                    await websocket.close(code=code, reason=text)


def ws_heartbeat() -> str:
    """The application heartbeat sent on an idle WebSocket: ``{"type": "ping", "time": ...}``.

    It has no ``id``, and ``ping`` is a reserved event type, so no event is
    ever mistaken for it. Protocol-level pings (uvicorn's ``ws_ping_interval``)
    are invisible to browser and most client code; this one lets their idle
    watchdogs work, as SSE keepalive comments do.
    """
    return f'{{"type":"{HEARTBEAT_TYPE}","time":"{rfc3339(now())}"}}'


async def _ws_pump(
    runtime: Runtime, websocket: WebSocket, sub: Subscription, watch: SendWatchdog
) -> None:
    keepalive = runtime.settings.server.keepalive
    now = time.monotonic
    while True:
        frames = await sub.get(idle=keepalive)
        if frames is None:
            return
        if not frames:
            watch.since = now()
            await websocket.send_text(ws_heartbeat())
            watch.since = -1.0
            continue
        for frame in frames:
            watch.since = now()  # SendWatchdog.timed, inlined: the hot path
            await websocket.send_text(frame.ws())
            watch.since = -1.0
        _count_frames(runtime, "ws", frames)


async def _ws_listen(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
