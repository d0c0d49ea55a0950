"""The whole runstream application: the HTTP service plus the runs layer and the web UI.

:func:`build_app` is what ``runstream serve`` and ``runstream demo`` run; it
composes the layers that know nothing of each other (``server`` for streams,
``runs`` for tasks and workers, ``ui`` for the page) in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from runstream.config import Settings
from runstream.server.app import create_app
from runstream.server.durable import DurableService, engine_store
from runstream.server.ops import OpsAPI
from runstream.server.runs import RunsAPI
from runstream.server.ui import router as ui_router

__all__ = ["build_app"]


def build_app(
    settings: Settings, *, ops_options: Mapping[str, Any] | None = None, **runs_options: Any
) -> FastAPI:
    """The full app for ``settings``; ``runs_options`` go to :class:`RunsAPI`,
    ``ops_options`` to :class:`OpsAPI` (deletion, retention, storage bounds).

    Raises :class:`~runstream.errors.ConfigError` for an invalid task declaration.
    """
    runs = RunsAPI.from_settings(settings, **runs_options)
    ops = OpsAPI(runs, **(ops_options or {}))
    durable = DurableService(engine_store)
    app = create_app(
        settings,
        routers=[runs.router, ops.router, ui_router],
        on_startup=[runs.startup, ops.startup, durable.startup],
    )
    durable.install(app)
    app.state.runs = runs
    app.state.ops = ops
    app.state.durable = durable
    return app
