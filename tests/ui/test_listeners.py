"""Standard SSE clients that subscribe before the first append get every event, through faults.

Issue 15's proof: a browser ``EventSource`` (Debian's Chromium driven by
Playwright) and npm ``eventsource`` open ``GET /v1/streams/NAME/events``
before the stream exists; the response opens at once (``open`` fires), then
2,000 events are appended and the stream closed. Both read through the chaos
harness's proxy (:class:`tests.chaos.harness.ChaosProxy`), which resets,
truncates, fragments and refuses their connections and resets a live one every
50-500 ms, and must receive every event exactly
once, in order, with the ids ``<epoch>:1`` .. ``<epoch>:2000``, then stop on
their own (the reconnect after the end event gets ``204``).

npm packages come from the registry through ``tests/ui/eventsource/package-lock.json``
(``npm ci`` runs when ``node_modules`` is missing). Without Chromium or Node these
tests skip, unless ``RUNSTREAM_REQUIRE_BROWSER=1`` makes that a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.harness import ChaosProxy
from tests.client.conftest import LiveServer, start_server, stop_server
from tests.client.faultproxy import Fault, random_plan
from tests.ui.test_browser import CHROMIUM_ARGS, chromium_path

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

EVENTS = 2000
BATCH = 50
NPM_DIR = Path(__file__).with_name("eventsource")
FAULTS = ("reset", "truncate", "accept_close", "fragment")
"""What networks do to a connection. Not ``stall`` (a plain EventSource has no watchdog:
it would wait forever, which is the SDK's reason to exist) and not ``garbage`` (junk
frames with an ``id:`` line would set a browser's last id to junk: not a network fault)."""


def node_path() -> str:
    path = shutil.which("node")
    if path is None or shutil.which("npm") is None:
        if os.environ.get("RUNSTREAM_REQUIRE_BROWSER"):
            pytest.fail("Node.js and npm are required here but not found")
        pytest.skip("Node.js / npm not installed")
    if not (NPM_DIR / "node_modules" / "eventsource").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NPM_DIR, check=True, timeout=300
        )
    return path


@pytest.fixture
async def server() -> AsyncIterator[LiveServer]:
    live, task, handle = await start_server(retry_ms=20, keepalive=0.5)
    try:
        yield live
    finally:
        await stop_server(task, handle)


@pytest.fixture
async def proxy(server: LiveServer) -> AsyncIterator[ChaosProxy]:
    """The chaos harness's proxy: each event-stream connection gets a planned fault (or
    none), and a live connection is reset every 50-500 ms while events are published."""
    fp = ChaosProxy(server.port, seed=15)
    faulty = random_plan(fp.rng, fault_rate=0.5, kinds=FAULTS, max_at=30_000)
    # Only event streams are broken (not the page load).
    fp.plan = lambda head: faulty(head) if b"text/event-stream" in head.lower() else Fault()
    await fp.start()
    try:
        yield fp
    finally:
        await fp.aclose()


async def publish_all(server: LiveServer, proxy: ChaosProxy, stream: str) -> str:
    """Append EVENTS ticks in batches over ~3 s, resets landing among them; close."""
    proxy.start_chaos()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        epoch = ""
        for start in range(0, EVENTS, BATCH):
            body = [{"type": "tick", "data": {"i": i}} for i in range(start, start + BATCH)]
            r = await http.post(f"/v1/streams/{stream}/events", json=body)
            assert r.status_code == 201, r.text
            epoch = r.json()["epoch"]
            await asyncio.sleep(0.075)  # the publisher's pace
        await proxy.stop_chaos()
        r = await http.post(f"/v1/streams/{stream}/close", json={"status": "done"})
        assert r.status_code == 200, r.text
    return epoch


def check(got: list[list[Any]], end: Any, epoch: str) -> None:
    assert [i for _, i in got] == list(range(EVENTS)), "lost, duplicated or reordered"
    assert [last_id for last_id, _ in got] == [f"{epoch}:{n}" for n in range(1, EVENTS + 1)]
    assert end is not None and end[0] == f"{epoch}:{EVENTS + 1}"
    assert end[1] == {"status": "done", "reason": None}


async def test_browser_event_source_subscribed_first_gets_all_2000_once_through_faults(
    server: LiveServer, proxy: ChaosProxy
) -> None:
    executable = chromium_path()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = await (await browser.new_context(bypass_csp=True)).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{proxy.url}/healthz")
        await page.evaluate(
            """() => {
                window.__got = []; window.__opens = 0; window.__end = null;
                const es = window.__es = new EventSource('/v1/streams/browser/events');
                es.onopen = () => { window.__opens += 1; };
                es.addEventListener('tick', (e) => {
                    window.__got.push([e.lastEventId, JSON.parse(e.data).i]);
                });
                es.addEventListener('end', (e) => {
                    window.__end = [e.lastEventId, JSON.parse(e.data)];
                });
            }"""
        )
        # The stream does not exist yet, and the browser's EventSource is open.
        await page.wait_for_function("() => window.__opens >= 1", timeout=30_000)
        epoch = await publish_all(server, proxy, "browser")
        # After the end, the reconnect gets 204 and the EventSource closes for good.
        await page.wait_for_function("() => window.__es.readyState === 2", timeout=120_000)
        got = await page.evaluate("() => window.__got")
        end = await page.evaluate("() => window.__end")
        opens = await page.evaluate("() => window.__opens")
        await browser.close()
    assert errors == []
    print(f"browser EventSource: {opens} connections, faults {dict(proxy.injected)}")
    check(got, end, epoch)
    assert proxy.injected["timed_reset"] >= 3 and opens > 3, (proxy.injected, opens)


async def test_npm_eventsource_subscribed_first_gets_all_2000_once_through_faults(
    server: LiveServer, proxy: ChaosProxy
) -> None:
    node = node_path()
    url = f"{proxy.url}/v1/streams/npm/events"
    proc = await asyncio.create_subprocess_exec(
        node, str(NPM_DIR / "follow.mjs"), url, "150",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=NPM_DIR,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(first) == {"open": True}  # opened before the stream exists
        epoch = await publish_all(server, proxy, "npm")
        last = await asyncio.wait_for(proc.stdout.readline(), 170)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    result = json.loads(last)
    assert result["closed"], "the client did not stop on its own after the end"
    print(f"npm eventsource: {result['opens']} connections, faults {dict(proxy.injected)}")
    check(result["got"], result["end"], epoch)
    assert proxy.injected["timed_reset"] >= 3 and result["opens"] > 3, (proxy.injected, result)
