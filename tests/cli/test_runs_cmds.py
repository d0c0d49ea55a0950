"""``runstream ls``, ``show``, ``cancel`` on the local store (no server running)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from runstream.backends import open_run_store
from runstream.cli.runs_cmds import run_details, runs_table
from runstream.runs.model import RunRecord, new_run_id
from tests.cli.conftest import cli, py, run_id_from


async def test_ls_and_show_see_runs_recorded_by_run(tmp_path: Path) -> None:
    env = {"RUNSTREAM_BACKEND": f"sqlite:///{tmp_path / 'local.db'}"}
    ok = await cli("run", "--", *py("print('hi')"), cwd=tmp_path, env=env)
    bad = await cli("run", "--", *py("import sys; sys.exit(4)"), cwd=tmp_path, env=env)
    ok_id, bad_id = run_id_from(ok.stderr), run_id_from(bad.stderr)

    listing = await cli("ls", "--json", cwd=tmp_path, env=env)
    assert listing.code == 0, listing.err
    runs = json.loads(listing.out)["runs"]
    assert [(r["id"], r["status"], r["exit_code"]) for r in runs] == [
        (bad_id, "failed", 4),
        (ok_id, "succeeded", 0),
    ]

    failed_only = await cli("ls", "--status", "failed", cwd=tmp_path, env=env)
    assert bad_id in failed_only.out
    assert ok_id not in failed_only.out
    assert "sys.exit(4)" in failed_only.out  # the command column

    shown = await cli("show", ok_id, "--json", cwd=tmp_path, env=env)
    record = json.loads(shown.out)
    assert record["params"]["argv"][-1] == "print('hi')"
    assert record["stream_info"]["status"] == "closed"
    assert record["exit_code"] == 0


async def test_show_and_cancel_of_an_unknown_run_fail_cleanly(tmp_path: Path) -> None:
    env = {"RUNSTREAM_BACKEND": f"sqlite:///{tmp_path / 'nothing-here.db'}"}
    listing = await cli("ls", cwd=tmp_path, env=env)
    assert listing.code == 0
    assert "no runs" in listing.out
    assert not (tmp_path / "nothing-here.db").exists()  # looking creates nothing
    shown = await cli("show", "run-nope", cwd=tmp_path, env=env)
    assert shown.code == 1
    assert shown.err.startswith("runstream: ")


async def test_cancel_of_a_queued_local_run_ends_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'local.db'}"
    store = open_run_store(url)
    await store.start()
    record = RunRecord(new_run_id(), "later", {}, "queued", time.time())
    try:
        await store.create(record)
    finally:
        await store.aclose()
    result = await cli("cancel", record.id, "--backend", url, cwd=tmp_path)
    assert result.code == 0, result.err
    assert f"{record.id} cancelled" in result.out
    again = await cli("cancel", record.id, "--backend", url, cwd=tmp_path)
    assert "already finished" in again.out or "cancelled" in again.out


def test_table_keeps_every_column_but_the_summary_on_narrow_terminals() -> None:
    from rich.console import Console

    run = RunRecord(new_run_id(), "cmd", {"argv": ["echo", "x" * 200]}, "queued", time.time())
    console = Console(width=80, force_terminal=False)
    with console.capture() as capture:
        console.print(runs_table([run.to_json()], 80))
    header = capture.get().splitlines()[0]
    for column in ("RUN", "TASK", "STATUS", "EXIT", "CREATED", "DURATION"):
        assert column in header
    console = Console(width=140, force_terminal=False)
    with console.capture() as capture:
        console.print(runs_table([run.to_json()], 140))
    text = capture.get()
    assert "echo xxx" in text
    assert "…" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 140
    with console.capture() as capture:
        console.print(run_details(run.to_json()))
    assert "queued" in capture.get()


def test_show_says_why_a_queued_run_waits() -> None:
    from rich.console import Console

    extra = {"waiting": "free memory 1.0 GiB < 2.0 GiB"}
    run = RunRecord(new_run_id(), "heavy", {}, "queued", time.time(), extra=extra)
    console = Console(width=140, force_terminal=False)
    with console.capture() as capture:
        console.print(run_details(run.to_json()))
    assert "for resources: free memory 1.0 GiB < 2.0 GiB" in capture.get()
    started = RunRecord(new_run_id(), "heavy", {}, "running", time.time(), extra=extra)
    assert "waiting" not in started.to_json()
