"""Settings: the one configuration object, read from ``runstream.toml`` and ``RUNSTREAM_*``.

Precedence, lowest to highest: built-in defaults, the TOML file, environment
variables, explicit overrides (CLI flags). Every value lives here once; other
modules read it from a :class:`Settings` instance, never from constants of
their own.

File layout::

    [server]                # host, port, backend, workers, retry_ms, keepalive, ...
    [auth]                  # token = "...", read_token = "...", tokens = [{token, scopes}]
    [limits]                # max_body_bytes, max_batch, max_event_bytes, ...
    [retention]             # max_age, max_runs, stream_max_idle, ... (docs/operations.md)
    [storage]               # min_free_disk, stats_interval
    [gates]                 # min_free_memory, min_free_disk, max_load
    [tasks.NAME]            # kept raw for the runs layer (see SPEC §4)

Environment: ``RUNSTREAM_CONFIG`` (file path), ``RUNSTREAM_TOKEN`` (read+write),
``RUNSTREAM_READ_TOKEN`` (read only), and ``RUNSTREAM_<FIELD>`` for every field
of ``[server]`` and ``[limits]`` (``RUNSTREAM_BACKEND``, ``RUNSTREAM_PORT``,
``RUNSTREAM_KEEPALIVE``, ``RUNSTREAM_MAX_BODY_BYTES``, ...); ``[retention]``,
``[storage]`` and ``[gates]`` fields take their section in the name
(``RUNSTREAM_RETENTION_MAX_AGE``, ``RUNSTREAM_STORAGE_MIN_FREE_DISK``). List settings
(``allowed_hosts``, ``cors_origins``) are TOML arrays, comma-separated in the
environment (``RUNSTREAM_CORS_ORIGINS=https://a.example,https://b.example``).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from runstream.backends import DEFAULT_BACKEND_URL
from runstream.core.jsonbody import DEFAULT_MAX_DEPTH
from runstream.errors import ConfigError
from runstream.redact import mask_secrets

Scope: TypeAlias = Literal["read", "write"]
SCOPES: frozenset[str] = frozenset({"read", "write"})
ENV_PREFIX = "RUNSTREAM_"
DEFAULT_CONFIG_FILE = "runstream.toml"
RUN_GRACE = 10.0
"""Default of ``server.run_grace`` (for code that runs runs without settings)."""
SECTIONS = ("server", "auth", "limits", "tasks", "retention", "storage", "gates")


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and what it may do. ``write`` does not imply ``read``."""

    token: str
    scopes: frozenset[str]

    def __repr__(self) -> str:  # never print secrets
        return f"Token(scopes={sorted(self.scopes)})"


def _list(value: Any) -> Any:
    """TOML arrays as they are; environment strings comma-separated (blanks dropped)."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _optional(value: Any) -> Any:
    """An empty environment value means "unset"."""
    return None if value == "" else value


M = TypeVar("M", bound=BaseModel)
Names = Annotated[tuple[str, ...], BeforeValidator(_list)]
Positive = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    """A settings table: immutable, unknown keys refused, numbers never spelt as booleans."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1; a setting spelt `port = true` is a mistake.
        field = cls.model_fields[info.field_name or ""]
        if isinstance(value, bool) and field.annotation is not bool:
            raise ValueError("a boolean is not a valid value here")
        return value


