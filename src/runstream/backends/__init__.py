"""Storage engines behind one URL: ``memory://``, ``sqlite:///path``, ``redis://host:port/db``.

:data:`SCHEMES` is the one table from URL schemes to engine packages (each a
folder under ``backends/`` defining ``ENGINE``, see
:mod:`runstream.backends.engine`). Adding an engine is one folder and one line
here. Engine packages are imported when first used, so an engine whose
optional dependency is missing costs nothing until a URL names it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from runstream.backends.base import EventLog, Notifier
from runstream.backends.engine import Engine
from runstream.errors import ConfigError
from runstream.redact import mask_secrets

if TYPE_CHECKING:
    from runstream.runs.store import RunStore

DEFAULT_BACKEND_URL = "sqlite:///./.runstream/runstream.db"

SCHEMES: dict[str, tuple[str, str | None]] = {
    # scheme: (engine package, the pip extra its dependencies come with)
    "memory": ("runstream.backends.memory", None),
    "sqlite": ("runstream.backends.sqlite", None),
    "redis": ("runstream.backends.redis", "redis"),
    "rediss": ("runstream.backends.redis", "redis"),
}

__all__ = [
    "DEFAULT_BACKEND_URL",
    "SCHEMES",
    "Engine",
    "EventLog",
    "Notifier",
    "engine_for",
    "open_backend",
    "open_run_store",
]


def engine_for(url: str) -> Engine:
    """The engine serving ``url``.

    Raises :class:`ConfigError` for an unknown scheme or a missing optional
    dependency, saying what to install.
    """
    scheme = urlsplit(url).scheme.lower()
    entry = SCHEMES.get(scheme)
    if entry is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"unknown backend URL {mask_secrets(url)!r}: use one of {known}")
    package, extra = entry
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        if extra is None:
            raise
        raise ConfigError(
            f"the {scheme} backend needs the {extra!r} extra: pip install 'runstream[{extra}]' "
            f"({exc})"
        ) from exc
    engine: Engine = module.ENGINE
    return engine


def open_backend(url: str = DEFAULT_BACKEND_URL) -> EventLog:
    """Create (not start) the event log named by ``url``; use it with ``async with``.

    Raises :class:`ConfigError` for an unknown scheme, an invalid URL or a
    missing optional dependency.
    """
    return engine_for(url).open_log(url)


def open_run_store(url: str) -> RunStore:
    """Create (not start) the run store on the backend URL ``url`` (the event log's URL)."""
    return engine_for(url).open_run_store(url)
