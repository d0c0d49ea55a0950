"""The follower's WebSocket connection: the ``websockets`` library behind three outcomes.

A connection attempt either works (:meth:`Connection.recv` returns messages)
or ends in one of three ways the follower tells apart:

* :class:`Rejected` — the server answered the handshake with an HTTP status
  (401, 404, 429, ...): handled like the same status on SSE;
* :class:`Closed` — the server closed the WebSocket with a close frame; its
  code says why (1000 the stream is over, 1001 shutdown, 1013 slow consumer,
  4404 deleted, ...);
* :class:`Broken` — anything else (refused, reset, no close frame, invalid
  handshake, open timeout): retried like a network error.

``websockets`` is a runtime dependency of runstream (the server needs it too:
``uvicorn[standard]`` serves WebSockets with it), so this import never fails
in a normal install. Client-side pings are off: the server's heartbeats feed
the follower's idle watchdog, and a client that pauses reading for
backpressure must not be dropped for missing its own pongs. Compression is
not negotiated (see :meth:`Connection.open`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

OPEN_TIMEOUT = 10.0
ERROR_BODY = 4096


class Rejected(Exception):
    """The handshake was answered with an HTTP ``status`` (and ``body``, ``headers``)."""

    def __init__(self, status: int, body: str, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers


class Closed(Exception):
    """The server closed the connection with close ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code} {reason}".strip())
        self.code = code
        self.reason = reason


class Broken(Exception):
    """The connection failed or ended without a close frame."""


class Connection:
    """One WebSocket connection attempt; use ``async with``, then :meth:`open`, :meth:`recv`.

    Leaving the block drops the connection at once (no closing handshake to
    wait for: a stalled peer would hold it for the close timeout).
    """

    def __init__(self, url: str, headers: Mapping[str, str], *, max_size: int) -> None:
        self.url = url
        self.headers = dict(headers)
        self.max_size = max_size
        self._ws: ClientConnection | None = None

    async def open(self) -> None:
        """Connect and complete the handshake; raises :class:`Rejected` or :class:`Broken`."""
        try:
            self._ws = await connect(
                self.url,
                additional_headers=self.headers,
                open_timeout=OPEN_TIMEOUT,
                ping_interval=None,
                max_size=self.max_size,
                # As SSE asks for identity: the server would compress every message
                # once per client, where frames are otherwise shared by all clients.
                compression=None,
            )
        except InvalidStatus as exc:
            response = exc.response
            body = bytes(response.body[:ERROR_BODY]).decode("utf-8", "replace")
            raise Rejected(response.status_code, body, response.headers) from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise Broken(repr(exc)) from exc

    async def recv(self) -> str | bytes:
        """The next message; raises :class:`Closed` or :class:`Broken` when the connection ends."""
        assert self._ws is not None, "open() first"
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                raise Broken(repr(exc)) from exc
            raise Closed(exc.rcvd.code, exc.rcvd.reason) from exc
        except (OSError, WebSocketException) as exc:
            raise Broken(repr(exc)) from exc

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.transport.abort()
            await ws.wait_closed()