class ServerSettings(_Section):
    """``[server]``: where and how the service listens and streams."""

    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    backend: str = DEFAULT_BACKEND_URL
    workers: Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(_optional)] = None
    """In-process worker count for the runs layer (``None`` = its default, 0 = API only)."""
    processes: int = Field(0, ge=0)
    """Server processes sharing the port (``runstream serve --processes``); 0 = one per CPU
    core (1 on ``memory://``, whose streams live in one process)."""
    retry_ms: int = Field(2000, ge=0)
    """The SSE ``retry:`` field: how long a browser waits before reconnecting."""
    keepalive: Seconds = 15.0
    """Seconds between keepalive comments on an idle SSE response (pings on WS)."""
    reconcile_interval: Seconds = 5.0
    """How often open responses are checked against stream state (closed, deleted)."""
    wait_for_create: bool = True
    """Whether SSE, WebSocket and long-poll reads of a stream that does not exist yet wait
    for it (the default) or answer 404; a read's ``wait_for_create`` parameter overrides it."""
    create_grace: float = Field(10.0, ge=0)
    """Deprecated and ignored (streams not created yet are waited for: ``wait_for_create``);
    still accepted so that existing configuration files load."""
    shutdown_grace: float = Field(1.0, ge=0)
    """On shutdown, how long a streaming response may take to flush before it is cut."""
    run_grace: float = Field(RUN_GRACE, ge=0)
    """On stop (``serve`` with workers, ``runstream worker``), how long running runs may take
    to finish before they are cancelled (each command then gets its task's ``grace``)."""
    long_poll_max_wait: float = Field(30.0, ge=0)
    """Upper bound for ``wait=`` on JSON reads."""
    log_level: str = "info"
    allowed_hosts: Names = ()
    """``Host`` names answered besides loopback names (``name``, ``name:port``, ``*.domain``,
    ``*`` = any). Empty: loopback names only on a loopback bind, any host on another bind."""
    cors_origins: Names = ()
    """Origins (``https://app.example.com``) whose pages may call the API; empty = CORS off.
    ``*`` (any origin) needs a token."""
    ds_long_poll: Seconds = 10.0
    """Durable Streams (``/v1/stream/...``): how long a ``live=long-poll`` read waits for data
    before it answers 204."""
    ds_sse_max: Seconds = 60.0
    """Durable Streams: seconds after which a ``live=sse`` response ends (the protocol's
    CDN-collapsing interval; clients reconnect from the last control event's offset)."""

    def __repr__(self) -> str:  # the backend URL may hold a password
        shown = {**self.__dict__, "backend": mask_secrets(self.backend)}
        return "ServerSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


class LimitSettings(_Section):
    """``[limits]``: what one request, one client and one page may cost."""

    max_body_bytes: Positive = 4 * 1024 * 1024
    max_batch: Positive = 1000
    max_event_bytes: Positive = 1024 * 1024
    """Encoded ``data`` of one event."""
    max_subscribers_per_stream: int = Field(10_000, ge=0)
    max_subscribers: int = Field(50_000, ge=0)
    subscriber_buffer: Positive = 5000
    """Events queued for one live client before it is disconnected as too slow."""
    max_page_limit: Positive = 1000
    default_page_limit: Positive = 100
    max_json_depth: Positive = DEFAULT_MAX_DEPTH
    """Deepest nesting accepted in a request body (arrays and objects; the append body's
    own array and event object count)."""
    max_page_bytes: Positive = 4 * 1024 * 1024
    """Bytes (event types and data JSON) of one page: a JSON read, an SSE or WebSocket
    catch-up read, one write to a streaming client. A page holds at least one event."""
    subscriber_buffer_bytes: Positive = 64 * 1024 * 1024
    """Bytes queued for one live client before it is disconnected as too slow."""
    send_timeout: Seconds = 30.0
    """Seconds one write to an SSE/WebSocket client may take (a client that stops
    reading) before it is disconnected as too slow; it resumes from its last id."""
    header_timeout: Seconds = 10.0
    """Seconds a connection has to send a complete request line and headers, from when
    it opens or its previous response ends; then it is closed."""
    max_connections: Annotated[Positive | None, BeforeValidator(_optional)] = None
    """Open connections at once; ``None``: as many as the open-file limit allows.
    At the limit a new connection replaces the oldest idle one, or gets 503."""

    @model_validator(mode="after")
    def _pages(self) -> LimitSettings:
        if self.default_page_limit > self.max_page_limit:
            raise ValueError("default_page_limit must be <= max_page_limit")
        return self


class TokenEntry(_Section):
    token: str
    scopes: tuple[Scope, ...] = Field(("read", "write"), min_length=1)


