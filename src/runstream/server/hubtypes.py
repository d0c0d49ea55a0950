"""The hub's types: its share of the settings (:class:`HubLimits`), :data:`EndReason`,
:data:`EndCheck` (all re-exported by :mod:`.hub`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from runstream.config import LimitSettings, ServerSettings, Settings
from runstream.core.model import StreamInfo

__all__ = ["EndCheck", "EndReason", "HubLimits"]

_LIMITS, _SERVER = LimitSettings(), ServerSettings()

EndCheck = Callable[[str, StreamInfo | None], Awaitable[str | None]]
"""Extra lifecycle check run by the reconciler: given a stream and its state
(``None`` if absent), return a reason to end every response on it, or ``None``."""

EndReason = Literal[
    "end",  # the end entry was delivered
    "closed",  # the stream is closed and nothing more can come
    "deleted",
    "slow_consumer",
    "shutdown",
    "backend_error",
    "cancelled",  # the transport went away
]


@dataclass(frozen=True, slots=True)
class HubLimits:
    """The hub's share of the settings (defaults: the settings' defaults)."""

    buffer: int = _LIMITS.subscriber_buffer
    buffer_bytes: int = _LIMITS.subscriber_buffer_bytes
    page: int = _LIMITS.max_page_limit
    """Events per log read while a subscriber catches up."""
    page_bytes: int = _LIMITS.max_page_bytes
    per_stream: int = _LIMITS.max_subscribers_per_stream
    total: int = _LIMITS.max_subscribers
    reconcile_interval: float = _SERVER.reconcile_interval

    @classmethod
    def from_settings(cls, settings: Settings) -> HubLimits:
        lim, server = settings.limits, settings.server
        return cls(
            buffer=lim.subscriber_buffer,
            buffer_bytes=lim.subscriber_buffer_bytes,
            page=lim.max_page_limit,
            page_bytes=lim.max_page_bytes,
            per_stream=lim.max_subscribers_per_stream,
            total=lim.max_subscribers,
            reconcile_interval=server.reconcile_interval,
        )
