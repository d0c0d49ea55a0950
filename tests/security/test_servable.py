"""Accepted means servable: what a client sends is refused with a 4xx, or stored so that
every transport can serve it back. One hostile request must never brick a stream, a
listing or the connection it came on (issue table rows 1, 2, 3 and 9).

Each test runs against a real server on memory, SQLite and Redis.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from runstream.client import Client
from tests.server.served import BACKENDS, Served, read_everywhere, served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=BACKENDS)
def srv(request: pytest.FixtureRequest) -> Iterator[Served]:
    with served(request) as server:
        yield server


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error


def test_lone_surrogate_in_a_batch_is_refused_and_the_stream_stays_servable(srv: Served) -> None:
    # Row 1: valid JSON text whose second event type cannot be encoded as UTF-8.
    stream = srv.name("p")
    body = b'[{"type":"ok1"},{"type":"\\ud800"},{"type":"ok3"}]'
    resp = srv.http.post(f"/v1/streams/{stream}/events", content=body, headers=srv.json)
    assert resp.status_code == 400
    error = error_of(resp)
    assert error["code"] == "invalid"
    assert "body[1].type" in error["message"]
    # The batch is atomic: nothing of it was stored.
    assert srv.http.get(f"/v1/streams/{stream}").status_code == 404
    # The stream works for everyone afterwards, on every transport.
    ok = [{"type": "ok1", "data": "\U0001f600 é"}, {"type": "ok3", "data": {"k": [1, 2.5]}}]
    assert srv.http.post(f"/v1/streams/{stream}/events", json=ok).status_code == 201
    assert srv.http.post(f"/v1/streams/{stream}/close", json={}).status_code == 200
    for transport, events in read_everywhere(srv, stream).items():
        assert events == [(e["type"], e["data"]) for e in ok], transport


def test_lone_surrogate_in_data_or_a_key_is_refused(srv: Served) -> None:
    stream = srv.name("d")
    for body in (
        b'{"type":"t","data":{"a":["x","\\udfff"]}}',
        b'{"type":"t","data":{"\\ud83d":1}}',
        b'{"type":"t","data":"\xed\xa0\x80"}',  # a surrogate spelt in UTF-8 bytes
    ):
        resp = srv.http.post(f"/v1/streams/{stream}/events", content=body, headers=srv.json)
        assert resp.status_code == 400, body
        assert error_of(resp)["code"] == "invalid"
    # A surrogate *pair* escaped by an ASCII-only encoder is one valid character.
    resp = srv.http.post(
        f"/v1/streams/{stream}/events",
        content=b'{"type":"t","data":"\\ud83d\\ude00"}',
        headers=srv.json,
    )
    assert resp.status_code == 201
    page = srv.http.get(f"/v1/streams/{stream}/events").json()
    assert page["events"][0]["data"] == "\U0001f600"


def test_infinity_or_nan_in_data_is_refused_and_nothing_is_stored(srv: Served) -> None:
    # Python's JSON parser reads these JavaScript words; no JSON reader could take them back.
    stream = srv.name("inf")
    for body in (
        b'{"type":"t","data":Infinity}',
        b'[{"type":"t","data":1},{"type":"t","data":{"x":[-Infinity]}}]',
        b'{"type":"t","data":NaN}',
    ):
        resp = srv.http.post(f"/v1/streams/{stream}/events", content=body, headers=srv.json)
        assert resp.status_code == 400, body
        assert error_of(resp)["code"] == "invalid"
    assert srv.http.get(f"/v1/streams/{stream}/events").status_code == 404


def test_close_with_an_unencodable_status_is_refused_and_listings_still_work(
    srv: Served,
) -> None:
    # Row 2: the close must not be stored, and GET /v1/streams must keep answering.
    stream = srv.name("x")
    assert srv.http.post(f"/v1/streams/{stream}/events", json={"type": "t"}).status_code == 201
    for body in (b'{"status":"\\ud800"}', b'{"reason":"ok \\udc00"}'):
        resp = srv.http.post(f"/v1/streams/{stream}/close", content=body, headers=srv.json)
        assert resp.status_code == 400
        assert error_of(resp)["code"] == "invalid"
    assert srv.http.get(f"/v1/streams/{stream}").json()["status"] == "open"
    listing = srv.http.get("/v1/streams", params={"prefix": stream})
    assert listing.status_code == 200
    assert [s["stream"] for s in listing.json()["streams"]] == [stream]


def test_run_with_an_unencodable_param_is_not_created(srv: Served) -> None:
    # Row 3: refused before anything runs; the runs list keeps answering.
    before = srv.http.get("/v1/runs", params={"limit": 1000}).json()["runs"]
    resp = srv.http.post(
        "/v1/runs",
        content=b'{"task":"echo","params":{"msg":"a\\ud800b"}}',
        headers=srv.json,
    )
    assert resp.status_code == 400
    assert "params.msg" in error_of(resp)["message"]
    after = srv.http.get("/v1/runs", params={"limit": 1000})
    assert after.status_code == 200
    assert len(after.json()["runs"]) == len(before)


def test_run_timeout_too_large_for_a_float_is_a_422(srv: Served) -> None:
    # Row 9, second half: 400 digits used to raise OverflowError (500).
    body = b'{"task":"echo","params":{"msg":"hi"},"timeout":' + b"9" * 400 + b"}"
    resp = srv.http.post("/v1/runs", content=body, headers=srv.json)
    assert resp.status_code == 422
    assert error_of(resp)["code"] == "invalid_params"


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request on a kept-alive socket and read exactly its response."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("depth", [5_000, sys.getrecursionlimit() + 10, 960, 65])
def test_deep_nesting_is_a_400_on_a_connection_that_stays_usable(srv: Served, depth: int) -> None:
    # Row 9: RecursionError used to be a 500 and a reset connection; 960 levels were
    # stored and then broke every read of the stream.
    stream = srv.name("deep")
    deep = b'{"type":"t","data":' + b"[" * depth + b"]" * depth + b"}"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        first = _exchange(sock, _post(f"/v1/streams/{stream}/events", deep))
        assert first.startswith(b"HTTP/1.1 400"), first[:200]
        error = json.loads(first.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "invalid"
        assert "deep" in error["message"]
        # The same connection answers the next request.
        second = _exchange(sock, _post(f"/v1/streams/{stream}/events", b'{"type":"after"}'))
        assert second.startswith(b"HTTP/1.1 201"), second[:200]
    page = srv.http.get(f"/v1/streams/{stream}/events")
    assert page.status_code == 200
    assert [e["type"] for e in page.json()["events"]] == ["after"]


def test_nesting_up_to_the_limit_is_stored_and_served_everywhere(srv: Served) -> None:
    stream = srv.name("limit")
    data: Any = "leaf"
    for _ in range(srv.max_depth - 2):  # the body's object and "data" take two levels
        data = [data]
    resp = srv.http.post(f"/v1/streams/{stream}/events", json={"type": "t", "data": data})
    assert resp.status_code == 201, resp.text
    assert srv.http.post(f"/v1/streams/{stream}/close").status_code == 200
    for transport, events in read_everywhere(srv, stream).items():
        assert events == [("t", data)], transport


def test_sdk_reads_what_was_accepted(srv: Served) -> None:
    stream = srv.name("sdk")
    with Client(srv.url) as client:
        client.publish(stream, "t", {"s": "\u2028\x00\x1f", "n": 10**40})
        client.close_stream(stream)
    assert read_everywhere(srv, stream)["sdk"] == [("t", {"s": "\u2028\x00\x1f", "n": 10**40})]