class AuthSettings(_Section):
    """``[auth]``: ``token`` (read and write), ``read_token``, ``tokens = [{token, scopes}]``."""

    token: str | None = None
    read_token: str | None = None
    tokens: tuple[TokenEntry, ...] = ()

    def all(self) -> tuple[Token, ...]:
        found: list[Token] = []
        if self.token:
            found.append(Token(self.token, frozenset({"read", "write"})))
        if self.read_token:
            found.append(Token(self.read_token, frozenset({"read"})))
        found += [Token(t.token, frozenset(t.scopes)) for t in self.tokens]
        for t in found:
            if len(t.token) < 8:
                raise ConfigError("access tokens must be at least 8 characters")
        return tuple(found)


Bytes = Annotated[int, Field(ge=0)]
OptionalSeconds = Annotated[Annotated[float, Field(gt=0)] | None, BeforeValidator(_optional)]
OptionalCount = Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(_optional)]
OptionalBytes = Annotated[Bytes | None, BeforeValidator(_optional)]


class RetentionSettings(_Section):
    """``[retention]``: what is deleted on its own. Everything unset keeps forever.

    Runs are removed only once they have ended; a task's own ``retention``
    table overrides ``max_age`` / ``max_runs`` for its runs.
    """

    max_age: OptionalSeconds = None
    """Ended runs (and their streams) older than this many seconds since they finished."""
    max_runs: OptionalCount = None
    """Ended runs kept per task (the newest); older ones are deleted."""
    stream_max_idle: OptionalSeconds = None
    """Plain streams (not runs) with no append for this many seconds."""
    stream_max_closed: OptionalSeconds = None
    """Plain streams closed this many seconds ago."""
    feed_max_age: OptionalSeconds = None
    """Runs-feed items older than this; unset: ``max_age``."""
    feed_max_len: OptionalCount = None
    """Runs-feed items kept (the newest)."""
    interval: Seconds = 300.0
    """Seconds between two retention passes of a server."""
    scan_interval: Seconds = 3600.0
    """Seconds between two passes that list every stream (orphans, plain streams named
    like runs); the others read only what they may delete."""
    duty_cycle: Annotated[float, Field(gt=0, le=1)] = 0.01
    """Share of the time a pass on the timer works, pausing between its steps for the
    rest, so appends rarely wait behind it (1: no pauses; ``gc`` never pauses)."""


class StorageSettings(_Section):
    """``[storage]``: the floor under which writes are refused (HTTP 507)."""

    min_free_disk: Bytes = 256 * 1024 * 1024
    """Bytes that must stay free where a local store (SQLite) writes; 0 = no check."""
    stats_interval: Seconds = 15.0
    """Seconds between two readings of the store's size for ``/metrics``."""


class GateSettings(_Section):
    """``[gates]``: what the machine must have free before any run starts (0 / unset = no gate).

    A task's ``gate`` table adds its own minimums; the stricter value wins.
    """

    min_free_memory: OptionalBytes = None
    """Bytes of available memory (``MemAvailable``)."""
    min_free_disk: OptionalBytes = None
    """Bytes free in the working directory of the worker."""
    max_load: Annotated[Annotated[float, Field(gt=0)] | None, BeforeValidator(_optional)] = None
    """1-minute load average divided by the number of CPUs."""
    interval: Seconds = 5.0
    """Seconds between two checks of a closed gate."""


class Settings(BaseSettings):
    """Everything runstream's server reads from configuration. Immutable; use :meth:`replace`.

    Built directly (``Settings(server=...)``), it holds exactly what it is given:
    no file or environment is read, and invalid values raise pydantic's
    ``ValidationError``. :func:`load_settings` composes the sources (defaults <
    TOML file < environment < CLI flags) and raises :class:`ConfigError`, as
    :meth:`replace` and :meth:`evolve` do.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    tokens: tuple[Token, ...] = ()
    tasks: Mapping[str, Mapping[str, Any]] = Field(default_factory=dict)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    gates: GateSettings = Field(default_factory=GateSettings)
    """The raw ``[tasks.*]`` tables, validated by the runs layer."""
    source: str | None = None
    """Path of the file these settings came from, for messages."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # load_settings() adds the file and the environment

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)

    def scopes_for(self, token: str | None) -> frozenset[str] | None:
        """Scopes of ``token``, or ``None`` if it is unknown (or missing)."""
        if token is None:
            return None
        for item in self.tokens:
            if hmac.compare_digest(item.token.encode(), token.encode()):
                return item.scopes
        return None

    def replace(self, **server: Any) -> Settings:
        """A copy with ``[server]`` fields replaced (``None`` values are ignored), validated."""
        changes = {k: v for k, v in server.items() if v is not None}
        if not changes:
            return self
        return self.evolve(server={**self.server.model_dump(), **changes})

    def evolve(self, **fields: Any) -> Settings:
        """A copy with whole fields replaced (``tasks=...``, ``limits=...``), validated.

        Raises :class:`ConfigError` naming the offending key.
        """
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return _validated(Settings, {**values, **fields})

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


