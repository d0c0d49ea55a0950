"""HTTP routes of the web UI: ``GET /`` (the page) and ``GET /ui/{file}`` (its assets).

The page runs under a strict Content-Security-Policy: scripts and styles only
from its own files (no inline script, no inline ``style`` attributes; the
log's ANSI colours are set through the CSSOM), connections only back to this
server, no framing, no forms, no ``<base>``. The security middleware adds
``nosniff``, ``X-Frame-Options`` and ``Referrer-Policy`` to every response.
"""

from __future__ import annotations

import re
from typing import Final

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from runstream.ui import INDEX_HTML, STATIC_DIR

_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}
# Assets are served from a fixed allowlist built at import: no path from the request
# ever reaches the filesystem, so there is nothing to traverse.
_ASSETS = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in _MEDIA_TYPES}
_NO_CACHE = {"Cache-Control": "no-cache"}

CSP: Final = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'{ws}",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
"""The page's policy; ``{ws}`` becomes this host's ws:/wss: sources (older browsers do not
count them as 'self')."""
_PLAIN_HOST: Final = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def page_headers(host: str | None) -> dict[str, str]:
    """Headers of the HTML page served for ``host`` (the request's ``Host``)."""
    ws = f" ws://{host} wss://{host}" if host and _PLAIN_HOST.match(host) else ""
    return {
        **_NO_CACHE,
        "Content-Security-Policy": CSP.format(ws=ws),
        "Cross-Origin-Opener-Policy": "same-origin",
    }


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: Request) -> Response:
    headers = page_headers(request.headers.get("host"))
    return FileResponse(INDEX_HTML, media_type=_MEDIA_TYPES[".html"], headers=headers)


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    path = _ASSETS.get(name)
    if path is None:
        return JSONResponse(
            {"error": {"code": "not_found", "message": f"no UI asset {name!r}"}}, status_code=404
        )
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_NO_CACHE)
