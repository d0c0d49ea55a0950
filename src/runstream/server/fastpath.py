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
"""

from __future__ import annotations

import logging
import math
from typing import Final, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from runstream.core.model import validate_stream_name
from runstream.errors import RunstreamError, ValidationError
from runstream.protocol.cursor import WAIT_FOR_CREATE
from runstream.server.auth import check_access
from runstream.server.errors import error_response, runstream_error_response
from runstream.server.metrics import ROUTE_KEY
from runstream.server.runtime import Runtime
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
