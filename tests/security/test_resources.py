"""Issue 13, rows 5-7: bounded resources per client, over real sockets on loopback.

Each test reproduces a row of the issue's table and asserts on bounded,
deterministic quantities (bytes a backend read returned, subscriptions still
held, whether and when the server closed a connection), not on RSS.

Settings reach the servers through ``RUNSTREAM_*`` variables (``load_settings``),
as an operator would set them; a server that does not know a setting ignores
the variable, so these tests also run (and fail for what they test) against
a server without these limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from runstream.backends.memory.log import MemoryEventLog
from runstream.config import Settings, load_settings
from runstream.core.model import NewEvent
from runstream.protocol.sse import SSEDecoder
from runstream.server.app import create_app
from tests.conftest import free_port
from tests.server.live import LiveServer, serve_in_task

MB = 1_000_000
EVENT_BYTES = MB  # data of each event, about max_event_bytes
PAGE_BYTES = 2 * 1024 * 1024


def settings_from_env(**values: Any) -> Settings:
    """Settings as ``runstream serve`` reads them, from ``RUNSTREAM_<NAME>`` variables."""
    env = {"RUNSTREAM_LOG_LEVEL": "warning", "RUNSTREAM_KEEPALIVE": "60"}
    env.update({f"RUNSTREAM_{k.upper()}": str(v) for k, v in values.items()})
    return load_settings(env=env)


class RecordingLog(MemoryEventLog):
    """The memory backend, recording the bytes (type + data JSON) each read returned."""

    def __init__(self) -> None:
        super().__init__()
        self.read_bytes: list[int] = []

    async def _read(self, stream: str, after: int, limit: int, *rest: Any) -> Any:
        info, events = await super()._read(stream, after, limit, *rest)
        if events:
            self.read_bytes.append(sum(len(e.type) + len(e.data_json or "") for e in events))
        return info, events


@contextlib.asynccontextmanager
async def big_stream_server(
    n_events: int, backend: MemoryEventLog | None = None, *, close: bool = True, **limits: Any
) -> AsyncIterator[tuple[LiveServer, MemoryEventLog]]:
    """A live server whose stream ``big`` holds ``n_events`` events of ~1 MB (then its end)."""
    backend = backend or MemoryEventLog()
    settings = settings_from_env(**limits)
    live = await serve_in_task(create_app(settings, backend=backend), settings)
    try:
        for i in range(n_events):
            await backend.append("big", NewEvent("blob", {"i": i, "pad": "x" * EVENT_BYTES}))
        if close:
            await backend.close("big", "done")
        yield live, backend
    finally:
        await live.stop()


async def stuck_sse_client(
    port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Requests an event stream with a small receive window, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 14)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def wait_until(predicate: Any, within: float, what: str) -> None:
    """Poll ``predicate`` (a server's state seen from outside) until true or fail."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# -- row 5 --------------------------------------------------------------------------


async def test_row5_readers_stuck_in_sse_catch_up_hold_one_page_and_are_cut() -> None:
    """5 clients request SSE of a stream of 1 MB events and never read.

    Before: one catch-up read loaded the whole stream (one page of 2000 events)
    per reader, and a reader stuck in catch-up was never cut (~930 MB held).
    """
    backend = RecordingLog()
    send_timeout, grace = 1.0, 0.5
    async with big_stream_server(
        40,
        backend,
        close=False,  # still being written: the readers are cut for not reading, not for the end
        max_page_bytes=PAGE_BYTES,
        send_timeout=send_timeout,
        shutdown_grace=grace,
    ) as (live, _):
        runtime = live.runtime
        clients = [await stuck_sse_client(live.port, "/v1/streams/big/events") for _ in range(5)]
        try:
            # Every read the server made for them stayed within the page budget.
            await wait_until(lambda: len(backend.read_bytes) >= 5, 10, "catch-up never read")
            # Each stuck reader is cut like a slow live consumer...
            await wait_until(
                lambda: runtime.hub.subscriber_count == 0,
                send_timeout + grace + 15,
                f"stuck readers still subscribed: {runtime.hub.subscriber_count}",
            )
            metrics = runtime.metrics.registry
            slow = metrics.get_sample_value(
                "runstream_slow_consumer_disconnects_total", {"transport": "sse"}
            )
            assert slow == 5
            # ...and its connection is dropped (not left waiting to flush to it).
            for reader, _ in clients:
                with contextlib.suppress(ConnectionError):
                    while await asyncio.wait_for(reader.read(1 << 16), 10):
                        pass
        finally:
            for _, writer in clients:
                writer.close()
        assert backend.read_bytes and max(backend.read_bytes) <= PAGE_BYTES, backend.read_bytes[:5]

        # A reader that does read gets every event, in order, page after page.
        async with (
            httpx.AsyncClient(base_url=live.url, timeout=30) as http,
            http.stream(
                "GET", "/v1/streams/big/events", headers={"Accept": "text/event-stream"}
            ) as response,
        ):
            decoder = SSEDecoder()
            ids: list[int] = []
            async for chunk in response.aiter_bytes():
                ids += [json.loads(m.data)["i"] for m in decoder.feed(chunk) if m.event == "blob"]
                if len(ids) >= 40:
                    break
        assert ids == list(range(40))


async def test_row5_websocket_reader_stuck_in_catch_up_is_cut() -> None:
    backend = RecordingLog()
    async with big_stream_server(
        30, backend, close=False, max_page_bytes=PAGE_BYTES, send_timeout=1.0, shutdown_grace=0.5
    ) as (live, _):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", live.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 14)
        writer.write(
            b"GET /v1/streams/big/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        try:
            assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
            runtime = live.runtime
            await wait_until(
                lambda: runtime.hub.subscriber_count == 0, 20, "stuck WebSocket reader not cut"
            )
            slow = runtime.metrics.registry.get_sample_value(
                "runstream_slow_consumer_disconnects_total", {"transport": "ws"}
            )
            assert slow == 1
        finally:
            writer.close()
        assert max(backend.read_bytes) <= PAGE_BYTES


# -- row 6 --------------------------------------------------------------------------


@pytest.mark.parametrize("page_bytes", [None, PAGE_BYTES, 1])
async def test_row6_json_page_of_large_events_is_bounded_in_bytes(page_bytes: int | None) -> None:
    """``GET .../events?limit=200`` on a stream of 1 MB events: before, one 200 MB body."""
    backend = RecordingLog()
    limits = {} if page_bytes is None else {"max_page_bytes": page_bytes}
    budget = page_bytes or 4 * 1024 * 1024  # the documented default
    async with (
        big_stream_server(20, backend, **limits) as (live, _),
        httpx.AsyncClient(base_url=live.url, timeout=30) as http,
    ):
        after, seen, sizes = 0, [], []
        while True:
            r = await http.get("/v1/streams/big/events", params={"after": after, "limit": 200})
            assert r.status_code == 200
            page = r.json()
            if not page["events"]:
                break
            sizes.append(len(r.content))
            assert page["next_after"] == page["events"][-1]["id"]  # exact: no gap, no repeat
            seen += [e["id"] for e in page["events"]]
            after = page["next_after"]
        assert seen == list(range(1, 22))  # 20 events and the end entry
        # One event more than the budget would be over it; one event alone is always served.
        assert max(sizes) <= max(budget, EVENT_BYTES) + 64 * 1024, sizes
        if page_bytes == 1:
            assert len(sizes) == 21
    assert max(backend.read_bytes) <= max(budget, EVENT_BYTES + 100)


# -- row 7 --------------------------------------------------------------------------


PARTIAL_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@contextlib.asynccontextmanager
async def serve_process(
    nofile: int, env: Mapping[str, str]
) -> AsyncIterator[tuple[str, list[str]]]:
    """``runstream serve`` (memory://) under ``ulimit -n nofile``: its URL and its log lines.

    The lines are complete once the context exits (the server is stopped then).
    """
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
    full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        f'ulimit -n {nofile} && exec "$@"',
        "sh",
        sys.executable,
        "-m",
        "runstream.cli.main",
        "serve",
        "--backend",
        "memory://",
        "--port",
        str(port),
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []

    async def collect() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line.decode(errors="replace").rstrip())

    collector = asyncio.create_task(collect())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            deadline = time.monotonic() + 30
            while True:  # a child's readiness: nothing to await but its answer
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                assert proc.returncode is None, "\n".join(lines)
                assert time.monotonic() < deadline, "server did not start"
                await asyncio.sleep(0.05)
        yield url, lines
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        await asyncio.wait_for(collector, 10)


async def open_partial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PARTIAL_REQUEST)
    await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Reads until the server closes the connection (EOF or reset)."""
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass
    return True


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_row7_flood_of_incomplete_requests_is_timed_out_and_healthz_answers(
    tmp_path: Path,
) -> None:
    """Idle sockets with an incomplete request, more than the server has file descriptors.

    Before: never timed out, ``/healthz`` stopped answering (accept() failed
    with EMFILE, logged with a traceback every time).
    """
    nofile, flood, header_timeout = 256, 600, 3.0
    env = {"RUNSTREAM_HEADER_TIMEOUT": str(header_timeout), "RUNSTREAM_LOG_LEVEL": "info"}
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with serve_process(nofile, env) as (url, log_lines):
        port = int(url.rsplit(":", 1)[1])
        try:
            opened_at = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(open_partial(port) for _ in range(flood)), return_exceptions=True),
                30,
            )
            conns = [c for c in results if not isinstance(c, BaseException)]
            failed = [r for r in results if isinstance(r, BaseException)]
            assert len(conns) >= flood * 0.9, failed[:3]
            # A client that sends its request at once is served during the flood.
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                start = time.monotonic()
                r = await http.get("/healthz")
                took = time.monotonic() - start
            assert r.status_code == 200 and took < 2, took
            # Every incomplete request is closed by the server, within the header timeout.
            await asyncio.wait_for(
                asyncio.gather(*(closed_by_server(reader) for reader, _ in conns)),
                header_timeout + 10,
            )
            assert time.monotonic() - opened_at < header_timeout + 10
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                assert (await http.get("/healthz")).status_code == 200
        finally:
            for _, writer in conns:
                writer.close()
    assert len(log_lines) < 40, "\n".join(log_lines[:60])
    assert "Traceback" not in "\n".join(log_lines)
