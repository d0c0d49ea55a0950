"""Bearer-token auth with ``read`` and ``write`` scopes.

Tokens come from settings. With none configured every request is allowed (the
server then only listens on loopback; see :meth:`Settings.check_bind`). A token
is read from ``Authorization: Bearer <token>`` or, because a browser
``EventSource`` cannot set headers, from the ``token`` query parameter.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, HTTPException
from starlette.requests import HTTPConnection

from runstream.server.runtime import get_runtime


def request_token(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return conn.query_params.get("token") or None


def check_access(conn: HTTPConnection, scope: str) -> tuple[int, str, str] | None:
    """``None`` if allowed, else ``(status, code, message)`` to answer with."""
    settings = get_runtime(conn).settings
    if not settings.auth_enabled:
        return None
    token = request_token(conn)
    scopes = settings.scopes_for(token)
    if scopes is None:
        if token is None:
            return 401, "unauthorized", "an access token is required (Authorization: Bearer ...)"
        return 401, "unauthorized", "the access token is not valid"
    if scope not in scopes:
        return 403, "forbidden", f"the access token does not have the {scope!r} scope"
    return None


def _dependency(scope: str) -> Any:
    async def require(conn: HTTPConnection) -> None:
        denied = check_access(conn, scope)
        if denied is not None:
            status, code, message = denied
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            raise HTTPException(status, detail={"code": code, "message": message}, headers=headers)

    return Depends(require)


require_read = _dependency("read")
"""Route dependency: the request needs a token with the ``read`` scope (if auth is on)."""
require_write = _dependency("write")
"""Route dependency: the request needs a token with the ``write`` scope (if auth is on)."""
