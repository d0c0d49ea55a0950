"""A web page on another origin cannot drive a local server (issue 13, row 4).

What a browser lets any page do without asking the server first: ``fetch``
with ``mode: "no-cors"`` (bodies typed ``text/plain``, ``multipart/form-data``,
``application/x-www-form-urlencoded``, or untyped), an HTML form POST,
``new WebSocket(...)``, and DNS rebinding (the page's own host name resolving
to 127.0.0.1, so its requests carry ``Host: attacker.example``). These tests
send exactly those requests, with the headers a browser adds (``Origin``),
to the default server (loopback, no token) and check they are refused and
change nothing.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from runstream.app import build_app
from runstream.config import Settings
from tests.server.live import LiveServer, make_settings, serve_in_task

ATTACKER = "http://attacker.example"
TASKS: dict[str, Any] = {
    "hello": {
        "command": [sys.executable, "-c", "import sys; print('hello', sys.argv[1])", "{name}"],
        "params": {"name": {"type": "string", "default": "world"}},
    }
}
RUN_BODY = '{"task": "hello", "params": {"name": "from-the-attacker"}}'
# What fetch(..., {mode: "no-cors"}) and HTML forms can send, as the browser labels it.
SIMPLE_TYPES = [
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=----x",
    None,  # a Blob body without a type: no Content-Type header at all
]


async def start(settings: Settings | None = None) -> LiveServer:
    settings = (settings or make_settings()).replace(backend="memory://", workers=1)
    settings = settings.evolve(tasks=TASKS)
    return await serve_in_task(build_app(settings), settings)


@pytest.fixture
async def server() -> AsyncIterator[LiveServer]:
    live = await start()
    yield live
    await live.stop()


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


def browser_headers(content_type: str | None, origin: str = ATTACKER) -> dict[str, str]:
    headers = {"Origin": origin}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


@pytest.mark.parametrize("content_type", SIMPLE_TYPES)
async def test_no_cors_post_cannot_create_a_run(
    http: httpx.AsyncClient, content_type: str | None
) -> None:
    r = await http.post("/v1/runs", content=RUN_BODY, headers=browser_headers(content_type))
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in r.json()["error"]["message"]
    assert (await http.get("/v1/runs")).json()["runs"] == []


@pytest.mark.parametrize("content_type", SIMPLE_TYPES)
async def test_no_cors_post_cannot_close_a_stream(
    http: httpx.AsyncClient, content_type: str | None
) -> None:
    assert (await http.post("/v1/streams/x/events", json={"type": "a"})).status_code == 201
    body = '{"status": "pwned"}'
    r = await http.post("/v1/streams/x/close", content=body, headers=browser_headers(content_type))
    assert r.status_code == 415, r.text
    assert (await http.get("/v1/streams/x")).json()["status"] == "open"


async def test_no_cors_post_cannot_append(http: httpx.AsyncClient) -> None:
    body = '{"type": "forged"}'
    r = await http.post("/v1/streams/x/events", content=body, headers=browser_headers("text/plain"))
    assert r.status_code == 415
    assert (await http.get("/v1/streams/x")).status_code == 404


async def test_cross_origin_post_without_a_body_is_refused(http: httpx.AsyncClient) -> None:
    """fetch(url, {method: "POST", mode: "no-cors"}): no body, no type, but an Origin."""
    await http.post("/v1/streams/x/events", json={"type": "a"})
    r = await http.post("/v1/streams/x/close", headers={"Origin": ATTACKER})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    run = (await http.post("/v1/runs", json={"task": "hello"})).json()
    r = await http.post(f"/v1/runs/{run['id']}/cancel", headers={"Origin": ATTACKER})
    assert r.status_code == 403
    assert (await http.get("/v1/streams/x")).json()["status"] == "open"


async def test_same_origin_and_non_browser_writes_still_work(
    server: LiveServer, http: httpx.AsyncClient
) -> None:
    # The UI: same origin, JSON.
    r = await http.post("/v1/streams/x/events", json={"type": "a"}, headers={"Origin": server.url})
    assert r.status_code == 201
    # curl/SDK: no Origin; an optional body left out.
    assert (await http.post("/v1/streams/x/close")).status_code == 200
    r = await http.post("/v1/runs", json={"task": "hello"})
    assert r.status_code == 201
    r = await http.post(f"/v1/runs/{r.json()['id']}/cancel", json={})
    assert r.status_code == 202


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8787", "127.0.0.1.nip.io"])
async def test_dns_rebinding_host_is_refused(http: httpx.AsyncClient, host: str) -> None:
    r = await http.get("/v1/runs", headers={"Host": host})
    assert r.status_code == 421, r.text
    assert r.json()["error"]["code"] == "host_not_allowed"
    r = await http.post("/v1/runs", json={"task": "hello"}, headers={"Host": host})
    assert r.status_code == 421
    assert (await http.get("/v1/runs")).json()["runs"] == []


async def test_dns_rebinding_websocket_is_refused(server: LiveServer) -> None:
    # The page's own name in the URL (so in Host), its socket to our loopback address.
    url = f"ws://attacker.example:{server.port}/v1/streams/x/ws"
    with pytest.raises(InvalidStatus) as denied:
        async with connect(url, host="127.0.0.1", port=server.port):
            pass
    assert denied.value.response.status_code == 421


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1:{port}", "[::1]"])
async def test_loopback_names_are_answered(
    server: LiveServer, http: httpx.AsyncClient, host: str
) -> None:
    r = await http.get("/healthz", headers={"Host": host.format(port=server.port)})
    assert r.status_code == 200


async def test_cross_origin_websocket_is_refused(
    server: LiveServer, http: httpx.AsyncClient
) -> None:
    await http.post("/v1/streams/x/events", json={"type": "secret"})
    run = (await http.post("/v1/runs", json={"task": "hello"})).json()
    for path in ("/v1/streams/x/ws", f"/v1/runs/{run['id']}/ws"):
        with pytest.raises(InvalidStatus) as denied:
            async with connect(f"{server.ws_url}{path}", origin=Origin(ATTACKER)):
                pass
        assert denied.value.response.status_code == 403
        assert b"origin_not_allowed" in denied.value.response.body


async def test_same_origin_and_originless_websockets_are_accepted(
    server: LiveServer, http: httpx.AsyncClient
) -> None:
    await http.post("/v1/streams/x/events", json={"type": "a"})
    for host, origin in [
        ("127.0.0.1", server.url),
        ("localhost", f"http://localhost:{server.port}"),
        ("127.0.0.1", None),
    ]:
        async with connect(
            f"ws://{host}:{server.port}/v1/streams/x/ws",
            origin=None if origin is None else Origin(origin),
            host="127.0.0.1",
            port=server.port,
        ) as ws:
            assert '"type":"a"' in str(await ws.recv())


# -- configured hosts and origins -------------------------------------------------------

APP_ORIGIN = "https://app.example.com"


@pytest.fixture
async def configured() -> AsyncIterator[LiveServer]:
    live = await start(
        make_settings(allowed_hosts=("runs.example.com",), cors_origins=(APP_ORIGIN,))
    )
    yield live
    await live.stop()


async def test_allowed_hosts_are_answered_others_refused(configured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=configured.url) as http:
        for host in ("runs.example.com", "runs.example.com:443", "RUNS.example.com."):
            assert (await http.get("/healthz", headers={"Host": host})).status_code == 200
        assert (await http.get("/healthz", headers={"Host": "127.0.0.1"})).status_code == 200
        r = await http.get("/healthz", headers={"Host": "other.example.com"})
        assert r.status_code == 421


async def test_listed_origin_can_call_the_api_and_read_the_answer(configured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=configured.url) as http:
        headers = {"Origin": APP_ORIGIN, "Host": "runs.example.com"}
        r = await http.post("/v1/streams/x/events", json={"type": "a"}, headers=headers)
        assert r.status_code == 201
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "Origin" in r.headers["vary"]
        assert "Retry-After" in r.headers["access-control-expose-headers"]
        # Its errors are readable too.
        plain = {**headers, "Content-Type": "text/plain"}
        r = await http.post("/v1/runs", content="{}", headers=plain)
        assert r.status_code == 415
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        # Another origin: refused writes, and no CORS header on what it may read.
        other = {"Origin": ATTACKER, "Host": "runs.example.com"}
        r = await http.post("/v1/streams/x/events", json={"type": "b"}, headers=other)
        assert r.status_code == 403
        r = await http.get("/v1/streams/x", headers=other)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "Origin" in r.headers["vary"]
        # Answers vary by Origin even when a request has none (shared caches).
        r = await http.get("/v1/streams/x", headers={"Host": "runs.example.com"})
        assert "Origin" in r.headers["vary"]


async def test_listed_origin_can_open_a_websocket(configured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=configured.url) as http:
        await http.post("/v1/streams/x/events", json={"type": "a"})
    async with connect(f"{configured.ws_url}/v1/streams/x/ws", origin=Origin(APP_ORIGIN)) as ws:
        assert '"type":"a"' in str(await ws.recv())
    with pytest.raises(InvalidStatus) as denied:
        async with connect(f"{configured.ws_url}/v1/streams/x/ws", origin=Origin(ATTACKER)):
            pass
    assert denied.value.response.status_code == 403


def preflight(origin: str, method: str = "POST", headers: str | None = None) -> dict[str, str]:
    out = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        out["Access-Control-Request-Headers"] = headers
    return out


async def test_preflight_from_a_listed_origin(configured: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=configured.url) as http:
        asked = "authorization, content-type, producer-id, producer-seq"
        r = await http.options("/v1/streams/x/events", headers=preflight(APP_ORIGIN, headers=asked))
        assert r.status_code == 204, r.text
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
        assert {"GET", "POST", "DELETE"} <= methods
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "producer-id", "producer-seq"} <= allowed
        assert {"last-event-id"} <= allowed
        assert int(r.headers["access-control-max-age"]) > 0
        assert r.headers["vary"].count("Origin") == 1
        assert "access-control-allow-credentials" not in r.headers  # tokens, never cookies
        # A page on a public site reaching a private-network server (Chrome's preflight).
        pna = {**preflight(APP_ORIGIN), "Access-Control-Request-Private-Network": "true"}
        r = await http.options("/v1/runs", headers=pna)
        assert r.headers["access-control-allow-private-network"] == "true"


@pytest.mark.parametrize(
    ("origin", "method", "headers"),
    [
        (ATTACKER, "POST", "content-type"),
        (APP_ORIGIN, "PATCH", None),
        (APP_ORIGIN, "POST", "content-type, x-unknown"),
        ("null", "POST", None),
    ],
)
async def test_preflight_refusals(
    configured: LiveServer, origin: str, method: str, headers: str | None
) -> None:
    async with httpx.AsyncClient(base_url=configured.url) as http:
        r = await http.options("/v1/runs", headers=preflight(origin, method, headers))
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "cors_refused"
        assert "access-control-allow-origin" not in r.headers


async def test_cors_is_off_by_default(http: httpx.AsyncClient) -> None:
    r = await http.options("/v1/runs", headers=preflight(ATTACKER, headers="content-type"))
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = await http.get("/v1/runs", headers={"Origin": ATTACKER})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
