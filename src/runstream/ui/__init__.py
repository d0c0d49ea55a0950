"""The web UI: static files (no build step) served by ``runstream serve`` at ``/``."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
INDEX_HTML = STATIC_DIR / "index.html"

__all__ = ["INDEX_HTML", "STATIC_DIR"]
