"""Connection-level limits under uvicorn: header timeout, a connection cap, quiet accept errors.

uvicorn (checked on 0.55) leaves three gaps that a hostile or broken client can use:

* No timeout while a request is still arriving. Its keep-alive timer runs only
  between requests and is cancelled by the first byte received, so a client
  that sends half a request line and stops holds a socket (and a file
  descriptor) forever.
* ``limit_concurrency`` answers ``503`` only once a request's headers are
  complete, and counts the idle sockets too: under a flood of idle sockets
  every legitimate request gets the ``503``, and the file descriptors still
  run out.
* When they do run out, asyncio logs every failed ``accept()`` with a traceback.

:class:`ConnectionGuard` closes them with small subclasses of uvicorn's own
protocols (passed as ``http=`` / ``ws=``; nothing is patched):

* **Header timeout.** From when a connection opens, or its previous response
  ends, it has ``header_timeout`` seconds to deliver a complete request line
  and headers; then it is closed (with ``408`` if it had sent part of one).
  One timer for all connections: they wait in one list, oldest first.
* **Connection cap.** When a new connection would exceed ``max_connections``,
  the oldest connection that is *not* being answered (idle, or still sending
  its request) is closed to make room: a flood of idle sockets cannot lock
  out a client that sends its request at once. If every connection is busy
  (all streaming, say), the new one is answered ``503`` with
  ``Connection: close`` and ``Retry-After``. The default cap is what the
  process's open-file limit leaves room for, so ``accept()`` does not fail.
* **Accept errors** (``EMFILE`` and friends) are logged once, then at most
  once per :data:`LOG_INTERVAL` with a count; so are uvicorn's warnings about
  malformed requests (one per bad connection otherwise).
* **Abort.** A streaming response to a client that stopped reading cannot be
  closed: a close first waits for the queued bytes to be taken. Every
  request's ASGI scope carries ``extensions["runstream.transport"]["abort"]``,
  a callable that drops the connection at once (see :func:`abort_handle`).
* **Direct writes.** HTTP scopes also carry ``...["direct"]``: once the
  response's head is sent, it tells a streaming response the connection's
  transport and whether its body is chunked (:func:`direct_target`), so a
  fan-out can write an event's bytes to the socket itself instead of one ASGI
  ``send`` per client and event.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import Receive, Scope, Send

log = logging.getLogger("runstream.server")

TRANSPORT_EXTENSION: Final = "runstream.transport"
"""Scope extension set by the guarded protocols: ``{"abort": <callable>}``."""

LOG_INTERVAL: Final = 10.0
"""Seconds between two log lines about the same kind of refused or failed connection."""

ACCEPT_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

DEFAULT_BACKLOG: Final = 2048
"""uvicorn's listen backlog, used when the open-file limit allows it."""

_408: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n"
)

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HTTPBase
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _WSBase,
    )
else:
    _HTTPBase = object
    _WSBase = object


def abort_handle(scope: Scope) -> Callable[[], None] | None:
    """The guarded server's "drop this connection now" for ``scope``, or ``None`` elsewhere."""
    extension = (scope.get("extensions") or {}).get(TRANSPORT_EXTENSION)
    abort = extension.get("abort") if isinstance(extension, dict) else None
    return cast(Callable[[], None], abort) if callable(abort) else None


class DirectTarget(NamedTuple):
    """Where a response's body bytes can be written directly, and how they are framed."""

    transport: asyncio.Transport
    chunked: bool
    """True: each write must be one HTTP/1.1 chunk (``<hex size>\\r\\n<data>\\r\\n``)."""


def direct_target(scope: Scope) -> DirectTarget | None:
    """The transport a response to ``scope`` may write its body to, once its head is sent.

    ``None`` outside the guarded server, for a ``HEAD`` request, before the
    head is sent, after the response completed or once the client left.
    Writes must be whole body parts (whole chunks when ``chunked``), never
    interleaved with an ASGI ``send`` in progress; the final ASGI message
    (``more_body=False``) still ends the response.
    """
    extension = (scope.get("extensions") or {}).get(TRANSPORT_EXTENSION)
    find = extension.get("direct") if isinstance(extension, dict) else None
    if not callable(find) or scope.get("method") != "GET":
        return None
    return cast(DirectTarget | None, find())


