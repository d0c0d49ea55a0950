"""The UI and the API answer with browser protection headers (issue 13, row 10).

The UI page gets a Content-Security-Policy that allows no inline script and
no framing; every response gets ``nosniff``, ``X-Frame-Options: DENY`` and
``Referrer-Policy: no-referrer``. ``tests/ui/test_browser.py`` checks that
the page works under that policy in a real browser.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import httpx
import pytest

from runstream.app import build_app
from runstream.server.app import create_app
from runstream.ui import INDEX_HTML
from tests.server.live import LiveServer, make_settings, serve_in_task


@pytest.fixture
async def ui() -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings().replace(backend="memory://", workers=0)
    live: LiveServer = await serve_in_task(build_app(settings), settings)
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        yield client
    await live.stop()


def csp_directives(header: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            out[words[0].lower()] = words[1:]
    return out


def assert_protected(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


async def test_ui_page_has_a_strict_content_security_policy(ui: httpx.AsyncClient) -> None:
    r = await ui.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert_protected(r)
    csp = csp_directives(r.headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval', no hosts
    assert "'unsafe-inline'" not in csp["style-src"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"] and csp["form-action"] == ["'none'"]
    # Connections only back to this server.
    assert csp["connect-src"][0] == "'self'"
    assert all(re.fullmatch(r"wss?://127\.0\.0\.1:\d+", s) for s in csp["connect-src"][1:])


async def test_ui_assets_and_api_answers_are_not_sniffed_or_framed(ui: httpx.AsyncClient) -> None:
    for path in ("/ui/app.js", "/ui/app.css", "/ui/nope.js", "/healthz", "/v1/runs", "/metrics"):
        r = await ui.get(path)
        assert_protected(r)
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
    r = await ui.get("/ui/app.js")
    assert r.headers["content-type"].startswith("text/javascript")


async def test_refusals_carry_the_headers_too(ui: httpx.AsyncClient) -> None:
    r = await ui.get("/healthz", headers={"Host": "attacker.example"})
    assert r.status_code == 421
    assert_protected(r)
    r = await ui.post("/v1/runs", content="{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert_protected(r)


async def test_placeholder_page_without_the_ui_is_protected() -> None:
    settings = make_settings().replace(backend="memory://")
    live = await serve_in_task(create_app(settings), settings)
    try:
        async with httpx.AsyncClient(base_url=live.url) as http:
            r = await http.get("/")
            assert_protected(r)
            csp = csp_directives(r.headers["content-security-policy"])
            assert csp["default-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    finally:
        await live.stop()


class _InlineFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        self.problems += [f"{tag} {n}=" for n in names if n.startswith("on") or n == "style"]
        if tag == "style":
            self.problems.append("inline <style>")


def test_ui_page_has_nothing_inline_the_policy_would_block() -> None:
    finder = _InlineFinder()
    finder.feed(INDEX_HTML.read_text())
    assert finder.problems == []
