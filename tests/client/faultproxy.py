"""An asyncio TCP proxy that breaks connections in the ways real networks and servers do.

Each accepted connection gets one fault (or none) from :attr:`FaultProxy.plan`
— a callable returning a :class:`Fault` — and the proxy applies it to the
server-to-client direction (the client's request always reaches the server):

* ``reset``       — forward ``at`` bytes, then abort with a TCP RST (mid-event);
* ``truncate``    — forward ``at`` bytes, then a clean FIN (a cut-off chunk);
* ``stall_first`` — connect upstream, forward nothing back (stall before the first byte);
* ``stall``       — forward ``at`` bytes, then nothing more, connection left open;
* ``accept_close``— accept and close at once, before reading anything;
* ``garbage``     — after ``at`` bytes, at the next SSE (or WebSocket) frame boundary,
  inject junk frames (bad ids, bad JSON, binary, NUL) and keep forwarding;
* ``fragment``    — forward in tiny random pieces, then cut the connection
  after ``at`` bytes, mid-piece (truncated chunks).

Stalled connections stay open until the client gives up or the proxy closes.
:attr:`injected` counts the faults actually applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("reset", "truncate", "stall_first", "stall", "accept_close", "garbage", "fragment")
CHUNK = 65536

JUNK_FRAMES = (
    b"id: not-a-number\nevent: x\ndata: {}\n\n",
    b"id: zz:1x\ndata: {}\n\n",
    b"event: stdout\ndata: {not json\n\n",
    b"\xff\xfe\x00\x01garbage\x00line\n\n",
    b"data\n\n",
    b"retry: soon\n\n",
    b"id: a\x00b\ndata: {}\n\n",
    b": a comment in the middle\n\n",
)

WS_JUNK_MESSAGES = (
    (0x1, b"not json at all"),
    (0x1, b'{"id": "seven", "type": "tick", "data": 1}'),
    (0x1, b'{"type": "tick", "data": 1}'),
    (0x1, b"[1, 2, 3]"),
    (0x1, b'{"type": "ping", "time": "yesterday"}'),
    (0x1, b'{"id": 5, "type": 7}'),
    (0x2, b"\xff\xfe\x00\x01binary"),
)
"""(opcode, payload) of junk WebSocket messages: none of them is a usable event."""


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked (server-to-client) WebSocket frame of under 126 bytes."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


@dataclass(slots=True)
class Conn:
    """What happened to one connection (times are ``loop.time()``)."""

    fault: Fault
    request: bytes
    accepted: float
    last_forward: float = 0.0
    client_closed: float | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str | None = None
    at: int = 0
    """Server-to-client bytes forwarded before the fault applies."""


def random_plan(
    rng: random.Random,
    *,
    fault_rate: float = 0.7,
    kinds: tuple[str, ...] = KINDS,
    weights: tuple[float, ...] | None = None,
    max_at: int = 40_000,
) -> Callable[[bytes], Fault]:
    def plan(_request: bytes) -> Fault:
        if rng.random() >= fault_rate:
            return Fault()
        kind = rng.choices(kinds, weights=weights)[0]
        return Fault(kind, rng.randint(0, max_at))

    return plan


class FaultProxy:
    """Listens on loopback; connects each client to ``upstream`` through one planned fault."""

    def __init__(self, host: str, port: int, *, seed: int = 0) -> None:
        self.upstream = (host, port)
        self.rng = random.Random(seed)
        self.plan: Callable[[bytes], Fault] = lambda _request: Fault()
        self.injected: Counter[str] = Counter()
        self.connections = 0
        self.log: list[Conn] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.stall_started = asyncio.Event()
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults_injected(self) -> int:
        return sum(self.injected.values())

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked on every accept and client close."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        # Abort rather than cancel: every handler then ends on its own (a cancelled
        # start_server handler task makes asyncio log a spurious error).
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        loop = asyncio.get_running_loop()
        up_writer: asyncio.StreamWriter | None = None
        try:
            # The plan sees the request head, so a test can break only SSE requests.
            head = await reader.readuntil(b"\r\n\r\n")
            fault = self.plan(head)
            conn = Conn(fault, head, loop.time())
            self.log.append(conn)
            await self._notify()
            if fault.kind == "accept_close":
                self.injected["accept_close"] += 1
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_writer)
            up_writer.write(head)
            gone = asyncio.Event()
            pump_up = asyncio.create_task(self._pump(reader, up_writer, conn, gone))
            try:
                await self._down(up_reader, writer, conn, gone)
            finally:
                pump_up.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await pump_up
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    if not w.transport.is_closing():
                        w.close()
            self._tasks.discard(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: Conn, gone: asyncio.Event
    ) -> None:
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
        finally:
            conn.client_closed = asyncio.get_running_loop().time()
            gone.set()
            await self._notify()
        dst.close()

    async def _stall(self, gone: asyncio.Event) -> None:
        self.stall_started.set()
        await gone.wait()  # until the client drops us (or the proxy closes)

    async def _down(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: Conn, gone: asyncio.Event
    ) -> None:
        kind, at = conn.fault.kind, conn.fault.at
        loop = asyncio.get_running_loop()
        if kind == "stall_first":
            self.injected[kind] += 1
            await self._stall(gone)
            return
        if kind == "garbage":
            await self._garbage(src, dst, at)
            return
        sent = 0
        while True:
            data = await src.read(CHUNK)
            if not data:
                dst.close()
                return
            if kind in ("reset", "truncate", "stall", "fragment") and sent + len(data) > at:
                dst.write(data[: at - sent])
                await dst.drain()
                self.injected[kind] += 1
                if kind == "reset":
                    sock = dst.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    dst.transport.abort()
                    return
                if kind in ("truncate", "fragment"):
                    dst.close()
                    return
                if at > sent:
                    conn.last_forward = loop.time()
                await self._stall(gone)
                return
            if kind == "fragment":
                i = 0
                while i < len(data):
                    n = self.rng.randint(1, 7)
                    dst.write(data[i : i + n])
                    await dst.drain()
                    i += n
            else:
                dst.write(data)
                await dst.drain()
            conn.last_forward = loop.time()
            sent += len(data)

    async def _garbage(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, at: int) -> None:
        """Forward everything, injecting junk once as an extra HTTP chunk between two SSE frames.

        The server writes whole SSE frames per HTTP chunk, so a chunk boundary
        where the body so far ends with a blank line is a frame boundary: junk
        put there never merges with a real frame (a real network does not
        rewrite bytes; this is a server or intermediary emitting junk frames).
        Applies after ``at`` body bytes; the connection is cut ``2 * at + 2000``
        bytes later. Responses that are not chunked pass as they are.
        """
        head = await src.readuntil(b"\r\n\r\n")
        dst.write(head)
        if head.startswith(b"HTTP/1.1 101"):
            await self._garbage_ws(src, dst, at)
            return
        chunked = b"transfer-encoding: chunked" in head.lower()
        body = 0
        tail = b""
        while chunked:
            size_line = await src.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            payload = await src.readexactly(size + 2)
            dst.write(size_line + payload)
            await dst.drain()
            if size == 0:
                break
            body += size
            tail = (tail + payload[:-2])[-2:]
            if body >= at and tail == b"\n\n":
                junk = b"".join(self.rng.sample(JUNK_FRAMES, 3))
                dst.write(b"%x\r\n%s\r\n" % (len(junk), junk))
                self.injected["garbage"] += 1
                break
        # Then carry on healthy for a while and cut, so the stream keeps being exercised.
        budget = 2 * at + 2000
        while budget > 0 and (data := await src.read(min(CHUNK, budget))):
            dst.write(data)
            await dst.drain()
            budget -= len(data)
        dst.close()

    async def _garbage_ws(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, at: int
    ) -> None:
        """WebSocket version of :meth:`_garbage`: junk messages between two server frames."""
        body = 0
        while body < at:
            head = await src.readexactly(2)
            size = head[1] & 0x7F
            ext = b""
            if size == 126:
                ext = await src.readexactly(2)
                size = int.from_bytes(ext, "big")
            elif size == 127:
                ext = await src.readexactly(8)
                size = int.from_bytes(ext, "big")
            payload = await src.readexactly(size)
            dst.write(head + ext + payload)
            await dst.drain()
            body += 2 + len(ext) + size
        junk = self.rng.sample(WS_JUNK_MESSAGES, 3)
        dst.write(b"".join(ws_frame(op, payload) for op, payload in junk))
        self.injected["garbage"] += 1
        budget = 2 * at + 2000
        while budget > 0 and (data := await src.read(min(CHUNK, budget))):
            dst.write(data)
            await dst.drain()
            budget -= len(data)
        dst.close()