def _cycle_target(cycle: Any) -> DirectTarget | None:
    """uvicorn's request cycle (httptools or h11) as a :class:`DirectTarget`."""
    if not cycle.response_started or cycle.response_complete or cycle.disconnected:
        return None
    transport = cycle.transport
    if transport.is_closing():
        return None
    chunked = getattr(cycle, "chunked_encoding", None)  # httptools: decided at the head
    if chunked is None:
        conn = getattr(cycle, "conn", None)  # h11: chunked unless the peer speaks HTTP/1.0
        if conn is None or conn.their_http_version is None:
            return None
        # A response without Content-Length (a stream) is chunked for an HTTP/1.1 peer,
        # delimited by the connection's close for HTTP/1.0 (h11's framing rule).
        chunked = conn.their_http_version >= b"1.1"
    return DirectTarget(transport, bool(chunked))


def connection_limits(configured: int | None) -> tuple[int, int, int]:
    """``(max_connections, listen backlog, open-file limit)`` for this process.

    The cap leaves room, below ``ulimit -n``, for the connections accepted in
    one burst (up to the backlog) before the cap is applied to them, and for
    the server's own files (database, Redis, runs' pipes). A configured cap
    above that is lowered to it.
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 1 << 20
    except (ImportError, OSError, ValueError):  # not a Unix: no limit to fit
        soft = 1 << 20
    backlog = min(DEFAULT_BACKLOG, max(16, soft // 8))
    fit = max(8, soft - backlog - max(64, soft // 16))
    return (fit if configured is None else min(configured, fit)), backlog, soft


THROTTLED_UVICORN_MESSAGES: Final = frozenset(
    {"Invalid HTTP request received.", "Unsupported upgrade request."}
)
"""uvicorn warnings logged once per bad connection: throttled like accept errors."""


class _ThrottleFilter(logging.Filter):
    """Lets each of :data:`THROTTLED_UVICORN_MESSAGES` through once per :data:`LOG_INTERVAL`."""

    def __init__(self) -> None:
        super().__init__()
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, str) or msg not in THROTTLED_UVICORN_MESSAGES:
            return True
        now = time.monotonic()
        if now < self._next.get(msg, 0.0):
            self._skipped[msg] = self._skipped.get(msg, 0) + 1
            return False
        self._next[msg] = now + LOG_INTERVAL
        skipped = self._skipped.pop(msg, 0)
        if skipped:
            record.msg = f"{msg} (and {skipped} more times since the last report)"
        return True


class _Throttled:
    """A log line at most once per ``interval``; the next one counts those left out."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.skipped = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.skipped += 1
            return
        if self.skipped:
            msg += " (and %d more times since the last report)"
            args = (*args, self.skipped)
        log.log(level, msg, *args)
        self.next_at = now + self.interval
        self.skipped = 0


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request on a connection over the cap."""
    body = json.dumps(
        {
            "error": {
                "code": "too_many_connections",
                "message": "the server is at its connection limit; retry shortly",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ConnectionGuard:
    """Header timeout and connection cap for one server; see the module docstring.

    Give :meth:`http_protocol` and :meth:`ws_protocol` to ``uvicorn.Config``
    (``http=``, ``ws=``), call :meth:`install` on the serving loop before it
    accepts connections and :meth:`uninstall` when stopping; register it in a
    Prometheus registry for its figures (:meth:`collect`).
    """

    def __init__(self, *, header_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        # Connections not being answered, oldest first -> deadline for their next request.
        self._idle: dict[_GuardedHTTP, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None
        self._connections: set[Any] = set()  # uvicorn's set of open connections, once seen
        self.timed_out = 0
        self.evicted = 0
        self.refused = 0
        self.accept_errors = 0
        self._log_timeout = _Throttled()
        self._log_evict = _Throttled()
        self._log_refuse = _Throttled()
        self._log_accept = _Throttled()
        self._uvicorn_filter = _ThrottleFilter()

    # -- protocols for uvicorn.Config ------------------------------------------

    def http_protocol(self, kind: str = "auto") -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol guarded by this instance.

        ``kind``: ``"httptools"``, ``"h11"`` or ``"auto"`` (httptools if installed,
        as uvicorn chooses).
        """
        base: type[asyncio.Protocol]
        if kind == "h11":
            from uvicorn.protocols.http.h11_impl import H11Protocol

            base = H11Protocol
        elif kind == "httptools":
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            base = HttpToolsProtocol
        else:
            from uvicorn.protocols.http.auto import AutoHTTPProtocol

            base = AutoHTTPProtocol
        name = f"Guarded{base.__name__}"
        return cast(type[asyncio.Protocol], type(name, (_GuardedHTTP, base), {"guard": self}))

    def ws_protocol(self) -> type[asyncio.Protocol] | None:
        """uvicorn's WebSocket protocol with the abort extension, or ``None`` (keep uvicorn's)."""
        try:
            from uvicorn.protocols.websockets.websockets_sansio_impl import (
                WebSocketsSansIOProtocol,
            )
        except ImportError:  # no websockets library: uvicorn picks another, unguarded
            return None
        return cast(
            type[asyncio.Protocol],
            type("GuardedWebSocketsProtocol", (_GuardedWS, WebSocketsSansIOProtocol), {}),
        )

    # -- lifecycle -------------------------------------------------------------

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take over the loop's reports of failed ``accept()`` calls (rate-limited)."""
        self._loop = loop
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        logging.getLogger("uvicorn.error").addFilter(self._uvicorn_filter)

    def uninstall(self) -> None:
        logging.getLogger("uvicorn.error").removeFilter(self._uvicorn_filter)
        if self._loop is not None and self._loop.get_exception_handler() == self._on_loop_error:
            self._loop.set_exception_handler(self._previous_handler)
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS and "socket" in context:
            self.accept_errors += 1
            self._log_accept(
                logging.WARNING,
                "cannot accept connections: %s; retrying every second. Raise the open-file "
                "limit (ulimit -n) or lower limits.max_connections (now %d)",
                exc,
                self.max_connections,
            )
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # -- figures -------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections open now (HTTP and WebSocket)."""
        return len(self._connections)

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector protocol: register the guard in a registry to export these."""
        yield GaugeMetricFamily(
            "runstream_http_connections",
            "Open HTTP and WebSocket connections.",
            self.open_connections,
        )
        yield GaugeMetricFamily(
            "runstream_http_connections_limit",
            "Most connections open at once (limits.max_connections).",
            self.max_connections,
        )
        dropped = CounterMetricFamily(
            "runstream_http_connections_dropped",
            "Connections closed by the server before a request: header_timeout (no complete "
            "request in time), evicted (oldest idle one, at the limit), refused (503 at the "
            "limit).",
            labels=["reason"],
        )
        dropped.add_metric(["header_timeout"], self.timed_out)
        dropped.add_metric(["evicted"], self.evicted)
        dropped.add_metric(["refused"], self.refused)
        yield dropped
        yield CounterMetricFamily(
            "runstream_accept_errors",
            "Failed accept() calls (EMFILE and friends: out of file descriptors or memory).",
            self.accept_errors,
        )

    # -- called by the protocols ---------------------------------------------

    def opened(self, conn: _GuardedHTTP, open_count: int) -> bool:
        """A new connection; ``False`` if it must be refused (at the cap, nothing to evict)."""
        self._connections = conn.connections
        self.waiting(conn)
        if open_count <= self.max_connections:
            return True
        victim = next(iter(self._idle))
        if victim is conn:  # every other connection is being answered
            self.refused += 1
            self._log_refuse(
                logging.WARNING,
                "connection limit (%d) reached and every connection is busy: "
                "answering 503 to new ones",
                self.max_connections,
            )
            return False
        self.evicted += 1
        self._log_evict(
            logging.WARNING,
            "connection limit (%d) reached: closing the oldest connection that has no request "
            "in progress to admit a new one",
            self.max_connections,
        )
        self.forget(victim)
        victim.transport.abort()
        return True

    def waiting(self, conn: _GuardedHTTP) -> None:
        """``conn`` has no request in progress: it must send one within the header timeout."""
        self._idle.pop(conn, None)
        deadline = time.monotonic() + self.header_timeout
        self._idle[conn] = deadline
        conn._partial = False
        if self._timer is None:
            self._arm(deadline)

    def busy(self, conn: _GuardedHTTP) -> None:
        """A request's headers arrived on ``conn``: it is being answered."""
        self._idle.pop(conn, None)

    def forget(self, conn: _GuardedHTTP) -> None:
        self._idle.pop(conn, None)

    def _arm(self, deadline: float) -> None:
        delay = max(0.0, deadline - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        expired = 0
        while self._idle:
            conn, deadline = next(iter(self._idle.items()))
            if deadline > now:
                self._arm(deadline)
                break
            del self._idle[conn]
            expired += 1
            transport = conn.transport
            if transport.is_closing():
                transport.abort()  # closing but stuck flushing to a client that does not read
            elif conn._partial and not transport.get_write_buffer_size():
                transport.write(_408)
                transport.close()
                if transport.get_write_buffer_size():
                    transport.abort()
            elif transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
        if expired:
            self.timed_out += expired
            self._log_timeout(
                logging.INFO,
                "closed %d connection(s) that sent no complete request within %g s",
                expired,
                self.header_timeout,
            )


def _mark(
    scope: Any, abort: Callable[[], None], direct: Callable[[], DirectTarget | None] | None = None
) -> None:
    extensions = scope.get("extensions")
    if extensions is None:
        extensions = scope["extensions"] = {}
    mark: dict[str, Any] = {"abort": abort}
    if direct is not None:
        mark["direct"] = direct
    extensions[TRANSPORT_EXTENSION] = mark


class _GuardedHTTP(_HTTPBase):
    """Mixed into uvicorn's HTTP protocol class (httptools or h11); ``guard`` set per server.

    Only the asyncio protocol interface and uvicorn's ``cycle`` (the current
    request/response), ``app``, ``transport`` and ``connections`` are used.
    """

    guard: ConnectionGuard
    _partial = False
    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if not self.guard.opened(self, len(self.connections)):
            self._refused = True
            self.app = _refuse

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if not self._after(before) and (self.cycle is None or self.cycle.response_complete):
            self._partial = True  # part of the next request arrived

    def on_response_complete(self) -> None:
        before = self.cycle
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if not self._after(before) and (self.cycle is None or self.cycle.response_complete):
            self.guard.waiting(self)  # idle until the next request (or the timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def _after(self, before: Any) -> bool:
        """Note what parsing did; ``True`` if a request started or the connection was upgraded."""
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket
            self.guard.forget(self)
            if self._refused:
                self.transport.abort()
            return True
        cycle = self.cycle
        if cycle is None or cycle is before:
            return False
        # A request's headers are complete: it is being answered.
        abort = self.transport.abort
        _mark(cycle.scope, abort, partial(_cycle_target, cycle))
        for queued, _ in getattr(self, "pipeline", ()):  # httptools' pipelined requests
            _mark(queued.scope, abort, partial(_cycle_target, queued))
        self.guard.busy(self)
        return True


class _GuardedWS(_WSBase):
    """uvicorn's WebSocket protocol, with the abort extension in the scope."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            _mark(scope, self.transport.abort)
