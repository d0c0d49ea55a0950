"""Property: any JSON text a client appends is refused with a 4xx, or served back exactly.

Bodies are generated as *text*, so they can hold what a Python value cannot show:
escaped lone surrogates, surrogates spelt as raw bytes, nesting around the depth
limit, numbers past float range or with thousands of digits, every control
character, duplicate keys. For each body: the POST answers 201 or a 4xx with the
JSON error shape (never a 5xx); after a 201 the events read back over JSON, SSE,
WebSocket and the SDK equal what Python's ``json`` makes of the body.

Size: ``RUNSTREAM_PROPERTY_EXAMPLES`` bodies per backend (default 60; the closing
runs of issue 13 used 1,000).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.server.served import BACKENDS, Served, read_everywhere, served

EXAMPLES = int(os.environ.get("RUNSTREAM_PROPERTY_EXAMPLES", "60"))

pytestmark = pytest.mark.timeout(max(120, EXAMPLES * 3))


@pytest.fixture(scope="module", params=BACKENDS)
def srv(request: pytest.FixtureRequest) -> Iterator[Served]:
    with served(request) as server:
        yield server


def _escape(char: str, draw: st.DrawFn) -> str:
    code = ord(char)
    if char == '"':
        return '\\"'
    if char == "\\":
        return "\\\\"
    if code < 0x20 or draw(st.integers(0, 5)) == 0:
        if code > 0xFFFF:  # as a surrogate pair, the way ASCII-only encoders write it
            code -= 0x10000
            return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
        return f"\\u{code:04x}"
    return char


@st.composite
def json_string(draw: st.DrawFn) -> str:
    # One string in ten may hold any code point, lone surrogates included (Hypothesis's
    # text() leaves them out); the others are valid text, so most bodies get stored.
    if draw(st.integers(0, 9)) == 0:
        alphabet = st.characters(codec=None, categories=None) | st.characters(
            min_codepoint=0xD800, max_codepoint=0xDFFF
        )
    else:
        alphabet = st.characters(codec="utf-8")
    chars = draw(st.lists(alphabet, max_size=12))
    return '"' + "".join(_escape(c, draw) for c in chars) + '"'


json_number = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["1e400", "-1e999", "NaN", "Infinity", "-0", "-0.0", "1E-400"])
    | st.integers(300, 5000).map(lambda n: "9" * n),
)


def json_text(max_leaves: int = 12) -> st.SearchStrategy[str]:
    leaves = st.sampled_from(["null", "true", "false"]) | json_number | json_string()
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
            | st.lists(st.tuples(json_string(), inner), max_size=4).map(
                lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
            )
        ),
        max_leaves=max_leaves,
    )


deep = st.integers(1, 80).map(lambda n: "[" * n + "]" * n)  # the limit is 64 levels


@st.composite
def event_text(draw: st.DrawFn) -> str:
    type_text = draw(
        st.sampled_from(['"log"', '"stdout"', '"\\u00e9t\\u00e9"'])
        | json_string()
        | st.sampled_from(['"log"', '"end"', '""'])
    )
    if draw(st.booleans()):
        return "{" + f'"type":{type_text}' + "}"
    data = draw(json_text() | json_text() | deep)
    return "{" + f'"type":{type_text},"data":{data}' + "}"


events_text = st.lists(event_text(), min_size=1, max_size=4).map(
    lambda xs: "[" + ",".join(xs) + "]"
)
body_text = st.one_of(event_text(), events_text, event_text(), events_text, json_text())


def _bytes(text: str, raw_surrogates: bool) -> bytes:
    # Either proper UTF-8, or surrogates spelt as UTF-8 bytes (invalid UTF-8).
    return text.encode("utf-8", "surrogatepass" if raw_surrogates else "strict")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(text=body_text, raw_surrogates=st.booleans())
def test_any_json_text_is_refused_or_served_back_identically(
    srv: Served, text: str, raw_surrogates: bool
) -> None:
    try:
        body = _bytes(text, raw_surrogates)
    except UnicodeEncodeError:
        return  # the text itself holds no raw surrogate: nothing to spell as bytes
    stream = srv.name("prop")
    resp = srv.http.post(f"/v1/streams/{stream}/events", content=body, headers=srv.json)
    assert resp.status_code in (201, 400, 409, 413), (resp.status_code, resp.text[:300])
    event(f"answered {resp.status_code}")
    if resp.status_code != 201:
        error = resp.json()["error"]
        assert error["code"] and error["message"]
        return
    sent = json.loads(body)
    expected: list[tuple[str, Any]] = [
        (e["type"], e.get("data")) for e in (sent if isinstance(sent, list) else [sent])
    ]
    assert srv.http.post(f"/v1/streams/{stream}/close").status_code == 200
    for transport, events in read_everywhere(srv, stream).items():
        assert events == expected, transport
