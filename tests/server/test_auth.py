"""Bearer tokens with read/write scopes, over HTTP, SSE (``?token=``) and WebSocket."""

from __future__ import annotations

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from runstream.config import Token
from tests.server.live import LiveServer, StartServer, make_settings, open_sse

WRITER = "w-secret-123"
READER = "r-secret-123"


@pytest.fixture
async def secured(start_server: StartServer) -> LiveServer:
    tokens = (
        Token(WRITER, frozenset({"read", "write"})),
        Token(READER, frozenset({"read"})),
    )
    return await start_server(make_settings(tokens=tokens))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_requests_without_a_token_are_401(secured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        r = await http.post("/v1/streams/a/events", json={"type": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await http.get("/v1/streams/a/events", headers=bearer("wrong-token"))
        assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
        # Liveness, readiness and metrics stay open for probes and scrapers.
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200


async def test_read_scope_cannot_write(secured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        r = await http.post("/v1/streams/a/events", json={"type": "x"}, headers=bearer(READER))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert (await http.delete("/v1/streams/a", headers=bearer(READER))).status_code == 403
        r = await http.post("/v1/streams/a/events", json={"type": "x"}, headers=bearer(WRITER))
        assert r.status_code == 201
        r = await http.get("/v1/streams/a/events", headers=bearer(READER))
        assert r.status_code == 200 and len(r.json()["events"]) == 1


async def test_sse_accepts_the_token_in_the_query(secured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        await http.post("/v1/streams/q/events", json={"type": "x"}, headers=bearer(WRITER))
        await http.post("/v1/streams/q/close", headers=bearer(WRITER))
        async with open_sse(http, "/v1/streams/q/events", token=READER) as sse:
            assert sse.response.status_code == 200
            assert [m.event for m in await sse.rest()] == ["x", "end"]
        r = await http.get("/v1/streams/q/events", headers={"Accept": "text/event-stream"})
        assert r.status_code == 401


async def test_websocket_needs_a_token(secured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        await http.post("/v1/streams/ws/events", json={"type": "x"}, headers=bearer(WRITER))
    with pytest.raises(InvalidStatus) as denied:
        async with connect(f"{secured.ws_url}/v1/streams/ws/ws"):
            pass
    assert denied.value.response.status_code == 401
    async with connect(f"{secured.ws_url}/v1/streams/ws/ws?token={READER}") as ws:
        assert '"type":"x"' in str(await ws.recv())
