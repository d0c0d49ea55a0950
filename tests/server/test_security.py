"""The browser-safety decisions (Host, Origin, content types) as plain functions, no sockets.

``tests/security/test_browser.py`` sends the same cases over real HTTP.
"""

from __future__ import annotations

import re

import pytest
from starlette.datastructures import Headers

from runstream.config import Token
from runstream.errors import ConfigError
from runstream.server.security import (
    BODY_RULES,
    BodyRule,
    SecurityPolicy,
    parse_host,
    parse_origin,
)
from tests.server.live import make_settings

TOKEN = (Token("a-long-token", frozenset({"read", "write"})),)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:8787", ("localhost", 8787)),
        ("example.com.", ("example.com", None)),
        ("[::1]:80", ("[::1]", 80)),
        ("127.0.0.1:99999", None),
        ("a b", None),
        ("user@host", None),
        ("", None),
        ("[::1", None),
    ],
)
def test_parse_host(value: str, parsed: tuple[str, int | None] | None) -> None:
    assert parse_host(value) == parsed


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("https://app.example.com", ("https", "app.example.com", 443)),
        ("http://127.0.0.1:8787", ("http", "127.0.0.1", 8787)),
        ("null", None),
        ("file://", None),
        ("https://a.example/path", None),
        ("chrome-extension://abc", None),
    ],
)
def test_parse_origin(value: str, parsed: tuple[str, str, int] | None) -> None:
    assert parse_origin(value) == parsed


def test_loopback_bind_answers_loopback_names_only() -> None:
    policy = SecurityPolicy.from_settings(make_settings())
    for host in ("localhost", "localhost:1", "127.0.0.1:8787", "127.1.2.3", "[::1]:8787", None):
        assert policy.host_allowed(host), host
    for host in ("attacker.example", "localhost.attacker.example", "10.0.0.1", "0.0.0.0", "x y"):
        assert not policy.host_allowed(host), host


def test_other_bind_answers_any_host_unless_listed() -> None:
    open_policy = SecurityPolicy.from_settings(make_settings(host="0.0.0.0", tokens=TOKEN))
    assert open_policy.host_allowed("anything.example:8080")
    listed = SecurityPolicy.from_settings(
        make_settings(host="0.0.0.0", tokens=TOKEN, allowed_hosts=("runs.example.com",))
    )
    assert listed.host_allowed("runs.example.com") and listed.host_allowed("localhost")
    assert not listed.host_allowed("anything.example")


def test_host_patterns() -> None:
    policy = SecurityPolicy.from_settings(
        make_settings(allowed_hosts=("*.example.com", "api.test:8443", "[2001:db8::1]"))
    )
    assert policy.host_allowed("a.example.com") and policy.host_allowed("a.b.example.com:1")
    assert not policy.host_allowed("example.com") and not policy.host_allowed("badexample.com")
    assert policy.host_allowed("api.test:8443") and not policy.host_allowed("api.test")
    assert policy.host_allowed("[2001:db8::1]:80")
    assert SecurityPolicy.from_settings(make_settings(allowed_hosts=("*",))).host_allowed("x.y")


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://127.0.0.1:8787", "127.0.0.1:8787", True),
        ("http://localhost:8787", "localhost:8787", True),
        ("https://runs.example.com", "runs.example.com", True),  # behind a TLS proxy
        ("https://runs.example.com", "runs.example.com:443", True),
        ("http://runs.example.com", "runs.example.com", True),
        ("http://127.0.0.1:8787", "127.0.0.1:8788", False),
        ("http://localhost:8787", "127.0.0.1:8787", False),
        ("http://attacker.example", "127.0.0.1:8787", False),
        ("null", "127.0.0.1:8787", False),
        ("http://127.0.0.1:8787", None, False),
    ],
)
def test_same_origin(origin: str, host: str | None, allowed: bool) -> None:
    assert SecurityPolicy.from_settings(make_settings()).origin_allowed(origin, host) is allowed


def test_listed_origins_are_normalised() -> None:
    policy = SecurityPolicy.from_settings(
        make_settings(cors_origins=("HTTPS://App.Example.com:443/", "http://localhost:3000"))
    )
    assert policy.cors_allowed("https://app.example.com")
    assert policy.cors_allowed("http://localhost:3000")
    assert not policy.cors_allowed("http://localhost:3001")
    assert policy.origin_allowed("https://app.example.com", "127.0.0.1:8787")
    star = SecurityPolicy.from_settings(make_settings(cors_origins=("*",), tokens=TOKEN))
    assert star.cors_allowed("https://any.example") and not star.cors_allowed("null")


@pytest.mark.parametrize(
    "settings",
    [
        {"allowed_hosts": ("https://runs.example.com",)},
        {"allowed_hosts": ("runs.example.com/app",)},
        {"cors_origins": ("https://app.example.com/app",)},
        {"cors_origins": ("app.example.com",)},
        {"cors_origins": ("*",)},  # any origin without a token
    ],
)
def test_bad_entries_are_config_errors(settings: dict[str, tuple[str, ...]]) -> None:
    with pytest.raises(ConfigError):
        SecurityPolicy.from_settings(make_settings(**settings))


def headers(**values: str) -> Headers:
    return Headers({k.replace("_", "-"): v for k, v in values.items()})


@pytest.mark.parametrize(
    ("method", "path", "sent", "refused"),
    [
        ("POST", "/v1/runs", headers(content_type="application/json"), False),
        ("POST", "/v1/runs", headers(content_type="Application/JSON; charset=utf-8"), False),
        ("POST", "/v1/runs", headers(content_type="text/plain"), True),
        ("POST", "/v1/runs", headers(content_type="application/json-patch+json"), True),
        ("POST", "/v1/runs", headers(), True),  # a JSON body is required
        ("POST", "/v1/streams/s/events", headers(content_length="0"), True),
        ("POST", "/v1/streams/s/events", headers(content_type="multipart/form-data"), True),
        ("POST", "/v1/streams/s/close", headers(), False),  # the body is optional
        ("POST", "/v1/streams/s/close", headers(content_length="0"), False),
        ("POST", "/v1/streams/s/close", headers(content_length="5"), True),
        ("POST", "/v1/streams/s/close", headers(transfer_encoding="chunked"), True),
        ("POST", "/v1/x/close", headers(content_type="text/plain", content_length="0"), True),
        ("POST", "/v1/runs/r/cancel", headers(content_type="application/json"), False),
        ("DELETE", "/v1/streams/s", headers(), False),
        ("PUT", "/v1/anything", headers(content_type="text/plain"), True),
    ],
)
def test_body_rules(method: str, path: str, sent: Headers, refused: bool) -> None:
    policy = SecurityPolicy.from_settings(make_settings())
    assert (policy.body_refusal(method, path, sent) is not None) is refused


def test_a_route_can_take_other_content_types() -> None:
    """How an endpoint with its own types (e.g. Durable Streams) joins the table."""
    any_type = BodyRule(frozenset({"POST", "PUT"}), re.compile(r"^/v1/stream/"), None)
    policy = SecurityPolicy(rules=(any_type, *BODY_RULES))
    assert policy.body_refusal("POST", "/v1/stream/a/b", headers(content_type="text/plain")) is None
    assert policy.body_refusal("POST", "/v1/runs", headers(content_type="text/plain")) is not None
