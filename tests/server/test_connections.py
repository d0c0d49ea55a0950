"""Connection limits over real sockets: header timeout, the connection cap, accept errors.

The server tests run on both of uvicorn's HTTP parsers (httptools, h11): the
guard wraps whichever is in use.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from runstream.config import Settings
from runstream.server.app import create_app
from runstream.server.connections import ConnectionGuard, connection_limits
from tests.server.live import LiveServer, make_settings, open_sse, publish, serve_in_task

StartServer = Callable[[Settings], Awaitable[LiveServer]]


@pytest.fixture(params=["httptools", "h11"])
async def start_server(request: pytest.FixtureRequest) -> AsyncIterator[StartServer]:
    servers: list[LiveServer] = []

    async def start(settings: Settings) -> LiveServer:
        live = await serve_in_task(create_app(settings), settings, http=request.param)
        servers.append(live)
        return live

    yield start
    for live in servers:
        await live.stop()


REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_to_eof(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(4096):
                data += chunk
    except ConnectionResetError:
        pass
    return data


async def still_open(reader: asyncio.StreamReader) -> bool:
    """True if the server has neither sent anything nor closed within a short while."""
    try:
        async with asyncio.timeout(0.3):
            await reader.read(1)
    except TimeoutError:
        return True
    return False


async def test_partial_request_gets_408_and_is_closed_after_the_header_timeout(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(limit_header_timeout=0.5))
    reader, writer = await connect(live.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127")
    start = time.monotonic()
    answer = await read_to_eof(reader, 10)
    took = time.monotonic() - start
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < took < 5, took
    async with httpx.AsyncClient(base_url=live.url, timeout=5) as http:
        metrics = (await http.get("/metrics")).text
    assert 'runstream_http_connections_dropped_total{reason="header_timeout"} 1.0' in metrics


async def test_silent_connection_is_closed_after_the_header_timeout(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(limit_header_timeout=0.5))
    reader, writer = await connect(live.port)
    assert await read_to_eof(reader, 10) == b""
    writer.close()


async def test_partial_second_request_on_a_kept_alive_connection_is_timed_out(
    start_server: StartServer,
) -> None:
    # uvicorn's keep-alive timer stops at the first byte of the next request; ours does not.
    live = await start_server(make_settings(limit_header_timeout=1.0))
    reader, writer = await connect(live.port)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.write(b"GET /heal")
    assert (await read_to_eof(reader, 10)).startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_headers_arriving_in_pieces_within_the_timeout_are_served(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(limit_header_timeout=2.0))
    reader, writer = await connect(live.port)
    for piece in (REQUEST[:10], REQUEST[10:30], REQUEST[30:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.1)  # a slow client, well within the timeout
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_long_streaming_responses_are_not_cut_by_the_header_timeout(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(limit_header_timeout=0.3))
    async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
        await publish(http, "s", 1)
        async with open_sse(http, "/v1/streams/s/events") as sse:
            assert len(await sse.take(1)) == 1
            await asyncio.sleep(1.0)  # survives three header timeouts
            await publish(http, "s", 1, start=1)
            assert len(await sse.take(1)) == 1


async def test_at_the_cap_the_oldest_idle_connection_makes_room(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(limit_max_connections=10, limit_header_timeout=60))
    idle = [await connect(live.port) for _ in range(10)]
    async with httpx.AsyncClient(base_url=live.url, timeout=5) as http:
        assert (await http.get("/healthz")).status_code == 200
        oldest_reader, _ = idle[0]
        assert await read_to_eof(oldest_reader, 5) == b""  # closed to admit the request
        assert await still_open(idle[-1][0])
        metrics = (await http.get("/metrics")).text
    assert 'runstream_http_connections_dropped_total{reason="evicted"} 1.0' in metrics
    assert "runstream_http_connections_limit 10.0" in metrics
    assert "runstream_http_connections 10.0" in metrics  # 9 idle + the one asking
    for _, writer in idle:
        writer.close()


async def test_at_the_cap_with_every_connection_busy_new_ones_get_503(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(limit_max_connections=3))
    clients = [httpx.AsyncClient(base_url=live.url, timeout=10) for _ in range(4)]
    try:
        await publish(clients[0], "s", 1)
        async with (
            open_sse(clients[0], "/v1/streams/s/events") as a,
            open_sse(clients[1], "/v1/streams/s/events") as b,
        ):
            for sse in (a, b):
                assert len(await sse.take(1)) == 1
            async with open_sse(clients[2], "/v1/streams/s/events") as c:
                assert len(await c.take(1)) == 1
                r = await clients[3].get("/healthz")
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "too_many_connections"
                assert r.headers["connection"] == "close" and r.headers["retry-after"] == "1"
            await clients[2].aclose()  # one stream ends: room again
            deadline = time.monotonic() + 10
            while (r := await clients[3].get("/healthz")).status_code == 503:
                assert time.monotonic() < deadline  # the closed socket is released at once
                await asyncio.sleep(0.05)
            assert r.status_code == 200
    finally:
        for client in clients:
            await client.aclose()


async def test_accept_errors_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    passed_on: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: passed_on.append(context))
    guard = ConnectionGuard(header_timeout=10, max_connections=100)
    guard.install(loop)
    try:
        with caplog.at_level(logging.WARNING, logger="runstream.server"):
            for _ in range(500):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                        "socket": object(),
                    }
                )
        other = {"message": "something else"}
        loop.call_exception_handler(other)
    finally:
        guard.uninstall()
    records = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(records) == 1 and "ulimit -n" in records[0].getMessage()
    assert guard.accept_errors == 500
    assert passed_on == [other]  # everything else still reaches the previous handler
    loop.call_exception_handler(other)
    assert passed_on == [other, other]  # restored
    loop.set_exception_handler(None)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_malformed_requests_are_logged_once_per_interval(start_server: StartServer) -> None:
    live = await start_server(make_settings())
    handler = Collect()
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's logger does not propagate
    uvicorn_log.addHandler(handler)
    try:
        for _ in range(20):
            reader, writer = await connect(live.port)
            writer.write(b"NOT HTTP AT ALL\x00\r\n\r\n")
            assert (await read_to_eof(reader, 5)).startswith(b"HTTP/1.1 400 ")
            writer.close()
    finally:
        uvicorn_log.removeHandler(handler)
    records = [r for r in handler.records if "Invalid HTTP request" in r.getMessage()]
    assert len(records) == 1


def test_default_cap_leaves_room_below_the_open_file_limit() -> None:
    cap, backlog, nofile = connection_limits(None)
    assert cap > 0 and cap + backlog < nofile
    assert connection_limits(5)[0] == 5
    assert connection_limits(10**9)[0] == cap
