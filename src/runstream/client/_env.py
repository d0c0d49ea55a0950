"""The SDK's (and the CLI's) ``RUNSTREAM_*`` environment variables, read in one place.

Precedence everywhere: an argument given in code (or a CLI flag) wins over
the environment, which wins over the built-in default. An empty variable
counts as unset. For the watchdog timers ``0`` turns the timer off; for the
reconnect budget (``MAX_ATTEMPTS``, ``MAX_ELAPSED``) ``0`` removes that bound.

These names are the client side's; the server reads its own (``RUNSTREAM_PORT``,
``RUNSTREAM_KEEPALIVE``, ...) in :mod:`runstream.config`. ``RUNSTREAM_TOKEN``
is shared on purpose: on one machine the client then uses the token the
server was started with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Final

from runstream.errors import ConfigError

URL: Final = "RUNSTREAM_URL"
URL_ALIAS: Final = "RUNSTREAM_SERVER"
"""The CLI's older name for the server URL; read when ``RUNSTREAM_URL`` is unset."""
TOKEN: Final = "RUNSTREAM_TOKEN"
TRANSPORT: Final = "RUNSTREAM_TRANSPORT"

WATCHDOGS: Final = {
    "first_event": "RUNSTREAM_FIRST_EVENT_TIMEOUT",
    "idle": "RUNSTREAM_IDLE_TIMEOUT",
    "stale": "RUNSTREAM_STALE_TIMEOUT",
}
"""FollowOptions field -> variable (seconds, ``0`` = off)."""

RECONNECT: Final = {
    "base_delay": "RUNSTREAM_RECONNECT_BASE_DELAY",
    "max_delay": "RUNSTREAM_RECONNECT_MAX_DELAY",
    "max_attempts": "RUNSTREAM_RECONNECT_MAX_ATTEMPTS",
    "max_elapsed": "RUNSTREAM_RECONNECT_MAX_ELAPSED",
}
"""RetryPolicy field -> variable."""

TRANSPORTS: Final = ("auto", "sse", "ws", "poll")


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={text!r}: expected seconds (a number >= 0; 0 turns it off)")
    return value


def _count(name: str, text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigError(f"{name}={text!r}: expected a whole number >= 0 (0 = no limit)")
    return int(text)


def server_url(env: Mapping[str, str] | None = None) -> str | None:
    """``RUNSTREAM_URL``, else ``RUNSTREAM_SERVER``, else ``None``."""
    env = os.environ if env is None else env
    return _get(env, URL) or _get(env, URL_ALIAS)


def token(env: Mapping[str, str] | None = None) -> str | None:
    """``RUNSTREAM_TOKEN``, or ``None``."""
    env = os.environ if env is None else env
    return _get(env, TOKEN)


def follow_settings_from_env(
    env: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(FollowOptions fields, RetryPolicy fields)`` set in the environment.

    Raises :class:`ConfigError` naming the variable when a value is invalid.
    """
    env = os.environ if env is None else env
    options: dict[str, Any] = {}
    for field, name in WATCHDOGS.items():
        if (text := _get(env, name)) is not None:
            options[field] = _seconds(name, text)
    if (text := _get(env, TRANSPORT)) is not None:
        if text.lower() not in TRANSPORTS:
            raise ConfigError(f"{TRANSPORT}={text!r}: expected one of {', '.join(TRANSPORTS)}")
        options["transport"] = text.lower()
    retry: dict[str, Any] = {}
    for field, name in RECONNECT.items():
        if (text := _get(env, name)) is None:
            continue
        if field == "max_attempts":
            retry[field] = _count(name, text) or None
        elif field == "max_elapsed":
            retry[field] = _seconds(name, text) or None
        else:
            retry[field] = _seconds(name, text)
    return options, retry
