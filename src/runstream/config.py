"""Settings: the one configuration object, read from ``runstream.toml`` and ``RUNSTREAM_*``.

Precedence, lowest to highest: built-in defaults, the TOML file, environment
variables, explicit overrides (CLI flags). Every value lives here once; other
modules read it from a :class:`Settings` instance, never from constants of
their own.

File layout::

    [server]                # host, port, backend, workers, retry_ms, keepalive, ...
    [auth]                  # token = "...", read_token = "...", tokens = [{token, scopes}]
    [limits]                # max_body_bytes, max_batch, max_event_bytes, ...
    [tasks.NAME]            # kept raw for the runs layer (see SPEC §4)

Environment: ``RUNSTREAM_CONFIG`` (file path), ``RUNSTREAM_TOKEN`` (read+write),
``RUNSTREAM_READ_TOKEN`` (read only), and ``RUNSTREAM_<FIELD>`` for every field
of ``[server]`` and ``[limits]`` (``RUNSTREAM_BACKEND``, ``RUNSTREAM_PORT``,
``RUNSTREAM_KEEPALIVE``, ``RUNSTREAM_MAX_BODY_BYTES``, ...). List settings
(``allowed_hosts``, ``cors_origins``) are TOML arrays, comma-separated in the
environment (``RUNSTREAM_CORS_ORIGINS=https://a.example,https://b.example``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from runstream.backends import DEFAULT_BACKEND_URL
from runstream.core.jsonbody import DEFAULT_MAX_DEPTH
from runstream.errors import ConfigError
from runstream.redact import mask_secrets

Scope: TypeAlias = Literal["read", "write"]
SCOPES: frozenset[str] = frozenset({"read", "write"})
ENV_PREFIX = "RUNSTREAM_"
DEFAULT_CONFIG_FILE = "runstream.toml"


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and what it may do. ``write`` does not imply ``read``."""

    token: str
    scopes: frozenset[str]

    def __repr__(self) -> str:  # never print secrets
        return f"Token(scopes={sorted(self.scopes)})"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8787
    backend: str = DEFAULT_BACKEND_URL
    workers: int | None = None
    """In-process worker count for the runs layer (``None`` = its default, 0 = API only)."""
    retry_ms: int = 2000
    """The SSE ``retry:`` field: how long a browser waits before reconnecting."""
    keepalive: float = 15.0
    """Seconds between keepalive comments on an idle SSE response (pings on WS)."""
    reconcile_interval: float = 5.0
    """How often open responses are checked against stream state (closed, deleted)."""
    create_grace: float = 10.0
    """A stream first seen less than this long ago is not ended for being absent."""
    shutdown_grace: float = 1.0
    """On shutdown, how long a response may take to flush before it is cut."""
    long_poll_max_wait: float = 30.0
    """Upper bound for ``wait=`` on JSON reads."""
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()
    """``Host`` names answered besides loopback names (``name``, ``name:port``, ``*.domain``,
    ``*`` = any). Empty: loopback names only on a loopback bind, any host on another bind."""
    cors_origins: tuple[str, ...] = ()
    """Origins (``https://app.example.com``) whose pages may call the API; empty = CORS off.
    ``*`` (any origin) needs a token."""

    def __repr__(self) -> str:  # the backend URL may hold a password
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["backend"] = mask_secrets(self.backend)
        return "ServerSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch: int = 1000
    max_event_bytes: int = 1024 * 1024
    """Encoded ``data`` of one event."""
    max_subscribers_per_stream: int = 10_000
    max_subscribers: int = 50_000
    subscriber_buffer: int = 5000
    """Events queued for one live client before it is disconnected as too slow."""
    max_page_limit: int = 1000
    default_page_limit: int = 100
    max_json_depth: int = DEFAULT_MAX_DEPTH
    """Deepest nesting accepted in a request body (arrays and objects; the append body's
    own array and event object count)."""
    max_page_bytes: int = 4 * 1024 * 1024
    """Bytes (event types and data JSON) of one page: a JSON read, an SSE or WebSocket
    catch-up read, one write to a streaming client. A page holds at least one event."""
    subscriber_buffer_bytes: int = 64 * 1024 * 1024
    """Bytes queued for one live client before it is disconnected as too slow."""
    send_timeout: float = 30.0
    """Seconds one write to an SSE/WebSocket client may take (a client that stops
    reading) before it is disconnected as too slow; it resumes from its last id."""
    header_timeout: float = 10.0
    """Seconds a connection has to send a complete request line and headers, from when
    it opens or its previous response ends; then it is closed."""
    max_connections: int | None = None
    """Open connections at once; ``None``: as many as the open-file limit allows.
    At the limit a new connection replaces the oldest idle one, or gets 503."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything runstream's server reads from configuration. Immutable; use :meth:`replace`."""

    server: ServerSettings = field(default_factory=ServerSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    tokens: tuple[Token, ...] = ()
    tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """The raw ``[tasks.*]`` tables, validated by the runs layer."""
    source: str | None = None
    """Path of the file these settings came from, for messages."""

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)

    def scopes_for(self, token: str | None) -> frozenset[str] | None:
        """Scopes of ``token``, or ``None`` if it is unknown (or missing)."""
        if token is None:
            return None
        import hmac

        for item in self.tokens:
            if hmac.compare_digest(item.token.encode(), token.encode()):
                return item.scopes
        return None

    def replace(self, **server: Any) -> Settings:
        """A copy with ``[server]`` fields replaced (``None`` values are ignored)."""
        changes = {k: v for k, v in server.items() if v is not None}
        if not changes:
            return self
        server_settings = _build(ServerSettings, changes, "server", self.server)
        return dataclasses.replace(self, server=server_settings)

    def check_bind(self) -> None:
        """Refuse a non-loopback bind without a token (raises :class:`ConfigError`)."""
        if self.auth_enabled or is_loopback(self.server.host):
            return
        raise ConfigError(
            f"refusing to listen on {self.server.host!r} without an access token: anyone who can "
            "reach it could read and write every stream. Set a token (RUNSTREAM_TOKEN=... or "
            '[auth] token = "..." in runstream.toml) or bind to 127.0.0.1.'
        )


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _coerce(cls_name: str, name: str, ftype: Any, value: Any) -> Any:
    """Convert a TOML or environment value to the field's type, or raise ConfigError."""
    kind = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    where = f"{cls_name}.{name}"
    try:
        if "bool" in kind:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            if value in ("", None) and "None" in kind:
                return None
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            result: Any = int(value)
        elif kind.startswith("tuple"):
            # TOML arrays, or comma-separated in the environment.
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(value)
            result = tuple(i.strip() for i in items if i.strip())
        elif kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError(value)
            result = value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: invalid value {value!r} (expected {kind})") from None
    if isinstance(result, int | float) and not isinstance(result, bool) and result < 0:
        raise ConfigError(f"{where}: must not be negative (got {value!r})")
    return result


