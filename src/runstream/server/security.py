"""Browser safety: what a web page on another origin can make the server do.

A browser lets any page send some requests to any server, including one on
the user's own machine, without asking: "simple" POSTs (bodies typed
``text/plain``, ``multipart/form-data`` or ``application/x-www-form-urlencoded``,
or untyped), and WebSocket handshakes. It also lets a page's own host name
resolve to 127.0.0.1 (DNS rebinding), which makes the loopback server look
same-origin to that page. :class:`SecurityMiddleware`, the outermost layer of
the app, answers all of that before any route (or the streams fast path) sees
the request:

1. **Host.** The ``Host`` header must name this server: loopback names
   (``localhost``, ``127.0.0.1``, ``[::1]``, any port) always, plus
   ``server.allowed_hosts``; with that list empty, loopback names only on a
   loopback bind and any host on another bind (which needs a token anyway).
   Otherwise 421. A rebinding page sends its own host name: refused.
2. **CORS.** Off unless ``server.cors_origins`` lists origins. Preflights
   from listed origins are answered here (methods, request headers,
   ``Access-Control-Max-Age``); others get 403. Responses to listed origins
   carry ``Access-Control-Allow-Origin`` and the exposed headers. No
   credentials mode: tokens travel in ``Authorization``, never cookies.
3. **Writes.** ``POST``/``PUT``/``PATCH``/``DELETE`` take only the content
   types of their route (:data:`BODY_RULES`; JSON by default, an empty body
   where it is optional); anything a page can send without a preflight is
   refused with 415 before the body is read. A write that carries an
   ``Origin`` header (browsers always send one on these) must come from the
   server's own origin or a listed CORS origin, else 403: that also covers
   an empty-bodied ``POST .../close``.
4. **WebSocket handshakes** with an ``Origin`` (browsers always send one)
   must be same-origin or from a listed CORS origin, else 403 before accept.
   Clients that are not browsers send no ``Origin`` and are not affected.

Every response also gets ``X-Content-Type-Options: nosniff``,
``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and, unless the
route set its own (the UI does), ``Content-Security-Policy: frame-ancestors
'none'``. Errors are the usual JSON ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runstream.config import Settings, is_loopback
from runstream.errors import ConfigError
from runstream.server.errors import error_response

__all__ = [
    "BODY_RULES",
    "BodyRule",
    "SecurityMiddleware",
    "SecurityPolicy",
    "parse_host",
    "parse_origin",
]

JSON: Final = "application/json"
STATE_CHANGING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

CORS_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "DELETE")
"""Methods a listed origin may use (the API's)."""
CORS_REQUEST_HEADERS: Final = frozenset(
    {
        "accept",
        "accept-language",
        "authorization",
        "cache-control",
        "content-language",
        "content-type",
        "last-event-id",
        "producer-id",
        "producer-seq",
        # Durable Streams (/v1/stream/...)
        "if-none-match",
        "producer-epoch",
        "stream-closed",
        "stream-expires-at",
        "stream-fork-offset",
        "stream-fork-sub-offset",
        "stream-forked-from",
        "stream-seq",
        "stream-ttl",
    }
)
"""Request headers a listed origin may send (lower case)."""
CORS_EXPOSE_HEADERS: Final = (
    "Retry-After",
    "WWW-Authenticate",
    # Durable Streams responses
    "ETag",
    "Location",
    "Producer-Epoch",
    "Producer-Expected-Seq",
    "Producer-Received-Seq",
    "Producer-Seq",
    "Stream-Closed",
    "Stream-Cursor",
    "Stream-Expires-At",
    "Stream-Next-Offset",
    "Stream-SSE-Data-Encoding",
    "Stream-TTL",
    "Stream-Up-To-Date",
)
"""Response headers a page on a listed origin may read (besides the CORS-safelisted ones)."""
CORS_MAX_AGE: Final = 600
"""Seconds a browser may cache a preflight answer."""

BASE_HEADERS: Final = (
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
)
"""Added to every HTTP response that does not set them itself."""
DEFAULT_CSP: Final = "frame-ancestors 'none'"
"""The Content-Security-Policy of responses that set none (the UI sets its own)."""
_BASE_RAW: Final = tuple(
    (name.encode(), value.encode())
    for name, value in (*BASE_HEADERS, ("content-security-policy", DEFAULT_CSP))
)
_EXPOSE: Final = ", ".join(CORS_EXPOSE_HEADERS).encode()
_HOST_CACHE_SIZE: Final = 256
"""Distinct Host values whose verdict is remembered (the rest are checked each time)."""


@dataclass(frozen=True, slots=True)
class BodyRule:
    """Which request bodies a route takes: media types, and whether the body may be empty.

    ``media_types`` ``None`` accepts any type. An empty body may come without
    ``Content-Type`` only when ``body_optional``; a ``Content-Type`` that is
    present must always be one of ``media_types``.
    """

    methods: frozenset[str]
    path: re.Pattern[str]
    media_types: frozenset[str] | None = frozenset({JSON})
    body_optional: bool = False

    def describe(self) -> str:
        if self.media_types is None:
            return "any content type"
        kinds = " or ".join(sorted(self.media_types))
        return f"{kinds} (or no body)" if self.body_optional else kinds


_POST: Final = frozenset({"POST"})

BODY_RULES: Final[tuple[BodyRule, ...]] = (
    BodyRule(_POST, re.compile(r"^/v1/streams/[^/]+/events$")),
    BodyRule(_POST, re.compile(r"^/v1/runs$")),
    # A route with other content types (the Durable Streams endpoint takes any type on
    # its own paths) adds its rule here, before the default.
    BodyRule(STATE_CHANGING, re.compile(r"^/v1/stream/"), media_types=None),  # Durable Streams
    BodyRule(STATE_CHANGING, re.compile(r""), body_optional=True),  # JSON, or no body
)
"""The first rule whose method and path match a state-changing request applies."""


def body_rule(method: str, path: str, rules: tuple[BodyRule, ...] = BODY_RULES) -> BodyRule:
    for rule in rules:
        if method in rule.methods and rule.path.search(path):
            return rule
    return rules[-1]


# -- Host and Origin parsing --------------------------------------------------------

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HOST_RE: Final = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+)(?::(?P<port>\d{1,5}))?$")


