"""Slow consumers and shutdown over real sockets; ``runstream serve`` as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from runstream.protocol.sse import SSEDecoder
from tests.server.live import StartServer, make_settings, open_sse, publish


async def _raw_sse_client(
    port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a tiny receive window that sends the request and then does not read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    # The stream reader reads ahead up to twice its limit: keep it small so it stops.
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 14)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def test_slow_sse_consumer_is_cut_and_resumes_exactly(start_server: StartServer) -> None:
    live = await start_server(make_settings(limit_subscriber_buffer=20, shutdown_grace=0.5))
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        await publish(http, "slow", 1)
        reader, writer = await _raw_sse_client(live.port, "/v1/streams/slow/events")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"200 OK" in head
        # Write more than the socket buffers hold (several MB on loopback) while the
        # client does not read, until the server gives up on it.
        registry = live.runtime.metrics.registry
        big = "x" * 50_000
        sent = 0
        while not registry.get_sample_value(
            "runstream_slow_consumer_disconnects_total", {"transport": "sse"}
        ):
            assert sent < 20_000, "a client that does not read was never cut"
            body = [{"type": "t", "data": {"i": sent + i, "pad": big}} for i in range(4)]
            r = await http.post("/v1/streams/slow/events", json=body)
            assert r.status_code == 201
            sent += 4
            await asyncio.sleep(0.002)  # let the fan-out and the writer run
        # The server gives up on this client; now read what it did get, up to EOF.
        raw = await asyncio.wait_for(reader.read(), timeout=20)
        writer.close()
        await writer.wait_closed()
        decoder = SSEDecoder()
        got = [m for m in decoder.feed(_dechunk(raw)) if m.event == "t"]
        assert 0 < len(got) < sent
        metrics = (await http.get("/metrics")).text
        assert 'runstream_slow_consumer_disconnects_total{transport="sse"} 1.0' in metrics
        # It resumes from the last id it received: nothing lost, nothing twice.
        await http.post("/v1/streams/slow/close")
        async with open_sse(http, "/v1/streams/slow/events", {"Last-Event-ID": got[-1].id}) as sse:
            rest = [m for m in await sse.rest() if m.event == "t"]
        ids = [json.loads(m.data)["i"] for m in got + rest]
        assert ids == list(range(sent))


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (possibly cut short), headers already read."""
    body = raw
    out = bytearray()
    while body:
        size_line, sep, body = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


async def test_shutdown_ends_open_sse_ws_and_long_poll_promptly(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(keepalive=60, shutdown_grace=1.0))
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        await publish(http, "s", 1)
        poll = asyncio.ensure_future(
            http.get("/v1/streams/s/events", params={"after": 1, "wait": 25})
        )
        async with (
            open_sse(http, "/v1/streams/s/events") as sse,
            connect(f"{live.ws_url}/v1/streams/s/ws") as ws,
        ):
            assert len(await sse.take(1)) == 1
            assert json.loads(await ws.recv())["id"] == 1
            took = await live.stop()
            assert await sse.rest() == [] and sse.eof
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        r = await poll
    assert took < 5, f"shutdown took {took:.1f} s with keepalive 60 s"
    assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1012)
    assert r.status_code == 200 and r.json()["events"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_runstream_serve_exits_promptly_on_sigterm_with_open_streams() -> None:
    port = _free_port()
    env = {**os.environ, "RUNSTREAM_KEEPALIVE": "60", "RUNSTREAM_LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runstream.cli.main",
        "serve",
        "--backend",
        "memory://",
        "--port",
        str(port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:  # polling a child's readiness; no event to await
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.returncode is None, "server exited during start-up"
                assert time.monotonic() < deadline, "server did not start"
                await asyncio.sleep(0.05)
            assert (await http.get("/openapi.json")).status_code == 200
            assert "runstream_open_connections" in (await http.get("/metrics")).text
            await publish(http, "s", 1)
            async with (
                open_sse(http, "/v1/streams/s/events") as sse,
                connect(f"ws://127.0.0.1:{port}/v1/streams/s/ws") as ws,
            ):
                await sse.take(1)
                await ws.recv()
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert await sse.rest() == []
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                code = await asyncio.wait_for(proc.wait(), 30)
                took = time.monotonic() - start
    finally:
        if proc.returncode is None:
            proc.kill()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert took < 5, f"exit took {took:.1f} s with keepalive 60 s"


def test_serve_refuses_a_public_bind_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "runstream.cli.main",
            "serve",
            "--backend",
            "memory://",
            "--host",
            "0.0.0.0",
            "--port",
            str(_free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "refusing to listen on '0.0.0.0' without an access token" in out.stderr


def test_a_serving_process_settles_its_heap_once_started() -> None:
    # In a child: freezing changes the collector for the whole process.
    code = """
import asyncio, gc
from runstream.config import load_settings
from runstream.server.app import create_app
from runstream.server.serve import GC_THRESHOLDS, Server, make_server

class Probe(Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        print(self.settle_heap, gc.get_freeze_count() > 0, gc.get_threshold() == GC_THRESHOLDS)
        self.should_exit = True

settings = load_settings(env={}, backend="memory://", port=0)
for settle in (False, True):
    app = create_app(settings)
    asyncio.run(make_server(app, settings, server_class=Probe, settle=settle).serve())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.splitlines() == ["False False False", "True True True"], out.stderr
