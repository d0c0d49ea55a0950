"""Hostile HTTP input: hypothesis on append bodies, names, positions and headers; no 5xx.

``tests/server/test_openapi.py`` runs schemathesis over ``/openapi.json``
(schema-shaped cases, a few per operation). This adds what the schema does not
generate: any JSON value (including deep nesting, huge numbers, lone
surrogates, NaN spelled as JSON allows Python to parse it), raw bytes that are
not JSON, names and positions of any text, producer headers of any printable
value, WebSocket positions, and bodies over the size limit sent without a
length. Every answer must be a 2xx or a 4xx with the JSON error shape; a
server error or a stack trace fails.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import connect as ws_connect

from runstream.server.app import create_app
from tests.server.live import make_settings, serve_in_thread

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server (SQLite) in its own thread, so synchronous hypothesis tests can call it."""
    db = Path(tmp_path_factory.mktemp("fuzz")) / "fuzz.db"
    config = make_settings(long_poll_max_wait=0.05, keepalive=0.2, limit_max_body_bytes=MAX_BODY)
    config = config.replace(backend=f"sqlite:///{db}")
    with serve_in_thread(create_app(config), config) as base:
        httpx.post(f"{base}/v1/streams/known/events", json={"type": "x"}, timeout=10)
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    # JSON bodies go out as JSON: untyped ones are refused (415) before the parser sees them.
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        yield client


def check(resp: httpx.Response) -> None:
    """A 2xx/3xx, or a 4xx with the one error shape; never a 5xx or a traceback."""
    assert resp.status_code < 500, f"{resp.request.method} {resp.request.url}: {resp.text[:300]}"
    assert "Traceback" not in resp.text
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"} and body["error"]["code"], resp.text


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
event_items = (
    st.fixed_dictionaries(
        {"type": st.text(min_size=0, max_size=120)}, optional={"data": json_values}
    )
    | json_values
)


@FUZZ
@given(body=event_items | st.lists(event_items, max_size=5))
def test_any_json_append_body_is_stored_or_refused_never_a_server_error(
    http: httpx.Client, body: Any
) -> None:
    resp = http.post("/v1/streams/fuzz-json/events", content=json.dumps(body))
    check(resp)
    if resp.status_code == 201:
        page = http.get(
            "/v1/streams/fuzz-json/events", params={"after": resp.json()["first_id"] - 1}
        )
        check(page)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes_as_an_append_body_get_a_4xx_or_201(http: httpx.Client, raw: bytes) -> None:
    check(http.post("/v1/streams/fuzz-bytes/events", content=raw))


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"type": "t", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"type": "t", "data": NaN}',
        b'{"type": "t", "data": Infinity}',
        b'{"type": "t", "data": 1e999}',
        b'{"type": "t", "data": "\\ud800"}',
        b'{"type": "t", "data": ' + b"9" * 5000 + b"}",
        b'{"type": "t", "type": "u"}',
        b"\xef\xbb\xbf" + b'{"type": "t"}',
    ],
    ids=[
        "deep-array",
        "deep-data",
        "nan",
        "infinity",
        "overflowing-float",
        "lone-surrogate",
        "5000-digit-int",
        "duplicate-key",
        "bom",
    ],
)
def test_pathological_json_is_refused_or_stored_never_a_server_error(
    http: httpx.Client, raw: bytes
) -> None:
    resp = http.post("/v1/streams/fuzz-edge/events", content=raw)
    check(resp)
    if resp.status_code == 201:
        stored = http.get(
            "/v1/streams/fuzz-edge/events", params={"after": resp.json()["first_id"] - 1}
        )
        check(stored)
        json.loads(stored.text)  # what was stored reads back as valid JSON


@FUZZ
@given(name=st.text(min_size=1, max_size=220))
def test_any_stream_name_in_the_path_is_400_404_or_served(http: httpx.Client, name: str) -> None:
    path = quote(name, safe="")
    for method, suffix in (("GET", ""), ("GET", "/events"), ("POST", "/events")):
        check(http.request(method, f"/v1/streams/{path}{suffix}", json={"type": "t"}))


@FUZZ
@given(
    after=st.text(max_size=40) | st.from_regex(r"[0-9a-f]{0,12}:-?[0-9]{0,25}", fullmatch=True),
    limit=st.text(max_size=12) | st.integers(-5, 10**20).map(str),
    wait=st.text(max_size=12) | st.floats(allow_nan=True).map(str),
)
def test_any_read_position_limit_and_wait_is_answered(
    http: httpx.Client, after: str, limit: str, wait: str
) -> None:
    check(
        http.get("/v1/streams/known/events", params={"after": after, "limit": limit, "wait": wait})
    )
    headers = {"Accept": "text/event-stream", "Last-Event-ID": after.encode().hex()[:40]}
    with http.stream(
        "GET", "/v1/streams/known/events", params={"after": after}, headers=headers
    ) as resp:
        # A valid position opens a stream that stays open (keepalives): only the status matters.
        if resp.status_code != 200:
            resp.read()
            check(resp)


# Visible ASCII and inner spaces: what HTTP allows in a header value (h11 refuses the rest).
printable_header = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).map(str.strip)


@FUZZ
@given(producer_id=printable_header, producer_seq=printable_header)
def test_any_producer_headers_are_accepted_or_400(
    http: httpx.Client, producer_id: str, producer_seq: str
) -> None:
    resp = http.post(
        "/v1/streams/fuzz-producer/events",
        json={"type": "t"},
        headers={"Producer-Id": producer_id, "Producer-Seq": producer_seq},
    )
    check(resp)


@settings(max_examples=25, deadline=None, database=None)
@given(after=st.text(max_size=30))
def test_any_websocket_position_is_served_or_denied_with_a_4xx(url: str, after: str) -> None:
    ws_url = url.replace("http://", "ws://") + "/v1/streams/known/ws?after=" + quote(after, safe="")
    status = 101
    try:
        with ws_connect(ws_url, open_timeout=10, close_timeout=1) as ws:
            message = json.loads(ws.recv(timeout=0.5))
            assert message["type"] in ("x", "reset", "end"), message
    except InvalidStatus as exc:
        status = exc.response.status_code
    except TimeoutError:
        pass  # a position at or after the tail: served, nothing to send yet
    except WebSocketException:
        pass  # closed by the server after its first message
    assert status == 101 or 400 <= status < 500, status


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_endless_chunked_body_is_refused_before_it_ends(url: str) -> None:
    """Past the limit the server answers 413 without waiting for (or keeping) the rest."""
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(
            b"POST /v1/streams/fuzz-big/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        block = b"x" * 16384
        for _ in range(MAX_BODY // len(block) + 2):
            s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        # The terminating chunk is never sent: only an early answer can arrive.
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_declared_length_over_the_limit_is_refused_unread(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(
            b"POST /v1/streams/fuzz-big/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
        )
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
