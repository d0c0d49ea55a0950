"""``/v1/streams``: append, read (SSE, JSON long-poll, WebSocket), info, close, delete, list."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, WebSocket
from starlette.responses import Response

from runstream.core import jsonbody
from runstream.core.model import (
    STREAM_NAME_RE,
    SYSTEM_PREFIX,
    NewEvent,
    Producer,
    validate_stream_name,
)
from runstream.errors import PayloadTooLarge, ValidationError
from runstream.protocol.cursor import WAIT_FOR_CREATE
from runstream.server import schemas
from runstream.server.auth import check_access, require_read, require_write
from runstream.server.responses import JSONResponse, page_response
from runstream.server.runtime import Runtime, get_runtime
from runstream.server.transports import (
    deny_websocket,
    long_poll,
    serve_websocket,
    sse_response,
    waits_for_create,
    wants_sse,
)

router = APIRouter(prefix="/v1", tags=["streams"])

StreamName = Annotated[
    str,
    Path(
        description="Stream name: 1-200 of A-Z a-z 0-9 . _ : - , starting with a letter or digit.",
        json_schema_extra={"pattern": STREAM_NAME_RE.pattern},
    ),
]

_EVENT_SCHEMA: dict[str, Any] = schemas.EventIn.model_json_schema()

_APPEND_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _EVENT_SCHEMA,
                        {"type": "array", "items": _EVENT_SCHEMA, "minItems": 1},
                    ]
                }
            }
        },
    }
}

_CLOSE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": schemas.CloseIn.model_json_schema()}},
    }
}


# The read endpoint's parameters and answers, shared with the runs' events endpoint.
AfterQuery = Annotated[
    str | None,
    Query(description="Last id seen: N, '<epoch>:N' or 'now'. Default: the beginning."),
]
LimitQuery = Annotated[int | None, Query(ge=1, description="JSON page size.")]
WaitQuery = Annotated[
    float, Query(ge=0, description="JSON: seconds to wait when nothing is new (capped).")
]
LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID")]
WaitForCreateQuery = Annotated[
    str | None,
    Query(
        alias=WAIT_FOR_CREATE,
        description=(
            "A stream that does not exist yet: wait for it (true: SSE and WebSocket open at"
            " once and deliver from id 1 once it is created; a JSON read with wait= waits up"
            " to that long, then answers an empty page with epoch null) or answer 404"
            " (false). Default: the server's wait_for_create setting (true)."
        ),
    ),
]


def read_responses(what: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI answers of an events read of ``what`` ("a closed stream", "the run")."""
    return {
        200: {
            "description": "JSON page, or an event stream with `Accept: text/event-stream`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        204: {"description": f"SSE only: the reader is already at the end of {what}."},
        **schemas.errors(400, 401, 403, 404, 410, 429),
    }


async def read_response(
    request: Request,
    runtime: Runtime,
    stream: str,
    *,
    after: str | None,
    limit: int | None,
    wait: float,
    last_event_id: str | None,
    wait_for_create: str | None = None,
    always_wait: bool = False,
) -> Response:
    """SSE if the client asks for ``text/event-stream``, else a JSON page (long-poll with wait).

    ``wait_for_create`` is the query parameter (see :func:`waits_for_create`); a
    JSON read waits for a missing stream only as a long-poll (``wait`` > 0):
    without, it is 404, unless ``always_wait`` (a stream that exists for its
    readers before its first event, like the runs feed) makes it an empty page.
    """
    waits = waits_for_create(runtime, wait_for_create)
    if wants_sse(request):
        return await sse_response(
            runtime, stream, last_event_id=last_event_id, after=after, wait_for_create=waits
        )
    waits = waits and (wait > 0 or always_wait)
    page = await long_poll(
        runtime, stream, after=after, limit=limit, wait=wait, wait_for_create=waits
    )
    return page_response(page)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(runtime: Runtime, body: bytes, *, max_depth: int | None = -1) -> Any:
    """Decode a request body by the one rule for stored input (:mod:`runstream.core.jsonbody`).

    ``max_depth`` defaults to ``limits.max_json_depth``; ``None`` leaves depth to the caller.
    """
    depth = runtime.settings.limits.max_json_depth if max_depth == -1 else max_depth
    return jsonbody.parse_json(body, max_depth=depth)


def parse_events(runtime: Runtime, payload: Any) -> list[NewEvent]:
    """Validate an append body (one event object or a non-empty array) against the limits.

    The body was decoded without a depth check: each event's data is checked here
    against ``max_json_depth`` less the two levels of the body around it.
    """
    limits = runtime.settings.limits
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise ValidationError("an append needs at least one event", field="body")
    if len(items) > limits.max_batch:
        raise PayloadTooLarge(
            f"a batch holds at most {limits.max_batch} events; this one has {len(items)}"
        )
    data_depth = max(1, limits.max_json_depth - 2)
    events = []
    for i, item in enumerate(items):
        try:
            event = NewEvent.from_json(item)
            encoded = event.data_json
            jsonbody.check_depth(event.data, encoded, max_depth=data_depth, where="data")
        except ValidationError as exc:
            where = f"event {i}: " if isinstance(payload, list) else ""
            raise ValidationError(f"{where}{exc}", field=exc.field) from None
        size = len(encoded) if encoded.isascii() else len(encoded.encode())
        if size > limits.max_event_bytes:
            raise PayloadTooLarge(
                f"event {i}: data is {size} bytes encoded; the limit is {limits.max_event_bytes}"
            )
        events.append(event)
    return events


async def append_response(request: Request, runtime: Runtime, stream: str) -> JSONResponse:
    """Validate and append the body of ``request`` to ``stream``; the 201 answer.

    The whole append endpoint once access is granted, shared by the routed
    handler and :class:`~runstream.server.fastpath.StreamsFastPath`. Raises
    :class:`~runstream.errors.RunstreamError` for anything to refuse.
    """
    validate_writable(stream)
    producer = parse_producer(
        request.headers.get("producer-id"), request.headers.get("producer-seq")
    )
    body = await read_body(request, runtime.settings.limits.max_body_bytes)
    events = parse_events(runtime, parse_json(runtime, body, max_depth=None))
    result = await runtime.backend.append(stream, events, producer=producer)
    if not result.duplicate:
        runtime.metrics.events_appended.inc(len(events))
    return JSONResponse(result.to_json(), status_code=201)


def validate_writable(stream: str) -> str:
    """``stream`` if it is a valid name the streams API may write to; else 400.

    Names starting with ``runstream:`` are the server's own (the runs feed):
    a client appending to, closing or deleting them would forge or break what
    every run listener reads.
    """
    validate_stream_name(stream)
    if stream.startswith(SYSTEM_PREFIX):
        raise ValidationError(
            f"stream {stream!r} is written by the server itself (names starting with "
            f"{SYSTEM_PREFIX!r} are reserved); it can be read, not written",
            field="stream",
        )
    return stream


def parse_producer(producer_id: str | None, producer_seq: str | None) -> Producer | None:
    if producer_id is None and producer_seq is None:
        return None
    if producer_id is None or producer_seq is None:
        raise ValidationError("send Producer-Id and Producer-Seq together", field="Producer-Id")
    text = producer_seq.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ValidationError("Producer-Seq must be a non-negative integer", field="Producer-Seq")
    return Producer(producer_id, int(text))


@router.post(
    "/streams/{stream}/events",
    status_code=201,
    dependencies=[require_write],
    response_model=schemas.AppendOut,
    responses=schemas.errors(400, 401, 403, 409, 413),
    openapi_extra=_APPEND_BODY,
    summary="Append one event or an atomic batch",
)
async def append_events(
    request: Request,
    stream: StreamName,
    producer_id: Annotated[str | None, Header(alias="Producer-Id")] = None,
    producer_seq: Annotated[str | None, Header(alias="Producer-Seq")] = None,
) -> Response:
    # Served by StreamsFastPath in a running app; here for OpenAPI and any app built
    # without it. Producer-Id/Seq are declared above for the docs; read from the request.
    del producer_id, producer_seq
    return await append_response(request, get_runtime(request), stream)


@router.get(
    "/streams/{stream}/events",
    dependencies=[require_read],
    response_model=schemas.PageOut,
    responses=read_responses("a closed stream"),
    summary="Read events: JSON page (long-poll with wait=) or SSE",
)
async def read_events(
    request: Request,
    stream: StreamName,
    after: AfterQuery = None,
    limit: LimitQuery = None,
    wait: WaitQuery = 0.0,
    last_event_id: LastEventIdHeader = None,
    wait_for_create: WaitForCreateQuery = None,
) -> Response:
    runtime = get_runtime(request)
    validate_stream_name(stream)
    return await read_response(
        request,
        runtime,
        stream,
        after=after,
        limit=limit,
        wait=wait,
        last_event_id=last_event_id,
        wait_for_create=wait_for_create,
    )


@router.get(
    "/streams/{stream}",
    dependencies=[require_read],
    response_model=schemas.StreamInfoOut,
    responses=schemas.errors(400, 401, 403, 404),
    summary="Stream state",
)
async def stream_info(request: Request, stream: StreamName) -> Response:
    runtime = get_runtime(request)
    validate_stream_name(stream)
    info = await runtime.backend.info(stream)
    return JSONResponse(info.to_json())


@router.post(
    "/streams/{stream}/close",
    dependencies=[require_write],
    response_model=schemas.StreamInfoOut,
    responses=schemas.errors(400, 401, 403, 413),
    openapi_extra=_CLOSE_BODY,
    summary="Close a stream (appends its end entry); idempotent",
)
async def close_stream(request: Request, stream: StreamName) -> Response:
    runtime = get_runtime(request)
    validate_writable(stream)
    body = await read_body(request, runtime.settings.limits.max_body_bytes)
    close = schemas.CloseIn()
    if body.strip():
        close = schemas.validate_body(schemas.CloseIn, parse_json(runtime, body))
    info = await runtime.backend.close(stream, close.status, close.reason)
    return JSONResponse(info.to_json())


@router.delete(
    "/streams/{stream}",
    status_code=204,
    dependencies=[require_write],
    responses=schemas.errors(400, 401, 403, 404),
    summary="Delete a stream and its history",
)
async def delete_stream(request: Request, stream: StreamName) -> Response:
    runtime = get_runtime(request)
    validate_writable(stream)
    await runtime.backend.delete(stream)
    return Response(status_code=204)


@router.get(
    "/streams",
    dependencies=[require_read],
    response_model=schemas.StreamListOut,
    responses=schemas.errors(400, 401, 403),
    summary="List streams by name (paginated)",
)
async def list_streams(
    request: Request,
    prefix: Annotated[str, Query(max_length=200)] = "",
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    runtime = get_runtime(request)
    infos = await runtime.backend.list_streams(prefix=prefix, start_after=cursor or "", limit=limit)
    next_cursor = infos[-1].name if len(infos) == limit else None
    return JSONResponse({"streams": [i.to_json() for i in infos], "next_cursor": next_cursor})


@router.websocket("/streams/{stream}/ws")
async def stream_websocket(websocket: WebSocket, stream: str) -> None:
    """Follow a stream over WebSocket (``?after=``, ``?token=``, ``?wait_for_create=``)."""
    runtime = get_runtime(websocket)
    denied = check_access(websocket, "read")
    if denied is not None:
        await deny_websocket(websocket, *denied)
        return
    if not STREAM_NAME_RE.fullmatch(stream):
        try:
            validate_stream_name(stream)
        except ValidationError as exc:
            await deny_websocket(websocket, 400, exc.code, str(exc))
            return
    await serve_websocket(runtime, websocket, stream)