def parse_host(value: str) -> tuple[str, int | None] | None:
    """``Host``-style ``name[:port]`` → ``(name lower-cased, port)``; ``None`` if malformed.

    IPv6 literals keep their brackets; a trailing dot is dropped.
    """
    match = _HOST_RE.match(value.strip())
    if match is None:
        return None
    host = match.group("host").lower().rstrip(".")
    port = match.group("port")
    if not host or (port is not None and int(port) > 65535):
        return None
    return host, None if port is None else int(port)


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """An ``Origin`` (``scheme://host[:port]``) → ``(scheme, host, port)``; ``None`` if opaque.

    ``null`` and anything with a path, user info or an unknown scheme is opaque.
    """
    scheme, sep, rest = value.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    parsed = parse_host(rest)
    if parsed is None:
        return None
    host, port = parsed
    return scheme, host, _DEFAULT_PORTS[scheme] if port is None else port


def _is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def normalize_origin(value: str) -> str:
    """A configured origin in the form browsers send it (lower case, no default port)."""
    parsed = parse_origin(value.rstrip("/"))
    if parsed is None:
        raise ConfigError(
            f"server.cors_origins: {value!r} is not an origin; write scheme://host[:port], "
            'e.g. "https://app.example.com" (or "*")'
        )
    scheme, host, port = parsed
    return f"{scheme}://{host}" if _DEFAULT_PORTS[scheme] == port else f"{scheme}://{host}:{port}"


@dataclass(frozen=True, slots=True)
class _HostPattern:
    name: str
    port: int | None
    wildcard: bool  # "*.example.com": any subdomain (not example.com itself)

    def matches(self, host: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.name)
        return host == self.name


def _host_pattern(entry: str) -> _HostPattern:
    wildcard = entry.startswith("*.")
    parsed = parse_host(entry[2:] if wildcard else entry)
    if parsed is None:
        raise ConfigError(
            f"server.allowed_hosts: {entry!r} is not a host name; write name, name:port, "
            '*.domain or "*" (no scheme, no path)'
        )
    return _HostPattern(parsed[0], parsed[1], wildcard)


