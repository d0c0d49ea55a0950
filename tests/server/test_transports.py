"""Transport details every client relies on: WebSocket heartbeats and pings, SSE server time."""

from __future__ import annotations

import json
import time

import httpx
from websockets.asyncio.client import connect

from runstream.core.model import HEARTBEAT_TYPE
from runstream.server.app import create_app
from runstream.server.serve import make_server

from .conftest import StartServer
from .live import make_settings, open_sse


async def test_an_idle_websocket_gets_a_heartbeat_at_the_keepalive_interval(
    start_server: StartServer,
) -> None:
    live = await start_server(make_settings(keepalive=0.2))
    async with httpx.AsyncClient(base_url=live.url) as http:
        await http.post("/v1/streams/quiet/events", json={"type": "hello", "data": 1})
    async with connect(f"{live.ws_url}/v1/streams/quiet/ws", ping_interval=None) as ws:
        first = json.loads(await ws.recv())
        assert first["id"] == 1 and first["type"] == "hello"
        started = time.monotonic()
        beats = [json.loads(await ws.recv()) for _ in range(3)]
        took = time.monotonic() - started
    for beat in beats:
        # No id: nothing a client could take for an event (and the type is reserved).
        assert set(beat) == {"type", "time"} and beat["type"] == HEARTBEAT_TYPE
        assert beat["time"].endswith("Z")
    assert 0.5 <= took < 2.0, took


async def test_protocol_pings_are_on_for_websockets() -> None:
    # uvicorn sends WebSocket pings (and drops peers that never answer) unless told not to.
    settings = make_settings()
    config = make_server(create_app(settings), settings).config
    assert config.ws_ping_interval is not None and config.ws_ping_interval > 0
    assert config.ws_ping_timeout is not None and config.ws_ping_timeout > 0


async def test_sse_events_carry_the_server_time_of_the_json_read(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/v1/streams/t/events", json=[{"type": "a"}, {"type": "b", "data": 2}])
    await client.post("/v1/streams/t/close")
    page = await client.get("/v1/streams/t/events", headers={"Accept": "application/json"})
    times = [e["time"] for e in page.json()["events"]]
    async with open_sse(client, "/v1/streams/t/events") as sse:
        messages = await sse.rest()
    assert [m.time for m in messages] == times and len(times) == 3
