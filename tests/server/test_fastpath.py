"""The hot route and the routed handlers it shadows answer alike, and it works under a mount."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from runstream.server import fastpath
from runstream.server.app import create_app
from runstream.server.metrics import Metrics
from tests.server.live import make_settings


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the fast route served (a spy on its endpoint)."""
    calls: list[str] = []
    real = fastpath._EventsEndpoint.__call__

    async def spy(self: Any, scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await real(self, scope, receive, send)

    monkeypatch.setattr(fastpath._EventsEndpoint, "__call__", spy)
    return calls


@pytest.fixture
async def apps() -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """The same app twice, with and without the fast route, each on its own backend."""
    clients = []
    stack = []
    for fast in (True, False):
        settings = make_settings(backend="memory://", keepalive=0.2)
        app = create_app(settings, fast_path=fast)
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        stack.append(ctx)
        transport = httpx.ASGITransport(app=app)
        clients.append(httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1"))
    try:
        yield clients[0], clients[1]
    finally:
        for client in clients:
            await client.aclose()
        for ctx in stack:
            await ctx.__aexit__(None, None, None)


def shape(resp: httpx.Response) -> tuple[int, Any]:
    """Status and body, with the server-made parts (epochs, times) taken out."""
    if not resp.content:
        return resp.status_code, None
    body = resp.json()
    if "error" in body:
        return resp.status_code, body["error"]["code"]
    body.pop("epoch", None)
    for event in body.get("events", ()):
        event.pop("time")
    return resp.status_code, body


JSON = "application/json"
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/streams/s/events", {"json": {"type": "a", "data": 1}}),
    ("POST", "/v1/streams/s/events", {"json": [{"type": "b"}, {"type": "c", "data": [1]}]}),
    ("POST", "/v1/streams/s/events", {"json": {"type": "end"}}),
    ("POST", "/v1/streams/s/events", {"json": []}),
    (
        "POST",
        "/v1/streams/s/events",
        {"content": b"{", "headers": {"content-type": "application/json"}},
    ),
    ("POST", "/v1/streams/bad name/events", {"json": {"type": "a"}}),
    (
        "POST",
        "/v1/streams/s/events",
        {"json": {"type": "p"}, "headers": {"Producer-Id": "p1", "Producer-Seq": "x"}},
    ),
    ("GET", "/v1/streams/s/events", {}),
    ("GET", "/v1/streams/s/events", {"params": {"after": "1", "limit": "1"}}),
    ("GET", "/v1/streams/s/events", {"params": {"limit": "0"}}),
    ("GET", "/v1/streams/s/events", {"params": {"limit": "many"}}),
    ("GET", "/v1/streams/s/events", {"params": {"wait": "-1"}}),
    ("GET", "/v1/streams/s/events", {"params": {"after": "bogus"}}),
    ("GET", "/v1/streams/missing/events", {}),
    ("PUT", "/v1/streams/s/events", {"json": {"type": "a"}}),
]


async def test_fast_and_routed_handlers_answer_alike(
    apps: tuple[httpx.AsyncClient, httpx.AsyncClient], fast_calls: list[str]
) -> None:
    fast, routed = apps
    for method, path, kwargs in REQUESTS:
        served_fast = len(fast_calls)
        a = await fast.request(method, path, **kwargs)
        if method in ("GET", "POST") and " " not in path:
            assert len(fast_calls) == served_fast + 1, "the fast route did not serve it"
        served_fast = len(fast_calls)
        b = await routed.request(method, path, **kwargs)
        assert len(fast_calls) == served_fast, "the routed app has no fast route"
        assert shape(a) == shape(b), (method, path, kwargs, a.text, b.text)


async def test_sse_reads_are_alike(apps: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    bodies = []
    for client in apps:
        await client.post("/v1/streams/t/events", json=[{"type": "x", "data": i} for i in range(3)])
        await client.post("/v1/streams/t/close", json={"status": "done"})
        resp = await client.get("/v1/streams/t/events", headers={"Accept": "text/event-stream"})
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [
            line
            for line in resp.text.splitlines()
            if line.startswith(("event:", "data:", "retry:"))
        ]
        bodies.append(lines)
    assert bodies[0] == bodies[1]
    assert bodies[0][-1] == "data: " + json.dumps({"status": "done", "reason": None}).replace(
        " ", ""
    )


async def test_the_fast_route_serves_the_app_under_a_mount(fast_calls: list[str]) -> None:
    settings = make_settings(backend="memory://")
    inner = create_app(settings)
    outer = FastAPI()
    outer.mount("/api", inner)
    async with inner.router.lifespan_context(inner):
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            resp = await client.post("/api/v1/streams/m/events", json={"type": "a"})
            assert resp.status_code == 201
            page = await client.get("/api/v1/streams/m/events")
            assert [e["type"] for e in page.json()["events"]] == ["a"]
    assert len(fast_calls) == 2
    metrics: Metrics = inner.state.runtime.metrics
    assert b'route="/v1/streams/{stream}/events"' in metrics.render()
