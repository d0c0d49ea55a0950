"""Service endpoints: ``/healthz``, ``/readyz``, ``/metrics``; ``/`` when built without the UI."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from runstream.errors import RunstreamError
from runstream.redact import mask_secrets
from runstream.server.runtime import get_runtime

router = APIRouter(tags=["service"])

# The web UI is a later piece of work; until it lands, / says what is here.
_PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>runstream</title></head>
<body><h1>runstream</h1>
<p>This app was built without the web UI (<code>runstream serve</code> includes it;
see <code>runstream.app.build_app</code>). The API is served under <code>/v1</code>:
see <a href="/docs">/docs</a> (<a href="/openapi.json">/openapi.json</a>) and
<a href="/metrics">/metrics</a>.</p></body></html>
"""


@router.get("/healthz", summary="Liveness: the process serves requests")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: the backend answers",
    responses={503: {"description": "backend unreachable"}},
)
async def readyz(request: Request) -> Response:
    runtime = get_runtime(request)
    if runtime.shutting_down.is_set():
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    try:
        await runtime.backend.ping()
    except RunstreamError as exc:
        error = mask_secrets(str(exc))  # a driver's message may quote the URL
        return JSONResponse({"status": "unavailable", "error": error}, status_code=503)
    return JSONResponse({"status": "ok", "backend": runtime.backend.scheme})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    m = get_runtime(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    csp = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    return HTMLResponse(_PLACEHOLDER, headers={"Content-Security-Policy": csp})
