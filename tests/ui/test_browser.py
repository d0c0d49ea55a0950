"""The web UI in a real browser (Debian's Chromium driven by Playwright) against real servers.

Screenshots go to ``test-artifacts/ui/``. Without Chromium these tests skip,
unless ``RUNSTREAM_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# What the task writes: numbered lines with ANSI colours on stdout, a few on stderr.
WRITER = textwrap.dedent(
    """
    import sys, time
    n, delay = int(sys.argv[1]), float(sys.argv[2])
    for i in range(n):
        if i % 50 == 49:
            print(f"warn {i:04d}", file=sys.stderr, flush=True)
        print(f"line {i:04d} \\x1b[32mok\\x1b[0m {'x' * (i % 7)}", flush=True)
        time.sleep(delay)
    """
)


def expected_writer_output(n: int) -> list[str]:
    out: list[str] = []
    for i in range(n):
        if i % 50 == 49:
            out.append(f"warn {i:04d}")
        out.append(f"line {i:04d} \x1b[32mok\x1b[0m {'x' * (i % 7)}")
    return out


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("RUNSTREAM_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required here (apt-get install chromium) but not found")
        pytest.skip("Chromium not installed (Debian package 'chromium')")
    return path


@dataclass
class ServeProcess:
    """``runstream serve`` as a real process the test can kill -9 and restart."""

    config: Path
    db_url: str
    workers: int
    token: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "runstream.cli.main", "serve",
            "--config", str(self.config), "--backend", self.db_url,
            "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
        if self.token is not None:
            env["RUNSTREAM_TOKEN"] = self.token
        log = open(self.config.parent / f"serve-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=env)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling another process's readiness; nothing to await
        raise RuntimeError("serve did not become ready")

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


BIG = "import sys\nsys.stdout.write(''.join(f'row {i}\\n' for i in range(int(sys.argv[1]))))\n"


def write_config(tmp_path: Path) -> Path:
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    (tmp_path / "big.py").write_text(BIG)
    config = tmp_path / "runstream.toml"
    py = sys.executable.replace("\\", "/")
    config.write_text(
        textwrap.dedent(
            f"""
            [tasks.sleeper]
            command = ["{py}", "-c", "import time; print('sleeping', flush=True); time.sleep(120)"]
            grace = 1

            [tasks.big]
            command = ["{py}", "{tmp_path / "big.py"}", "{{n}}"]
            params = {{ n = {{ type = "integer", default = 100000 }} }}
            """
        )
    )
    return config


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []
    config = write_config(tmp_path)
    db_url = f"sqlite:///{tmp_path / 'rs.db'}"

    def make(workers: int, token: str | None = None) -> ServeProcess:
        sp = ServeProcess(config, db_url, workers, token)
        sp.start()
        started.append(sp)
        return sp

    yield make
    for sp in started:
        sp.stop()


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    executable = chromium_path()
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        # Every test also checks that the page works under its Content-Security-Policy:
        # anything the policy blocks is reported here and fails the test.
        await context.add_init_script(
            "window.__cspViolations = [];"
            "document.addEventListener('securitypolicyviolation', (e) =>"
            " window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        pg = await context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        yield pg
        violations = await pg.evaluate("window.__cspViolations || []")
        await browser.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"
        assert violations == [], f"Content-Security-Policy violations: {violations}"


async def wait_js(page: Any, expr: str, seconds: float = 30.0) -> Any:
    """Wait until ``expr`` is truthy in the page; return its value."""
    # As a function, not a bare expression: Playwright would eval() that in the page,
    # which the page's Content-Security-Policy (rightly) refuses.
    handle = await page.wait_for_function(f"() => ({expr})", timeout=seconds * 1000)
    return await handle.json_value()


async def test_run_page_log_survives_server_kill_and_restart_line_for_line(
    serve_factory: Any, page: Any, tmp_path: Path
) -> None:
    server = serve_factory(0)  # API + UI only; the run executes in its own CLI process
    lines, delay = 240, 0.02
    runner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runstream.cli.main", "run", "--backend", server.db_url, "--",
        sys.executable, "-u", str(tmp_path / "writer.py"), str(lines), str(delay),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url) as http:
        run_id = ""
        for _ in range(200):
            runs = (await http.get("/v1/runs")).json()["runs"]
            if runs:
                run_id = runs[0]["id"]
                break
            await asyncio.sleep(0.05)  # the CLI process records the run; poll the API for it
        assert run_id, "the CLI run never showed up in the server's list"

    await page.goto(f"{server.url}/#/runs/{run_id}")
    await wait_js(page, "window.__runstream.lines().length > 20")
    await page.screenshot(path=str(ARTIFACTS / "run-live.png"))

    server.kill()  # kill -9 mid-run: the page loses its connection
    await wait_js(page, "!document.getElementById('conn').classList.contains('live')")
    server.start()  # same port, same SQLite file

    await wait_js(page, "window.__runstream.ended()", seconds=60)
    _, err = await runner.communicate()
    assert runner.returncode == 0, err.decode()
    got = await page.evaluate("window.__runstream.lines()")
    texts = [ln["text"] for ln in got if ln["stream"] in ("stdout", "stderr")]
    assert sorted(texts) == sorted(expected_writer_output(lines))
    stdout_only = [ln["text"] for ln in got if ln["stream"] == "stdout"]
    assert stdout_only == [t for t in expected_writer_output(lines) if t.startswith("line")]
    assert await page.evaluate("window.__runstream.status()") == "succeeded"
    await page.screenshot(path=str(ARTIFACTS / "run-after-restart.png"))
    # Colours are rendered, not shown as escape codes.
    assert await page.locator("#log-rows .row span[style*='color']").count() > 0
    assert "\\x1b" not in await page.locator("#log-rows").inner_text()


async def test_runs_list_updates_live_and_cancel_button_cancels(
    serve_factory: Any, page: Any
) -> None:
    server = serve_factory(2)
    await page.goto(server.url + "/")
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/v1/runs", json={"task": "sleeper", "params": {}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
    row = page.locator(f"tr[data-run='{run_id}']")
    await row.locator(".badge.s-running").wait_for(timeout=30_000)
    await page.screenshot(path=str(ARTIFACTS / "runs-list.png"))
    await row.locator("a").click()
    await wait_js(page, "window.__runstream.lines().some(l => l.text === 'sleeping')")
    await page.click("#btn-cancel")
    await wait_js(page, "window.__runstream.ended()")
    assert await page.evaluate("window.__runstream.status()") == "cancelled"
    await page.screenshot(path=str(ARTIFACTS / "run-cancelled.png"))
    await page.goto(server.url + "/#/")
    await row.locator(".badge.s-cancelled").wait_for(timeout=10_000)


async def test_hundred_thousand_line_log_keeps_the_dom_small_and_searchable(
    serve_factory: Any, page: Any
) -> None:
    server = serve_factory(1)
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/v1/runs", json={"task": "big", "params": {"n": 100_000}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
    await page.goto(f"{server.url}/#/runs/{run_id}")
    await wait_js(page, "window.__runstream.ended()", seconds=90)
    count = await page.evaluate(
        "window.__runstream.lines().filter(l => l.stream === 'stdout').length"
    )
    assert count == 100_000
    rows_in_dom = await page.locator("#log-rows .row").count()
    assert 0 < rows_in_dom < 300, "the log view must render only what is visible"
    await page.fill("#log-search", "row 77777")
    await wait_js(page, "document.getElementById('search-info').textContent === '1 matches'")
    await page.click("#search-next")
    await page.locator("#log-rows .row.cur").filter(has_text="row 77777").wait_for(timeout=10_000)
    assert not await page.is_checked("#follow-tail")  # jumping to a match stops following
    await page.screenshot(path=str(ARTIFACTS / "run-100k-search.png"))


async def test_token_never_appears_in_a_url_and_leaves_the_address_bar(
    serve_factory: Any, page: Any
) -> None:
    token = "ui-t0ken-5e3b9c1d"
    server = serve_factory(1, token=token)
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth) as http:
        assert (await http.get("/v1/runs", headers={"Authorization": ""})).status_code == 401
        r = await http.post("/v1/runs", json={"task": "big", "params": {"n": 3000}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
    urls: list[str] = []
    ws_frames: list[int] = []

    def on_websocket(ws: Any) -> None:
        urls.append(ws.url)
        ws.on("framereceived", lambda payload: ws_frames.append(len(payload)))

    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", on_websocket)

    await page.goto(f"{server.url}/?token={token}#/runs/{run_id}")
    await wait_js(page, "window.__runstream.ended()", seconds=60)
    stdout = "window.__runstream.lines().filter(l => l.stream === 'stdout').length"
    assert await page.evaluate(stdout) == 3000
    assert await page.evaluate("window.__runstream.mode()") == "ws"
    assert ws_frames, "the log must have come over the WebSocket"
    # The address bar lost the token but kept the route; history has no entry with it.
    assert await page.evaluate("location.search") == ""
    assert await page.evaluate("location.hash") == f"#/runs/{run_id}"
    assert await page.evaluate("localStorage.getItem('runstream.token')") == token
    await page.go_back()
    assert page.url == "about:blank"
    await page.go_forward()
    assert page.url == f"{server.url}/#/runs/{run_id}"

    # A fresh load takes the token from storage; the list works with it.
    await page.goto(f"{server.url}/#/")
    await page.locator(f"tr[data-run='{run_id}'] .badge.s-succeeded").wait_for(timeout=30_000)
    assert any("/v1/runs" in u for u in urls) and any("/ws" in u for u in urls)
    # Only the link the user opened carried it; nothing the page requested did.
    opened = f"{server.url}/?token={token}"
    leaked = [u for u in urls if token in u and u != opened]
    assert leaked == [], f"the page put the token in a URL: {leaked}"
    assert urls.count(opened) == 1


async def test_delete_button_asks_first_then_deletes_the_run(serve_factory: Any, page: Any) -> None:
    server = serve_factory(1)
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/v1/runs", json={"task": "big", "params": {"n": 10}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        await page.goto(f"{server.url}/#/runs/{run_id}")
        await wait_js(page, "window.__runstream.ended()")

        await page.click("#btn-delete")
        await page.locator("#delete-dialog[open]").wait_for(timeout=10_000)
        assert run_id in await page.locator("#delete-title").inner_text()
        await page.screenshot(path=str(ARTIFACTS / "run-delete-dialog.png"))
        await page.click("#delete-keep")  # changing one's mind deletes nothing
        await wait_js(page, "!document.getElementById('delete-dialog').open")
        assert (await http.get(f"/v1/runs/{run_id}")).status_code == 200

        await page.click("#btn-delete")
        await page.click("#delete-confirm")
        await wait_js(page, "location.hash === '#/'")
        assert (await http.get(f"/v1/runs/{run_id}")).status_code == 404
        assert (await http.get(f"/v1/streams/{run_id}")).status_code == 404
    await page.locator("#runs-empty").wait_for(timeout=10_000)
    assert await page.locator(f"tr[data-run='{run_id}']").count() == 0
