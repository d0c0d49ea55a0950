"""Bearer-token auth with ``read`` and ``write`` scopes.

Tokens come from settings. With none configured every request is allowed (the
server then only listens on loopback; see :meth:`Settings.check_bind`). A token
is read from ``Authorization: Bearer <token>``; on a WebSocket handshake, from
the subprotocol ``runstream.bearer.<base64url(token)>`` offered next to
``runstream`` (a browser's ``WebSocket`` cannot set headers, and a URL ends up
in logs and history); last, because a browser ``EventSource`` can do neither,
from the ``token`` query parameter (masked in the server's logs).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from fastapi import Depends, HTTPException
from starlette.requests import HTTPConnection

from runstream.server.runtime import get_runtime

WS_SUBPROTOCOL: Final = "runstream"
"""The WebSocket subprotocol the server selects when a client offers it."""
WS_TOKEN_PREFIX: Final = "runstream.bearer."
"""Prefix of the subprotocol that carries a token: ``runstream.bearer.<base64url, unpadded>``."""


def offered_subprotocols(conn: HTTPConnection) -> list[str]:
    """The subprotocols a WebSocket handshake offers (``Sec-WebSocket-Protocol``)."""
    return [
        item.strip()
        for value in conn.headers.getlist("sec-websocket-protocol")
        for item in value.split(",")
        if item.strip()
    ]


def ws_subprotocol(conn: HTTPConnection) -> str | None:
    """The subprotocol to accept a WebSocket with: ``runstream`` if offered, else none.

    A browser that offered subprotocols fails the connection unless the server
    selects one of them, so a client sending its token as a subprotocol must
    offer ``runstream`` too; the token itself is never echoed back.
    """
    return WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered_subprotocols(conn) else None


def _subprotocol_token(conn: HTTPConnection) -> str | None:
    for item in offered_subprotocols(conn):
        if item.startswith(WS_TOKEN_PREFIX):
            encoded = item[len(WS_TOKEN_PREFIX) :]
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                return raw.decode("utf-8") or None
            except (binascii.Error, ValueError):
                return item  # not a valid encoding: refused as an unknown token
    return None


def request_token(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if conn.scope["type"] == "websocket" and (token := _subprotocol_token(conn)) is not None:
        return token
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
