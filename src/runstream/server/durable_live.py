"""Durable Streams reads: catch-up, long-poll and SSE on a :class:`DurableStore`.

Live reads wait on the store's :class:`~runstream.backends.base.Notifier`, armed
*before* each read (the same gap-free pattern as ``EventLog.follow``): a write
at any moment is seen by the next read. The store wakes it after its own writes
and, on shared engines, from the engine's notification path (the SQLite commit
probe, the Redis pub/sub connection), never by per-client polling.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Final, Literal

from starlette.responses import Response, StreamingResponse

from runstream.backends.durable import DsRead, DsReader
from runstream.core.durable import DsError, is_json, is_text, next_cursor
from runstream.protocol.durable import (
    SSE_KEEPALIVE,
    ReadFrom,
    etag,
    format_offset,
    render_body,
    sse_control,
    sse_data,
)
from runstream.server.runtime import Runtime

CACHEABLE: Final = "private, max-age=60, stale-while-revalidate=300"
"""Catch-up pages short of the tail never change: caches may keep them (per user)."""


def _cursor(client: str | None) -> str:
    return next_cursor(time.time(), client, 1 + secrets.randbelow(3600))


def _read_headers(read: DsRead) -> dict[str, str]:
    state = read.state
    headers = {
        "content-type": state.content_type,
        "stream-next-offset": format_offset(read.end),
    }
    if read.up_to_date:
        headers["stream-up-to-date"] = "true"
        if state.closed:
            headers["stream-closed"] = "true"
    return headers


async def catch_up(
    store: DsReader, name: str, start: ReadFrom | None, if_none_match: str | None
) -> Response:
    now = time.time()
    if start is not None and start.now:
        read = await store.read(name, None, now)
        headers = _read_headers(read)
        headers["cache-control"] = "no-store"
        return Response(b"[]" if read.state.json else b"", headers=headers)
    read = await store.read(name, 0 if start is None else start.position, now)
    headers = _read_headers(read)
    tag = etag(read.state.uid, read.start, read.end, read.state.closed and read.up_to_date)
    headers["etag"] = tag
    headers["cache-control"] = "no-store" if read.up_to_date else CACHEABLE
    if if_none_match is not None and tag in [t.strip() for t in if_none_match.split(",")]:
        del headers["content-type"]
        return Response(status_code=304, headers=headers)
    return Response(render_body(read.entries, read.state.json), headers=headers)


async def _wait(fut: asyncio.Future[None], stop: asyncio.Event, seconds: float) -> None:
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((fut, stopper), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()


async def long_poll(
    store: DsReader, runtime: Runtime, name: str, start: ReadFrom, cursor: str | None
) -> Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + runtime.settings.server.ds_long_poll
    position: int | None = None if start.now else start.position
    notifier = store.notifier
    while True:
        fut = notifier.watch(name)
        try:
            read = await store.read(name, position, time.time())
            position = read.start
            headers = _read_headers(read)
            headers["stream-cursor"] = _cursor(cursor)
            if read.entries:
                headers["etag"] = etag(read.state.uid, read.start, read.end, False)
                headers["cache-control"] = CACHEABLE if not read.up_to_date else "no-store"
                return Response(render_body(read.entries, read.state.json), headers=headers)
            remaining = deadline - loop.time()
            if read.state.closed or remaining <= 0 or runtime.shutting_down.is_set():
                del headers["content-type"]
                headers["cache-control"] = "no-store"
                return Response(status_code=204, headers=headers)
            await _wait(fut, runtime.shutting_down, remaining)
        finally:
            notifier.unwatch(name, fut)


Mode = Literal["json", "text", "base64"]


async def sse(
    store: DsReader, runtime: Runtime, name: str, start: ReadFrom, cursor: str | None
) -> Response:
    # The first read answers 404/410/400 as a status, before the stream starts.
    first = await store.read(name, None if start.now else start.position, time.time())
    content_type = first.state.content_type
    mode: Mode = "json" if is_json(content_type) else "text" if is_text(content_type) else "base64"
    headers = {
        "content-type": "text/event-stream",
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
    }
    if mode == "base64":
        headers["stream-sse-data-encoding"] = "base64"
    return StreamingResponse(_events(store, runtime, name, first, mode, cursor), headers=headers)


async def _events(
    store: DsReader,
    runtime: Runtime,
    name: str,
    first: DsRead,
    mode: Mode,
    cursor: str | None,
) -> AsyncIterator[bytes]:
    settings = runtime.settings.server
    loop = asyncio.get_running_loop()
    ends = loop.time() + settings.ds_sse_max
    stop = runtime.shutting_down
    notifier = store.notifier
    read: DsRead | None = first
    position = first.start
    announced = False
    while not stop.is_set():
        fut = notifier.watch(name)
        try:
            if read is None:
                try:
                    read = await store.read(name, position, time.time())
                except DsError:  # deleted or expired while followed: the stream ends
                    return
            state = read.state
            done = state.closed and read.up_to_date
            if read.entries:
                position = read.end
                cursor = _cursor(cursor)
                yield sse_data(read.entries, mode) + sse_control(
                    format_offset(position), cursor, up_to_date=read.up_to_date, closed=done
                )
                announced = read.up_to_date
                if done:
                    return
                read = None
                continue
            if done:
                yield sse_control(format_offset(position), None, up_to_date=True, closed=True)
                return
            if not announced:
                cursor = _cursor(cursor)
                yield sse_control(format_offset(position), cursor, up_to_date=True, closed=False)
                announced = True
            read = None
            remaining = ends - loop.time()
            if remaining <= 0:
                return
            await _wait(fut, stop, min(remaining, settings.keepalive))
            if not fut.done() and not stop.is_set() and loop.time() < ends:
                yield SSE_KEEPALIVE
        finally:
            notifier.unwatch(name, fut)
