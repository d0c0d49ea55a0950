"""The two hot endpoints as a plain route at the head of the router.

``GET`` and ``POST /v1/streams/{stream}/events`` carry almost all of a
server's traffic: every subscriber and every appended event. Served through
FastAPI's routed handlers (dependency solving, exit stacks, exception
wrappers), an append costs several times what its own work does, and an SSE
connection, which lives for minutes or hours with everything on its call stack
allocated, holds roughly twice the memory it needs.

:func:`events_route` is a Starlette :class:`~starlette.routing.Route` with a
bare ASGI endpoint, inserted first in the app's router, so it is matched like
any route (mounts and ``root_path`` included) and the routed FastAPI handlers
behind it only document the endpoints in OpenAPI. Both call the same functions
(:func:`~runstream.server.streams.append_response`,
:func:`~runstream.server.streams.read_response`) with the same auth and the
same error bodies; ``tests/server/test_fastpath.py`` checks they answer alike.

:class:`FrontPath` goes one step further for an app served at the root (no
``root_path``): the app object hands these requests straight to
``SecurityMiddleware(LatencyMiddleware(endpoint))`` — the same two middlewares,
with the same policy and metrics, every request passes — without entering
FastAPI's stack (its telemetry hook, error, body-limit, exception and exit-stack
layers and the router), which otherwise costs about a sixth of an append.
Everything else (other paths and methods, a ``root_path``) takes the full stack.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Final, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runstream.core.model import validate_stream_name
from runstream.errors import RunstreamError, ValidationError
from runstream.protocol.cursor import WAIT_FOR_CREATE
from runstream.server.auth import check_access
from runstream.server.errors import error_response, runstream_error_response
from runstream.server.metrics import ROUTE_KEY, LatencyMiddleware, Metrics
from runstream.server.runtime import Runtime
from runstream.server.security import SecurityMiddleware, SecurityPolicy
from runstream.server.streams import append_response, read_response

log = logging.getLogger("runstream.server")

EVENTS_PATH: Final = "/v1/streams/{stream}/events"


class _EventsEndpoint:
    """The bare ASGI endpoint behind :func:`events_route` (an instance, so Starlette
    calls it as an ASGI app instead of wrapping it in a request/response function)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ROUTE_KEY] = EVENTS_PATH
        request = Request(scope, receive)
        stream: str = scope["path_params"]["stream"]
        response: Response
        try:
            denied = check_access(request, "write" if scope["method"] == "POST" else "read")
            if denied is not None:
                status, code, message = denied
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response = error_response(status, code, message, headers=headers)
            elif scope["method"] == "POST":
                response = await append_response(request, self.runtime, stream)
            else:
                response = await self._read(request, stream)
        except RunstreamError as exc:
            response = runstream_error_response(exc)
        except Exception:  # never a stack trace to the client
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal", "internal server error")
        del request
        await response(scope, receive, send)

    async def _read(self, request: Request, stream: str) -> Response:
        query = request.query_params
        return await read_response(
            request,
            self.runtime,
            validate_stream_name(stream),
            after=query.get("after"),
            limit=_number(query.get("limit"), "limit", int, minimum=1),
            wait=_number(query.get("wait"), "wait", float, minimum=0) or 0.0,
            last_event_id=request.headers.get("last-event-id"),
            wait_for_create=query.get(WAIT_FOR_CREATE),
        )


N = TypeVar("N", int, float)


def _number(text: str | None, name: str, kind: type[N], *, minimum: N) -> N | None:
    """A query number as the routed handler's declaration reads it (400 ``invalid`` if not)."""
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValidationError(f"query.{name}: not a valid {kind.__name__}", field=name) from None
    if (isinstance(value, float) and not math.isfinite(value)) or value < minimum:
        raise ValidationError(f"query.{name}: must be >= {minimum}", field=name)
    return value


def events_route(runtime: Runtime) -> Route:
    """The route serving ``GET``/``POST`` :data:`EVENTS_PATH`; insert it first in the router."""
    return Route(
        EVENTS_PATH,
        endpoint=_EventsEndpoint(runtime),
        methods=["GET", "POST"],
        include_in_schema=False,
        name="events_fast",
    )


_EVENTS_RE: Final = re.compile(r"/v1/streams/([^/]+)/events")
_FRONT_METHODS: Final = frozenset({"GET", "POST"})


class FrontPath:
    """The events endpoint behind only the security and latency middlewares.

    :meth:`match` tells whether a scope is one it serves (an HTTP ``GET`` or
    ``POST`` of :data:`EVENTS_PATH` with no ``root_path``) and sets its path
    parameters; the app then calls the instance instead of its own stack.
    """

    def __init__(self, runtime: Runtime, policy: SecurityPolicy, metrics: Metrics) -> None:
        inner: ASGIApp = LatencyMiddleware(_EventsEndpoint(runtime), metrics=metrics)
        self.app: ASGIApp = SecurityMiddleware(inner, policy=policy)

    @staticmethod
    def match(scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] not in _FRONT_METHODS:
            return False
        if scope.get("root_path"):
            return False
        found = _EVENTS_RE.fullmatch(scope["path"])
        if found is None:
            return False
        scope["path_params"] = {"stream": found.group(1)}
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
