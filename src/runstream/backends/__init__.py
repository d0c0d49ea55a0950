"""Storage backends behind one URL: ``memory://``, ``sqlite:///path``, ``redis://host:port/db``."""

from __future__ import annotations

from urllib.parse import urlsplit

from runstream.backends.base import EventLog, Notifier
from runstream.errors import ConfigError
from runstream.redact import mask_secrets

DEFAULT_BACKEND_URL = "sqlite:///./.runstream/runstream.db"

__all__ = ["DEFAULT_BACKEND_URL", "EventLog", "Notifier", "open_backend"]


def open_backend(url: str = DEFAULT_BACKEND_URL) -> EventLog:
    """Create (not start) the backend named by ``url``; use it with ``async with``.

    Raises :class:`ConfigError` for an unknown scheme or a missing optional
    dependency, saying what to install.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from runstream.backends.memory import MemoryEventLog

        return MemoryEventLog()
    if scheme == "sqlite":
        from runstream.backends.sqlite import SQLiteEventLog

        return SQLiteEventLog.from_url(url)
    if scheme in ("redis", "rediss"):
        try:
            from runstream.backends.redis import RedisEventLog
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "the redis backend needs the 'redis' extra: pip install 'runstream[redis]'"
            ) from exc
        return RedisEventLog.from_url(url)
    raise ConfigError(
        f"unknown backend URL {mask_secrets(url)!r}: use memory://, sqlite:///path/to/file.db "
        "or redis://host:port/db"
    )
