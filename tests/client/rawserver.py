"""A scripted HTTP/1.1 server for answers a real server never gives (wrong content type, 401s)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def http_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    reason = {200: "OK", 204: "No Content", 401: "Unauthorized", 403: "Forbidden"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", "Connection: close"]
    if status != 204:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body if status != 204 else b"")


class RawServer:
    """Answers each request with ``respond(request_head, index)`` and closes the connection."""

    def __init__(self, respond: Callable[[bytes, int], bytes]) -> None:
        self.respond = respond
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_requests(self, n: int) -> None:
        """Wait until ``n`` requests were answered."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= n)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            writer.write(self.respond(head, len(self.requests) - 1))
            await writer.drain()
            async with self._changed:
                self._changed.notify_all()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
