"""A direct route for the two hot endpoints, in front of the framework.

``GET`` and ``POST /v1/streams/{stream}/events`` carry almost all of a
server's traffic: every subscriber and every appended event. Served through
the full FastAPI stack (routing, dependency solving, exit stacks, exception
wrappers), an append costs several times what its own work does, and an SSE
connection, which lives for minutes or hours with everything on its call stack
allocated, holds roughly twice the memory it needs. This middleware answers
both itself, with the same auth, validation and error bodies as the routed
handlers (which still document the endpoints in OpenAPI and serve JSON reads,
and share their code with this path: :func:`~runstream.server.streams.append_response`,
:func:`~runstream.server.transports.sse_response`).
"""

from __future__ import annotations

import logging
import re
from typing import Final

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from runstream.core.model import validate_stream_name
from runstream.errors import RunstreamError
from runstream.server.auth import check_access
from runstream.server.errors import error_response, runstream_error_response
from runstream.server.metrics import ROUTE_KEY
from runstream.server.runtime import Runtime
from runstream.server.streams import append_response
from runstream.server.transports import SSE_MEDIA_TYPE, sse_response

log = logging.getLogger("runstream.server")

_EVENTS_PATH: Final = re.compile(r"^/v1/streams/([^/]+)/events$")
_ROUTE: Final = "/v1/streams/{stream}/events"


class StreamsFastPath:
    """Pure ASGI middleware serving SSE reads and appends of ``/v1/streams/{stream}/events``."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if scope["type"] != "http" or method not in ("GET", "POST"):
            await self.app(scope, receive, send)
            return
        match = _EVENTS_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        if method == "GET":
            conn = HTTPConnection(scope)
            if SSE_MEDIA_TYPE not in conn.headers.get("accept", "").lower():
                await self.app(scope, receive, send)  # JSON reads: the routed handler
                return
            access = "read"
        else:
            conn = Request(scope, receive)
            access = "write"
        scope[ROUTE_KEY] = _ROUTE
        response: Response
        try:
            denied = check_access(conn, access)
            if denied is not None:
                status, code, message = denied
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response = error_response(status, code, message, headers=headers)
            elif isinstance(conn, Request):
                response = await append_response(conn, self.runtime, match.group(1))
            else:
                response = await sse_response(
                    self.runtime,
                    validate_stream_name(match.group(1)),
                    last_event_id=conn.headers.get("last-event-id"),
                    after=conn.query_params.get("after"),
                )
        except RunstreamError as exc:
            response = runstream_error_response(exc)
        except Exception:  # never a stack trace to the client
            log.exception("unhandled error on %s %s", method, scope["path"])
            response = error_response(500, "internal", "internal server error")
        del conn
        await response(scope, receive, send)
