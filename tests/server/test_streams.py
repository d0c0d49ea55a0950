"""Input validation and limits of the streams API: 400, 413, 429 with clear JSON messages."""

from __future__ import annotations

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.server.live import StartServer, make_settings, open_sse


@pytest.fixture
async def http(start_server: StartServer) -> httpx.AsyncClient:
    live = await start_server(
        make_settings(
            limit_max_body_bytes=10_000,
            limit_max_batch=5,
            limit_max_event_bytes=1000,
            limit_max_subscribers_per_stream=2,
            limit_max_subscribers=3,
        )
    )
    client = httpx.AsyncClient(base_url=live.url, timeout=30)
    client.live = live  # type: ignore[attr-defined]
    return client


@pytest.mark.parametrize("name", ["-dash", "has space", "a" * 201, "semi;colon", "é"])
async def test_invalid_stream_names_are_400(http: httpx.AsyncClient, name: str) -> None:
    async with http:
        r = await http.post(f"/v1/streams/{name}/events", json={"type": "x"})
        assert r.status_code == 400, r.text
        assert "invalid stream name" in r.json()["error"]["message"]
        assert (await http.get(f"/v1/streams/{name}")).status_code == 400


async def test_valid_names_with_dots_colons_and_dashes(http: httpx.AsyncClient) -> None:
    async with http:
        name = "run:2024-01.x_y"
        r = await http.post(f"/v1/streams/{name}/events", json={"type": "x"})
        assert r.status_code == 201 and r.json()["stream"] == name


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "at least one event"),
        (b'{"data": 1}', "missing 'type'"),
        (b'{"type": "end"}', "reserved"),
        (b'{"type": "ping"}', "reserved"),
        (b'{"type": "x", "extra": 1}', "unknown event fields"),
        (b'"just a string"', "each event must be an object"),
        (b'{"type": ""}', "1-100 characters"),
    ],
)
async def test_bad_append_bodies_are_400(
    http: httpx.AsyncClient, body: bytes, message: str
) -> None:
    async with http:
        r = await http.post(
            "/v1/streams/s/events", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]


async def test_size_limits_are_413(http: httpx.AsyncClient) -> None:
    async with http:
        r = await http.post("/v1/streams/s/events", json=[{"type": "x"}] * 6)
        assert r.status_code == 413 and "at most 5 events" in r.json()["error"]["message"]
        r = await http.post("/v1/streams/s/events", json={"type": "x", "data": "y" * 2000})
        assert r.status_code == 413 and "limit is 1000" in r.json()["error"]["message"]
        json_type = {"Content-Type": "application/json"}
        body = b"[" + b" " * 20_000 + b"]"
        r = await http.post("/v1/streams/s/events", content=body, headers=json_type)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(20):
                yield b" " * 1000

        r = await http.post("/v1/streams/s/events", content=chunks(), headers=json_type)
        assert r.status_code == 413


async def test_bad_producer_headers_are_400(http: httpx.AsyncClient) -> None:
    async with http:
        r = await http.post(
            "/v1/streams/s/events", json={"type": "x"}, headers={"Producer-Id": "p"}
        )
        assert r.status_code == 400 and "together" in r.json()["error"]["message"]
        r = await http.post(
            "/v1/streams/s/events",
            json={"type": "x"},
            headers={"Producer-Id": "p", "Producer-Seq": "-1"},
        )
        assert r.status_code == 400


async def test_bad_positions_and_limits_are_400(http: httpx.AsyncClient) -> None:
    async with http:
        await http.post("/v1/streams/s/events", json={"type": "x"})
        for params in ({"after": "x"}, {"limit": 0}, {"limit": 100_000}, {"wait": -1}):
            r = await http.get("/v1/streams/s/events", params=params)
            assert r.status_code == 400, (params, r.text)
            assert r.json()["error"]["message"]
        r = await http.get(
            "/v1/streams/s/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "x:y"}
        )
        assert r.status_code == 400


async def test_subscriber_limits_are_429(http: httpx.AsyncClient) -> None:
    live = http.live  # type: ignore[attr-defined]
    async with http:
        await http.post("/v1/streams/s/events", json={"type": "x"})
        await http.post("/v1/streams/t/events", json={"type": "x"})
        async with (
            open_sse(http, "/v1/streams/s/events") as a,
            open_sse(http, "/v1/streams/s/events") as b,
        ):
            await a.take(1)
            await b.take(1)
            r = await http.get("/v1/streams/s/events", headers={"Accept": "text/event-stream"})
            assert r.status_code == 429
            assert "limit 2" in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == "too_many_subscribers"
            with pytest.raises(InvalidStatus) as denied:
                async with connect(f"{live.ws_url}/v1/streams/s/ws"):
                    pass
            assert denied.value.response.status_code == 429
            async with open_sse(http, "/v1/streams/t/events") as c:
                await c.take(1)
                r = await http.get("/v1/streams/t/events", headers={"Accept": "text/event-stream"})
                assert r.status_code == 429 and "limit 3" in r.json()["error"]["message"]


async def test_unknown_route_and_method_are_json(http: httpx.AsyncClient) -> None:
    async with http:
        r = await http.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.put("/v1/streams/s/events")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
