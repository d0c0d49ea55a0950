"""The sync Client: from a plain thread, inside a running event loop, with sync handlers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from runstream.client._sync import Client
from runstream.client.handlers import Context
from runstream.core.model import Event
from runstream.errors import StreamNotFound, UsageError
from runstream.server.serve import Server

from .conftest import LiveServer, start_server, stop_server
from .rawserver import RawServer, http_response


@pytest.fixture
def server_url() -> Iterator[str]:
    """A real server on its own loop in its own thread (the test's loop may be blocked)."""
    loop = asyncio.new_event_loop()
    ready: list[tuple[LiveServer, asyncio.Task[None], tuple[Server, socket.socket]]] = []
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        ready.append(loop.run_until_complete(start_server()))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(20)
    server, task, handle = ready[0]
    try:
        yield server.url
    finally:
        asyncio.run_coroutine_threadsafe(stop_server(task, handle), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def publish_and_follow(url: str, stream: str) -> list[int]:
    with Client(url) as client:
        client.publish_many(stream, [("tick", {"n": i}) for i in range(5)])
        client.close_stream(stream, status="succeeded")
        with pytest.raises(StreamNotFound):
            client.info("missing")
        with client.follow(stream) as events:
            return [e.id for e in events if isinstance(e, Event)]


def test_sync_client_works_from_a_plain_thread(server_url: str) -> None:
    result: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            result.extend(publish_and_follow(server_url, "t1"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert not errors and result == [1, 2, 3, 4, 5, 6]


async def test_sync_client_works_inside_a_running_event_loop(server_url: str) -> None:
    assert asyncio.get_running_loop().is_running()
    assert publish_and_follow(server_url, "t2") == [1, 2, 3, 4, 5, 6]


def test_sync_run_forever_with_sync_handlers_stops_on_a_threading_event(server_url: str) -> None:
    stop = threading.Event()
    seen: list[int] = []
    stopped_at: list[float] = []
    with Client(server_url) as client:
        client.publish_many("t3", [("tick", i) for i in range(3)])

        @client.on("tick")
        def on_tick(ev: Event, ctx: Context) -> None:
            seen.append(ev.id)
            if len(seen) == 3:
                stopped_at.append(time.monotonic())
                stop.set()

        assert client.run_forever("t3", stop_event=stop) is None  # stopped, not ended
        assert time.monotonic() - stopped_at[0] < 1.0
    assert sorted(seen) == [1, 2, 3]


def test_closing_a_sync_follower_early_and_then_the_client(server_url: str) -> None:
    client = Client(server_url)
    client.publish("t4", "tick", 1)
    events = client.follow("t4")
    first = next(events)
    assert isinstance(first, Event) and first.id == 1
    events.close()
    assert list(events) == []
    client.close()
    client.close()  # idempotent


def test_sync_token_refresh_is_a_plain_function() -> None:
    async def scenario() -> list[bytes]:
        def respond(head: bytes, i: int) -> bytes:
            if b"Bearer fresh" not in head:
                return http_response(401, b'{"error": {"code": "unauthorized", "message": "x"}}')
            return http_response(
                200,
                b'{"stream": "s", "epoch": "e", "status": "open", '
                b'"first_id": 1, "last_id": 0, "created_at": null}',
            )

        async with RawServer(respond) as srv:

            def use() -> None:
                with Client(srv.url, token="old", token_refresh=lambda: "fresh") as client:
                    assert client.info("s").epoch == "e"

            await asyncio.to_thread(use)
            return srv.requests

    requests = asyncio.run(scenario())
    assert len(requests) == 2 and b"Bearer fresh" in requests[1]


def test_the_sync_publisher_batches_from_several_threads(server_url: str) -> None:
    with Client(server_url) as client:
        with client.publisher("sync", linger=0.005, max_events=50) as pub:

            def produce(k: int) -> None:
                for i in range(200):
                    pub.publish("line", {"k": k, "i": i})

            threads = [threading.Thread(target=produce, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        page = client.read("sync", limit=1000)
        assert pub.batches < 600 // 10
        with pytest.raises(UsageError):
            pub.publish("line", "late")
    got = [e.data for e in page.events]
    assert len(got) == 600
    for k in range(3):  # each thread's events in its order
        assert [d["i"] for d in got if d["k"] == k] == list(range(200))
