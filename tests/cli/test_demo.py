"""``runstream demo``: the README's first command, on a fresh directory with nothing set."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import httpx
import pytest

from tests.cli.conftest import cli, finish, read_until, start_cli


@pytest.mark.timeout(90)
async def test_demo_once_shows_live_runs_says_where_the_ui_is_and_exits_0(
    tmp_path: Path,
) -> None:
    result = await cli("demo", "--once", "--steps", "3", "--delay", "0", cwd=tmp_path)
    assert result.code == 0, result.err
    out = result.out
    ui = re.search(r"Web UI\s+(http://127\.0\.0\.1:\d+/)", out)
    assert ui is not None, out
    page = re.search(r"This run\s+(http://127\.0\.0\.1:\d+/#/runs/(run-\w+))", out)
    assert page is not None, out
    assert page.group(1).startswith(ui.group(1))
    # The command task's output, colours and all, and the Python task's lines.
    for i in range(1, 4):
        assert f"module_0{i} \x1b[32mok\x1b[0m" in out
        assert f"chunk {i}/3" in out
    assert "warning\x1b[0m: module_02" in result.err
    assert out.count("succeeded") == 2
    # Everything went to the default SQLite file in the working directory.
    assert (tmp_path / ".runstream" / "runstream.db").exists()
    listing = await cli("ls", "--json", cwd=tmp_path)
    runs = json.loads(listing.out)["runs"]
    assert sorted(r["task"] for r in runs) == ["demo-build", "demo-progress"]
    assert page.group(2) in {r["id"] for r in runs}


@pytest.mark.timeout(90)
async def test_demo_serves_the_ui_until_ctrl_c(tmp_path: Path) -> None:
    proc = await start_cli("demo", "--steps", "1", "--delay", "0", cwd=tmp_path)
    assert proc.stdout is not None
    shown = (await read_until(proc.stdout, b"serving until Ctrl-C", timeout=60)).decode()
    ui = re.search(r"Web UI\s+(http://127\.0\.0\.1:\d+/)", shown)
    assert ui is not None, shown
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(ui.group(1))
        runs = await http.get(ui.group(1) + "v1/runs")
    assert page.status_code == 200
    assert "<title>runstream</title>" in page.text
    assert len(runs.json()["runs"]) == 2
    proc.send_signal(signal.SIGINT)
    result = await finish(proc)
    assert result.code == 0, result.err