# -- the policy -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    """The decisions of :class:`SecurityMiddleware`, without I/O."""

    any_host: bool = False
    hosts: tuple[_HostPattern, ...] = ()
    any_origin: bool = False
    origins: frozenset[str] = frozenset()
    rules: tuple[BodyRule, ...] = BODY_RULES

    @classmethod
    def from_settings(cls, settings: Settings) -> SecurityPolicy:
        """Raises :class:`ConfigError` for an entry that is not a host or an origin."""
        s = settings.server
        hosts = tuple(h.strip() for h in s.allowed_hosts if h.strip())
        if not hosts and not is_loopback(s.host):
            hosts = ("*",)
        origins = tuple(o.strip() for o in s.cors_origins if o.strip())
        if "*" in origins and not settings.auth_enabled:
            raise ConfigError('server.cors_origins = ["*"] needs an access token')
        return cls(
            any_host="*" in hosts,
            hosts=tuple(_host_pattern(h) for h in hosts if h != "*"),
            any_origin="*" in origins,
            origins=frozenset(normalize_origin(o) for o in origins if o != "*"),
        )

    @property
    def cors_enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def host_allowed(self, value: str | None) -> bool:
        if value is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding page
            return True
        parsed = parse_host(value)
        if parsed is None:
            return False
        host, port = parsed
        if self.any_host or _is_loopback_name(host):
            return True
        return any(p.matches(host, port) for p in self.hosts)

    def cors_allowed(self, origin: str) -> bool:
        if self.any_origin:
            return parse_origin(origin) is not None
        return origin.lower() in self.origins

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Same-origin with ``host`` (the request's Host header), or a listed CORS origin."""
        if self.cors_allowed(origin):
            return True
        parsed_origin = parse_origin(origin)
        parsed_host = parse_host(host) if host else None
        if parsed_origin is None or parsed_host is None:
            return False
        scheme, o_host, o_port = parsed_origin
        h_host, h_port = parsed_host
        # The Host header omits the default port of the scheme the browser used.
        same_port = h_port == o_port or (h_port is None and o_port == _DEFAULT_PORTS[scheme])
        return o_host == h_host and same_port

    def body_refusal(self, method: str, path: str, headers: Mapping[str, str]) -> str | None:
        """Why a state-changing request's body is refused (415), or ``None``."""
        rule = body_rule(method, path, self.rules)
        if rule.media_types is None:
            return None
        content_type = headers.get("content-type")
        if content_type is None:
            empty = headers.get("content-length", "").strip() == "0" or (
                "content-length" not in headers and "transfer-encoding" not in headers
            )
            if empty and rule.body_optional:
                return None
            got = "a body without Content-Type" if not empty else "no Content-Type"
        else:
            media_type = content_type.partition(";")[0].strip().lower()
            if media_type in rule.media_types:
                return None
            got = f"Content-Type {media_type or content_type!r}"
        return f"{method} {path} takes {rule.describe()}; got {got}"


# -- the middleware -------------------------------------------------------------------


class SecurityMiddleware:
    """Pure ASGI middleware applying a :class:`SecurityPolicy`; install it outermost."""

    def __init__(self, app: ASGIApp, policy: SecurityPolicy) -> None:
        self.app = app
        self.policy = policy
        self._hosts: dict[str | None, bool] = {}  # Host values seen, and the verdict

    def _host_allowed(self, host: str | None) -> bool:
        verdict = self._hosts.get(host)
        if verdict is None:
            verdict = self.policy.host_allowed(host)
            if len(self._hosts) < _HOST_CACHE_SIZE:  # bounded: any client picks the value
                self._hosts[host] = verdict
        return verdict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        policy = self.policy
        headers = _wanted_headers(scope)
        host = headers.get("host")
        if not self._host_allowed(host):
            shown = (host or "")[:100]
            await self._refuse(
                scope,
                receive,
                send,
                421,
                "host_not_allowed",
                f"this server does not answer for Host {shown!r}; add it to "
                "server.allowed_hosts (RUNSTREAM_ALLOWED_HOSTS) if it is yours",
            )
            return
        origin = headers.get("origin")
        if kind == "websocket":
            if origin is not None and not policy.origin_allowed(origin, host):
                await self._refuse(
                    scope, receive, send, 403, "origin_not_allowed", _origin_message(origin)
                )
                return
            await self.app(scope, receive, send)
            return

        method = scope["method"]
        if (
            method == "OPTIONS"
            and origin is not None
            and "access-control-request-method" in headers
        ):
            await self._preflight(scope, receive, send, Headers(scope=scope), origin)
            return
        if method in STATE_CHANGING:
            refusal = policy.body_refusal(method, scope["path"], headers)
            if refusal is not None:
                await self._refuse(
                    scope, receive, send, 415, "unsupported_media_type", refusal, origin
                )
                return
            if origin is not None and not policy.origin_allowed(origin, host):
                await self._refuse(
                    scope, receive, send, 403, "origin_not_allowed", _origin_message(origin)
                )
                return
        await self.app(scope, receive, self._decorating(send, origin))

    def _decorating(self, send: Send, origin: str | None) -> Send:
        extra: list[tuple[bytes, bytes]] = []
        if self.policy.cors_enabled:
            # With or without an Origin: a cache must not serve one origin's answer to another.
            extra.append((b"vary", b"Origin"))
            if origin is not None and self.policy.cors_allowed(origin):
                extra.append((b"access-control-allow-origin", origin.encode("latin-1")))
                extra.append((b"access-control-expose-headers", _EXPOSE))

        async def decorated(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", ()))
                present = {name.lower() for name, _ in raw}
                raw += [h for h in _BASE_RAW if h[0] not in present]
                if extra:
                    if b"vary" in present:  # one Vary, listing Origin too
                        raw = [
                            (k, v + b", Origin")
                            if k.lower() == b"vary" and b"origin" not in v.lower()
                            else (k, v)
                            for k, v in raw
                        ]
                        raw += extra[1:]
                    else:
                        raw += extra
                message = {**message, "headers": raw}
            await send(message)

        return decorated

    async def _preflight(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, origin: str
    ) -> None:
        """Answer a CORS preflight (Fetch standard, "CORS-preflight fetch")."""
        policy = self.policy
        method = headers["access-control-request-method"].strip()
        requested = [
            h.strip().lower()
            for h in headers.get("access-control-request-headers", "").split(",")
            if h.strip()
        ]
        problem = None
        if not policy.cors_allowed(origin):
            problem = _origin_message(origin)
        elif method not in CORS_METHODS:
            problem = f"method {method!r} is not allowed cross-origin"
        elif unknown := [h for h in requested if h not in CORS_REQUEST_HEADERS]:
            problem = f"request header(s) {', '.join(unknown)} not allowed cross-origin"
        if problem is not None:
            await self._refuse(scope, receive, send, 403, "cors_refused", problem)
            return
        reply = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ", ".join(CORS_METHODS),
            "Access-Control-Allow-Headers": ", ".join(sorted(CORS_REQUEST_HEADERS)),
            "Access-Control-Max-Age": str(CORS_MAX_AGE),
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
        if headers.get("access-control-request-private-network", "").lower() == "true":
            # The operator listed this origin: let it reach a server on a private network.
            reply["Access-Control-Allow-Private-Network"] = "true"
        response = Response(status_code=204, headers=reply)
        await response(scope, receive, self._decorating(send, None))

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        code: str,
        message: str,
        origin: str | None = None,
    ) -> None:
        response = error_response(status, code, message)
        if scope["type"] == "websocket":
            if "websocket.http.response" in scope.get("extensions", {}):
                await response(scope, receive, self._decorating(send, None))
            else:  # the server answers 403 to a close before accept
                await send({"type": "websocket.close", "code": 4000 + status, "reason": code})
            return
        await response(scope, receive, self._decorating(send, origin))


_WANTED: Final = frozenset(
    {
        b"host",
        b"origin",
        b"content-type",
        b"content-length",
        b"transfer-encoding",
        b"access-control-request-method",
    }
)


def _wanted_headers(scope: Scope) -> dict[str, str]:
    """The request headers the checks read, in one pass (first value of each)."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED and (key := name.decode("latin-1")) not in out:
            out[key] = value.decode("latin-1")
    return out


def _origin_message(origin: str) -> str:
    return (
        f"requests from origin {origin[:100]!r} are not allowed; list it in "
        "server.cors_origins (RUNSTREAM_CORS_ORIGINS) to allow it"
    )
