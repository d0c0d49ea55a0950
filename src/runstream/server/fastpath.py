"""A direct route for SSE reads, in front of the framework.

An SSE response lives for minutes or hours, and everything on its call stack
stays allocated for that long. Served through the full FastAPI stack (exit
stacks, dependency state, exception wrappers) a connection holds roughly twice
the memory it needs. This middleware answers ``GET /v1/streams/{stream}/events``
with ``Accept: text/event-stream`` itself, with the same auth, validation and
error bodies as the routed handler (which still serves JSON reads and documents
the endpoint in OpenAPI).
"""

from __future__ import annotations

import logging
import re
from typing import Final

from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from runstream.core.model import validate_stream_name
from runstream.errors import RunstreamError
from runstream.server.auth import check_access
from runstream.server.errors import error_response, runstream_error_response
from runstream.server.metrics import ROUTE_KEY
from runstream.server.runtime import Runtime
from runstream.server.transports import SSE_MEDIA_TYPE, sse_response

log = logging.getLogger("runstream.server")

_EVENTS_PATH: Final = re.compile(r"^/v1/streams/([^/]+)/events$")


class SSEFastPath:
    """Pure ASGI middleware serving SSE reads of ``/v1/streams/{stream}/events`` directly."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        match = _EVENTS_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if SSE_MEDIA_TYPE not in conn.headers.get("accept", "").lower():
            await self.app(scope, receive, send)
            return
        scope[ROUTE_KEY] = "/v1/streams/{stream}/events"
        response: Response
        try:
            denied = check_access(conn, "read")
            if denied is not None:
                status, code, message = denied
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response = error_response(status, code, message, headers=headers)
            else:
                stream = validate_stream_name(match.group(1))
                response = await sse_response(
                    self.runtime,
                    stream,
                    last_event_id=conn.headers.get("last-event-id"),
                    after=conn.query_params.get("after"),
                )
        except RunstreamError as exc:
            response = runstream_error_response(exc)
        except Exception:  # never a stack trace to the client
            log.exception("unhandled error on SSE read of %s", scope["path"])
            response = error_response(500, "internal", "internal server error")
        del conn
        await response(scope, receive, send)
