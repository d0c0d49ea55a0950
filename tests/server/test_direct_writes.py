"""Live SSE frames written straight to the socket, on both uvicorn parsers and HTTP versions.

An idle live subscriber's frames bypass the ASGI ``send`` (one socket write
per frame, framed as the parser frames the body: chunked, or delimited by
the connection's close for an HTTP/1.0 client on h11). These tests read the
raw bytes, so a framing mistake shows as a broken body, and check the
guarantees that still hold: order and ids, the end entry ending the response,
a client that stops reading cut as a slow consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from runstream.config import Settings
from runstream.protocol.sse import SSEDecoder, SSEMessage
from runstream.server import transports
from runstream.server.app import create_app
from tests.server.live import LiveServer, make_settings, serve_in_task

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


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the frames written directly (so a test knows the direct path was taken)."""
    count = [0]
    original = transports._DirectSSE.__call__

    def counting(self: transports._DirectSSE, frame: transports.Frame) -> bool:
        written = original(self, frame)
        count[0] += written
        return written

    monkeypatch.setattr(transports._DirectSSE, "__call__", counting)
    return count


async def read_head(reader: asyncio.StreamReader) -> dict[str, str]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    assert " 200 " in lines[0], lines[0]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}


async def read_body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, de-chunked; ends at the last chunk (or EOF)."""
    while True:
        if not chunked:
            data = await asyncio.wait_for(reader.read(1 << 16), 10)
            if not data:
                return
            yield data
            continue
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10))[:-2], 16)
        data = await asyncio.wait_for(reader.readexactly(size + 2), 10)
        assert data[-2:] == b"\r\n", "a chunk must end with CRLF"
        if size == 0:
            return
        yield data[:-2]


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_live_frames_written_directly_arrive_whole_and_in_order(
    start_server: StartServer, direct_writes: list[int], version: str
) -> None:
    live = await start_server(make_settings().replace(backend="memory://"))
    async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
        assert (await http.post("/v1/streams/d/events", json={"type": "t", "data": 0})).is_success
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(
            f"GET /v1/streams/d/events?after=now HTTP/{version}\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        headers = await read_head(reader)
        chunked = headers.get("transfer-encoding") == "chunked"
        assert chunked or version == "1.0"
        body = read_body(reader, chunked)
        decoder = SSEDecoder()
        messages: list[SSEMessage] = []

        async def until(n: int) -> None:
            while len(messages) < n:
                messages.extend(decoder.feed(await anext(body)))

        await until(0)
        # Each POST is answered after the append; the subscriber is idle when it arrives.
        for i in range(1, 31):
            r = await http.post("/v1/streams/d/events", json={"type": "t", "data": {"i": i}})
            assert r.status_code == 201
            await until(i)
        assert (await http.post("/v1/streams/d/close")).status_code == 200
        async for data in body:  # to the end of the response: last chunk, or EOF
            messages.extend(decoder.feed(data))
        writer.close()
    events = [m for m in messages if m.event == "t"]
    assert [json.loads(m.data)["i"] for m in events] == list(range(1, 31))
    ids = [int(m.id.split(":")[1]) for m in events]
    assert ids == list(range(ids[0], ids[0] + 30))
    assert messages[-1].event == "end"
    assert direct_writes[0] >= 25  # the direct path served (nearly) every live frame
    delivered = live.runtime.metrics.registry.get_sample_value(
        "runstream_events_delivered_total", {"transport": "sse"}
    )
    assert delivered == len(messages)


async def test_a_client_that_stops_reading_is_cut_as_a_slow_consumer(
    start_server: StartServer,
) -> None:
    send_timeout, grace = 1.0, 0.5
    live = await start_server(
        make_settings(limit_send_timeout=send_timeout, shutdown_grace=grace).replace(
            backend="memory://"
        )
    )
    pad = "x" * 200_000
    async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
        assert (await http.post("/v1/streams/s/events", json={"type": "t", "data": 0})).is_success
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", live.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 14)
        writer.write(
            b"GET /v1/streams/s/events?after=now HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )
        await read_head(reader)
        hub = live.runtime.hub
        deadline = time.monotonic() + 10
        while hub.subscriber_count != 1 or not next(iter(hub._feeds.values())).live:
            assert time.monotonic() < deadline, "the subscriber never went live"
            await asyncio.sleep(0.02)
        # Live, then never read again: ~8 MB is far more than the socket buffers hold.
        for i in range(40):
            r = await http.post("/v1/streams/s/events", json={"type": "t", "data": [i, pad]})
            assert r.status_code == 201
        deadline = time.monotonic() + send_timeout * 1.25 + grace + 10
        while hub.subscriber_count:
            assert time.monotonic() < deadline, "the stuck client was never cut"
            await asyncio.sleep(0.05)
        slow = live.runtime.metrics.registry.get_sample_value(
            "runstream_slow_consumer_disconnects_total", {"transport": "sse"}
        )
        assert slow == 1
        # The connection is dropped, not left waiting to flush to a client that does not read.
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(reader.read(1 << 16), 10):
                pass
        writer.close()
