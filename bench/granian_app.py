"""The runstream app for another ASGI server (bench only): ``granian --factory ...:app``.

Settings come from the environment (``RUNSTREAM_BACKEND`` ...). The server's own
connection guard and prompt shutdown (``runstream.server.serve``) are uvicorn's
and are not part of this app: it measures the HTTP server's share of a request.
"""

from __future__ import annotations

from typing import Any

from runstream.app import build_app
from runstream.config import load_settings


def app() -> Any:
    return build_app(load_settings())
