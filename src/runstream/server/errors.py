"""Every error leaves the server as ``{"error": {"code", "message"}}``, never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from runstream.errors import HistoryLost, RunstreamError
from runstream.server.responses import JSONResponse

log = logging.getLogger("runstream.server")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


def runstream_error_response(exc: RunstreamError) -> JSONResponse:
    """The JSON answer for a runstream error (410 carries where to restart)."""
    if isinstance(exc, HistoryLost):
        return error_response(
            exc.http_status,
            exc.code,
            str(exc),
            epoch=exc.epoch,
            first_id=exc.first_id,
            reason=exc.reason,
        )
    if exc.http_status >= 500:
        log.warning("request failed: %s: %s", type(exc).__name__, exc)
    return error_response(exc.http_status, exc.code, str(exc))


async def _on_runstream_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RunstreamError)
    return runstream_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(400, "invalid", "; ".join(parts) or "invalid request")


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if isinstance(detail, dict) and "code" in detail:
        code, message = str(detail["code"]), str(detail.get("message", ""))
    else:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = str(detail)
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RunstreamError, _on_runstream_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
