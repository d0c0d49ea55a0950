"""HTTP routes of the web UI: ``GET /`` (the page) and ``GET /ui/{file}`` (its assets)."""

from __future__ import annotations

from fastapi import APIRouter
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

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> Response:
    return FileResponse(INDEX_HTML, media_type=_MEDIA_TYPES[".html"], headers=_NO_CACHE)


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    path = _ASSETS.get(name)
    if path is None:
        return JSONResponse(
            {"error": {"code": "not_found", "message": f"no UI asset {name!r}"}}, status_code=404
        )
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_NO_CACHE)