def _build(cls: Any, values: Mapping[str, Any], section: str, base: Any = None) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(
            f"[{section}]: unknown setting(s) {sorted(unknown)}; known: {sorted(fields)}"
        )
    converted = {k: _coerce(section, k, fields[k].type, v) for k, v in values.items()}
    result = dataclasses.replace(base, **converted) if base is not None else cls(**converted)
    return result


def _parse_tokens(auth: Mapping[str, Any]) -> list[Token]:
    tokens: list[Token] = []
    unknown = set(auth) - {"token", "read_token", "tokens"}
    if unknown:
        raise ConfigError(f"[auth]: unknown setting(s) {sorted(unknown)}")
    if auth.get("token"):
        tokens.append(Token(str(auth["token"]), frozenset({"read", "write"})))
    if auth.get("read_token"):
        tokens.append(Token(str(auth["read_token"]), frozenset({"read"})))
    for i, item in enumerate(auth.get("tokens") or ()):
        if not isinstance(item, Mapping) or not isinstance(item.get("token"), str):
            raise ConfigError(f'[auth].tokens[{i}]: expected {{token = "...", scopes = [...]}}')
        scopes = item.get("scopes", ["read", "write"])
        if not isinstance(scopes, list) or not set(scopes) <= SCOPES or not scopes:
            raise ConfigError(f"[auth].tokens[{i}].scopes: use a list of 'read' and/or 'write'")
        tokens.append(Token(item["token"], frozenset(scopes)))
    for t in tokens:
        if len(t.token) < 8:
            raise ConfigError("access tokens must be at least 8 characters")
    return tokens


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read settings: defaults < TOML file < ``RUNSTREAM_*`` environment < ``overrides``.

    ``path`` defaults to ``$RUNSTREAM_CONFIG``, else ``./runstream.toml`` if it
    exists. ``overrides`` are ``[server]`` fields (``None`` is ignored), as the
    CLI passes them. Raises :class:`ConfigError` with the offending key.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source: str | None = None
    if path is None:
        path = env.get(ENV_PREFIX + "CONFIG") or None
        if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
            path = DEFAULT_CONFIG_FILE
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {source!r} not found") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {source!r}: {exc}") from exc
    unknown = set(data) - {"server", "auth", "limits", "tasks"}
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}")
    server_values = dict(_section(data, "server"))
    limit_values = dict(_section(data, "limits"))
    auth_values = dict(_section(data, "auth"))
    for f in dataclasses.fields(ServerSettings):
        if (v := env.get(ENV_PREFIX + f.name.upper())) is not None:
            server_values[f.name] = v
    for f in dataclasses.fields(LimitSettings):
        if (v := env.get(ENV_PREFIX + f.name.upper())) is not None:
            limit_values[f.name] = v
    if env.get(ENV_PREFIX + "TOKEN"):
        auth_values["token"] = env[ENV_PREFIX + "TOKEN"]
    if env.get(ENV_PREFIX + "READ_TOKEN"):
        auth_values["read_token"] = env[ENV_PREFIX + "READ_TOKEN"]
    server_values.update({k: v for k, v in overrides.items() if v is not None})
    tasks = _section(data, "tasks")
    for name, table in tasks.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"[tasks.{name}] must be a table")
    settings = Settings(
        server=_build(ServerSettings, server_values, "server"),
        limits=_build(LimitSettings, limit_values, "limits"),
        tokens=tuple(_parse_tokens(auth_values)),
        tasks=dict(tasks),
        source=source,
    )
    _check(settings)
    return settings


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _check(settings: Settings) -> None:
    s, lim = settings.server, settings.limits
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port must be 0-65535 (got {s.port})")
    if s.keepalive <= 0 or s.reconcile_interval <= 0:
        raise ConfigError("server.keepalive and server.reconcile_interval must be > 0")
    for name in (
        "max_body_bytes",
        "max_batch",
        "max_event_bytes",
        "subscriber_buffer",
        "max_page_limit",
        "default_page_limit",
        "max_json_depth",
        "max_page_bytes",
        "subscriber_buffer_bytes",
    ):
        if getattr(lim, name) < 1:
            raise ConfigError(f"limits.{name} must be >= 1")
    if lim.max_connections is not None and lim.max_connections < 1:
        raise ConfigError(
            "limits.max_connections must be >= 1 (or unset: from the open-file limit)"
        )
    if lim.send_timeout <= 0 or lim.header_timeout <= 0:
        raise ConfigError("limits.send_timeout and limits.header_timeout must be > 0")
    if lim.default_page_limit > lim.max_page_limit:
        raise ConfigError("limits.default_page_limit must be <= limits.max_page_limit")
    if "*" in s.cors_origins and not settings.auth_enabled:
        raise ConfigError(
            'server.cors_origins = ["*"] without an access token would let every web page read '
            "and write every stream; list the origins, or set a token"
        )
