"""The official Durable Streams clients against a real ``runstream serve``, through faults.

* The TypeScript client (npm ``@durable-streams/client``, ``follow.mjs``) and the Python
  client (PyPI ``durable-streams``) follow a *run* (its event stream, read through
  ``/v1/stream/<run id>``) live to its ``end`` event through the fault proxy, which
  resets, truncates and fragments their connections: every line the command printed
  arrives exactly once, in order.
* A DS stream written by an idempotent producer is followed by both clients while the
  SQLite server is ``kill -9``-ed and restarted mid-stream: every acknowledged message
  arrives exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable_streams import astream

from tests.chaos.harness import PY
from tests.client.faultproxy import FaultProxy, random_plan
from tests.durable.conftest import NPM_DIR, WorkerServe, npx

LINES = 500
FAULTS = ("reset", "truncate", "accept_close", "fragment")
COUNT = f"import time; [print(i, flush=True) or time.sleep(0.004) for i in range({LINES})]"


def config(directory: Path) -> Path:
    path = directory / "runstream.toml"
    path.write_text(
        f'[tasks.count]\ncommand = [{json.dumps(PY)}, "-c", {json.dumps(COUNT)}]\ntimeout = 120\n'
    )
    return path


async def ts_follow(url: str, live: str) -> list[Any]:
    """Items the TypeScript client delivered, in order."""
    proc = await asyncio.create_subprocess_exec(
        node(),
        str(NPM_DIR / "follow.mjs"),
        url,
        live,
        cwd=NPM_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert lines and lines[-1].get("follow") == "done", lines[-3:]
    return lines[:-1]


async def py_follow(url: str, live: str, until: Any) -> list[Any]:
    """Items the Python client delivered; on any error it resumes from its last offset."""
    items: list[Any] = []
    offset = "-1"
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            try:
                async with astream(url, offset=offset, live=live, client=http) as res:
                    async for batch in res.iter_json_batches():
                        items += batch
                        if live == "long-poll":
                            offset = res.offset
                        if until(items):
                            return items
                    offset = res.offset
            except (httpx.HTTPError, ValueError, Exception) as exc:
                if "StreamNotFound" in type(exc).__name__:
                    raise
                await asyncio.sleep(0.02)
                if live == "sse":
                    offset = f"{0:016d}_{items[-1]['id']:016d}" if items else "-1"


def node() -> str:
    npx()  # skips or fails without Node.js; installs the packages
    path = shutil.which("node")
    assert path is not None
    return path


def stdout_lines(items: list[Any]) -> list[str]:
    return [i["data"]["line"] for i in items if i["type"] == "stdout"]


def assert_exact_run(items: list[Any]) -> None:
    ids = [i["id"] for i in items]
    assert ids == list(range(1, len(ids) + 1)), "events lost, duplicated or reordered"
    assert items[-1]["type"] == "end"
    assert stdout_lines(items) == [str(i) for i in range(LINES)]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_official_clients_follow_a_run_to_its_end_through_faults(tmp_path: Path) -> None:
    npx()
    server = WorkerServe(f"sqlite:///{tmp_path / 'ds.db'}", tmp_path, config=config(tmp_path))
    await server.start()
    proxy = FaultProxy("127.0.0.1", server.port, seed=16)
    proxy.plan = random_plan(proxy.rng, fault_rate=0.6, kinds=FAULTS, max_at=3000)
    await proxy.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            created = await http.post("/v1/runs", json={"task": "count"})
            assert created.status_code in (200, 201, 202), created.text
            run = created.json()["id"]
        url = f"{proxy.url}/v1/stream/{run}"
        ended = lambda items: bool(items) and items[-1]["type"] == "end"  # noqa: E731
        results = await asyncio.gather(
            ts_follow(url, "sse"),
            ts_follow(url, "long-poll"),
            py_follow(url, "long-poll", ended),
            py_follow(url, "sse", ended),
        )
        followers = ("ts sse", "ts long-poll", "py long-poll", "py sse")
        for who, items in zip(followers, results, strict=True):
            print(who, len(items), "items; faults:", dict(proxy.injected))
            assert_exact_run(items)
        assert proxy.faults_injected > 0
    finally:
        await proxy.aclose()
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_clients_resume_after_kill_9_of_the_sqlite_server(tmp_path: Path) -> None:
    npx()
    server = WorkerServe(f"sqlite:///{tmp_path / 'ds.db'}", tmp_path, workers=0)
    await server.start()
    total = 200
    url = f"{server.url}/v1/stream/chat/kill9"
    async with httpx.AsyncClient(timeout=3) as http:
        put = await http.put(url, headers={"Content-Type": "application/json"})
        assert put.status_code == 201

        async def produce() -> None:
            rng = random.Random(9)
            for seq in range(total):
                headers = {
                    "Content-Type": "application/json",
                    "Producer-Id": "writer",
                    "Producer-Epoch": "0",
                    "Producer-Seq": str(seq),
                }
                while True:  # unacknowledged: retry the same seq (the server dedupes)
                    try:
                        r = await http.post(url, headers=headers, json={"i": seq})
                        if r.status_code in (200, 204):
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.02)
                await asyncio.sleep(rng.uniform(0, 0.01))

        async def crash() -> None:
            while True:  # wait until about half is stored, then kill -9 and restart
                head = await http.head(url)
                if int(head.headers["stream-next-offset"].split("_")[1]) >= total // 2:
                    break
                await asyncio.sleep(0.02)
            server.kill()
            await asyncio.sleep(0.3)
            await server.start()

        done = lambda items: len(items) >= total  # noqa: E731
        try:
            _, _, ts_items, py_items = await asyncio.gather(
                produce(),
                crash(),
                ts_follow_until(url, total),
                py_follow(url, "long-poll", done),
            )
        finally:
            server.stop()
    expected = [{"i": i} for i in range(total)]
    assert py_items == expected
    assert ts_items == expected
    assert server.starts == 2


async def ts_follow_until(url: str, total: int) -> list[Any]:
    """The TypeScript client until ``total`` items (the stream is never closed here)."""
    proc = await asyncio.create_subprocess_exec(
        node(),
        str(NPM_DIR / "follow.mjs"),
        url,
        "long-poll",
        cwd=NPM_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    items: list[Any] = []
    try:
        while len(items) < total:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
            assert line, "the TypeScript client stopped early"
            items.append(json.loads(line))
    finally:
        proc.kill()
        await proc.wait()
    return items