def _validated(model: type[M], values: Mapping[str, Any]) -> M:
    """``model`` built from ``values``; pydantic's errors become one :class:`ConfigError`."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    unknown: dict[str, list[str]] = {}
    problems: list[str] = []
    for err in exc.errors():
        loc = [f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden":
            section = ".".join(loc[:-1]) or "settings"
            unknown.setdefault(section, []).append(loc[-1])
            continue
        where = ".".join(loc).replace(".[", "[") or "settings"
        message = err["msg"].removeprefix("Value error, ")
        if "input" in err and err["type"] not in ("value_error",):
            problems.append(f"{where}: invalid value {err['input']!r} ({message})")
        else:
            problems.append(f"{where}: {message}" if loc else message)
    for section, keys in unknown.items():
        problems.append(f"[{section}]: unknown setting(s) {sorted(keys)}")
    return "; ".join(problems)


class _FlatEnvironment(PydanticBaseSettingsSource):
    """``RUNSTREAM_<FIELD>`` for every ``[server]`` and ``[limits]`` field, plus the tokens.

    Names are flat (``RUNSTREAM_PORT``, ``RUNSTREAM_MAX_BODY_BYTES``): the two
    tables share no field name.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__(Settings)
        self.env = env

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for section, model in (("server", ServerSettings), ("limits", LimitSettings)):
            for name in model.model_fields:
                if (value := self.env.get(ENV_PREFIX + name.upper())) is not None:
                    out.setdefault(section, {})[name] = value
        ops: tuple[tuple[str, type[BaseModel]], ...] = (
            ("retention", RetentionSettings),
            ("storage", StorageSettings),
            ("gates", GateSettings),
        )
        for section, table in ops:
            for name in table.model_fields:
                key = f"{ENV_PREFIX}{section.upper()}_{name.upper()}"
                if (value := self.env.get(key)) is not None:
                    out.setdefault(section, {})[name] = value
        auth = {
            key: self.env[ENV_PREFIX + key.upper()]
            for key in ("token", "read_token")
            if self.env.get(ENV_PREFIX + key.upper())
        }
        if auth:
            out["auth"] = auth
        return out


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"config file {source!r} not found")
    try:
        data: dict[str, Any] = TomlConfigSettingsSource(Settings, toml_file=Path(path))()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {source!r}: {exc}") from exc
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}")
    for name in SECTIONS:
        if not isinstance(data.get(name, {}), Mapping):
            raise ConfigError(f"[{name}] must be a table")
    for name, table in data.get("tasks", {}).items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"[tasks.{name}] must be a table")
    return data


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merged key by key; later layers win."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


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
    if path is None:
        path = env.get(ENV_PREFIX + "CONFIG") or None
        if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
            path = DEFAULT_CONFIG_FILE
    data = _read_toml(path) if path is not None else {}
    flags = {"server": {k: v for k, v in overrides.items() if v is not None}}
    merged = _merge(data, _FlatEnvironment(env)(), flags)
    auth = _validated(AuthSettings, merged.pop("auth", {}))
    settings = _validated(
        Settings,
        {**merged, "tokens": auth.all(), "source": None if path is None else str(path)},
    )
    if "*" in settings.server.cors_origins and not settings.auth_enabled:
        raise ConfigError(
            'server.cors_origins = ["*"] without an access token would let every web page read '
            "and write every stream; list the origins, or set a token"
        )
    return settings
