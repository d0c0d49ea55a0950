"""How a follower behaves: :class:`FollowOptions` and the transports it may use.

Re-exported by :mod:`runstream.client.follow` (and the package); this module
only keeps :mod:`~runstream.client.follow` to the reading itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from runstream.client._env import follow_settings_from_env
from runstream.client.policy import RetryPolicy
from runstream.client.watchdog import WatchdogConfig
from runstream.errors import ValidationError

Transport: TypeAlias = Literal["auto", "sse", "ws", "poll"]
TRANSPORTS: tuple[Transport, ...] = ("auto", "sse", "ws", "poll")

DEFAULT_FIRST_EVENT = 30.0
DEFAULT_IDLE = 45.0
"""Three times the server's default keepalive interval (15 s)."""
DEFAULT_POLL_WAIT = 20.0
DEFAULT_POLL_LIMIT = 1000
DEFAULT_BUFFER = 64


@dataclass(frozen=True, slots=True)
class FollowOptions:
    """How a follower behaves; every field has a sensible default.

    Watchdogs (seconds, 0 = off): ``first_event`` until the first byte of an
    attempt, ``idle`` between any bytes (keepalives and heartbeats count),
    ``stale`` between real events. ``reset``: ``"yield"`` a :class:`Reset`
    item or ``"raise"`` :class:`HistoryLost`. ``transport``: ``"auto"`` (SSE,
    long-poll fallback), ``"sse"`` (never poll), ``"ws"`` (WebSocket, never
    poll) or ``"poll"`` (only long-poll). ``buffer`` is how many received
    items may wait for the consumer before reading pauses.
    ``wait_for_create``: a stream that does not exist yet is waited for
    (``True``) or raises :class:`~runstream.errors.StreamNotFound`
    (``False``); ``None`` leaves it to the server (which waits by default).

    :meth:`from_env` reads the watchdogs, backoff and transport from
    ``RUNSTREAM_*`` variables (see ``docs/listening.md``).
    """

    first_event: float = DEFAULT_FIRST_EVENT
    idle: float = DEFAULT_IDLE
    stale: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reset: Literal["yield", "raise"] = "yield"
    transport: Transport = "auto"
    poll_wait: float = DEFAULT_POLL_WAIT
    poll_limit: int = DEFAULT_POLL_LIMIT
    buffer: int = DEFAULT_BUFFER
    max_line: int = 1 << 20
    max_event: int = 8 << 20
    wait_for_create: bool | None = None

    def __post_init__(self) -> None:
        if self.reset not in ("yield", "raise"):
            raise ValidationError("reset must be 'yield' or 'raise'", field="reset")
        if self.transport not in TRANSPORTS:
            raise ValidationError(
                "transport must be 'auto', 'sse', 'ws' or 'poll'", field="transport"
            )
        if self.buffer < 1 or self.poll_limit < 1 or self.poll_wait < 0:
            raise ValidationError("buffer and poll_limit must be >= 1, poll_wait >= 0")
        WatchdogConfig(self.first_event, self.idle, self.stale)  # validates

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **fields: Any) -> FollowOptions:
        """Defaults, overridden by the environment, overridden by ``fields``.

        Reads ``RUNSTREAM_FIRST_EVENT_TIMEOUT``, ``RUNSTREAM_IDLE_TIMEOUT``,
        ``RUNSTREAM_STALE_TIMEOUT`` (seconds, ``0`` = off),
        ``RUNSTREAM_TRANSPORT`` and ``RUNSTREAM_RECONNECT_*`` (the
        :class:`RetryPolicy` fields). Raises :class:`~runstream.errors.ConfigError`
        naming the variable when a value is invalid.
        """
        values, retry = follow_settings_from_env(env)
        options = cls(**{**values, **fields})
        if retry and "retry" not in fields:
            retry_policy = dataclasses.replace(options.retry, **retry)
            options = dataclasses.replace(options, retry=retry_policy)
        return options
