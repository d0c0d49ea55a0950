"""``runstream rm``, ``gc`` and ``status``: on the local store and against a server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from runstream.app import build_app
from tests.cli.conftest import DECLARED_TASKS, cli, py, run_id_from
from tests.server.live import make_settings, serve_in_task


async def test_rm_deletes_local_runs_by_id_and_by_filter(tmp_path: Path) -> None:
    env = {"RUNSTREAM_BACKEND": f"sqlite:///{tmp_path / 'local.db'}"}
    ok = run_id_from((await cli("run", "--", *py("print(1)"), cwd=tmp_path, env=env)).stderr)
    bad = run_id_from(
        (await cli("run", "--", *py("import sys; sys.exit(3)"), cwd=tmp_path, env=env)).stderr
    )
    usage = await cli("rm", cwd=tmp_path, env=env)
    assert usage.code == 2 and "run ids" in usage.err

    removed = await cli("rm", ok, cwd=tmp_path, env=env)
    assert removed.code == 0, removed.err
    assert f"deleted {ok} (succeeded)" in removed.out
    again = await cli("rm", ok, cwd=tmp_path, env=env)
    assert again.code == 1 and "does not exist" in again.err

    by_status = await cli("rm", "--status", "failed", "--json", cwd=tmp_path, env=env)
    assert json.loads(by_status.out) == {"deleted": [bad], "skipped": 0}
    listing = await cli("ls", "--json", cwd=tmp_path, env=env)
    assert json.loads(listing.out)["runs"] == []


async def test_gc_and_status_on_the_local_store_read_the_config(tmp_path: Path) -> None:
    db = tmp_path / "local.db"
    env = {"RUNSTREAM_BACKEND": f"sqlite:///{db}"}
    ids = [
        run_id_from((await cli("run", "--", *py("print(1)"), cwd=tmp_path, env=env)).stderr)
        for _ in range(3)
    ]
    (tmp_path / "runstream.toml").write_text("[retention]\nmax_runs = 1\n")
    status = json.loads((await cli("status", "--json", cwd=tmp_path, env=env)).out)
    assert status["engine"] == "sqlite"
    assert status["runs"]["runs"] == 3
    assert status["store"]["file_bytes"] > 0
    assert status["retention"]["max_runs"] == 1

    swept = await cli("gc", "--json", cwd=tmp_path, env=env)
    assert swept.code == 0, swept.err
    assert json.loads(swept.out)["runs_deleted"] == 2
    assert json.loads(swept.out)["full_scan"] is True
    listing = json.loads((await cli("ls", "--json", cwd=tmp_path, env=env)).out)["runs"]
    assert [r["id"] for r in listing] == [ids[-1]]
    shown = await cli("status", cwd=tmp_path, env=env)
    assert "store size" in shown.out and "max_runs" in shown.out


async def test_rm_gc_and_status_against_a_server(tmp_path: Path) -> None:
    settings = make_settings(backend=f"sqlite:///{tmp_path / 'srv.db'}", workers=2)
    settings = settings.evolve(tasks=DECLARED_TASKS)
    live = await serve_in_task(build_app(settings, shutdown_grace=1.0), settings)
    try:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            run = (await client.post("/v1/runs", json={"task": "lines"})).json()
            tail = await cli("tail", run["id"], "--server", live.url, cwd=tmp_path)
            assert tail.code == 0
            sleepy = (await client.post("/v1/runs", json={"task": "sleepy"})).json()

        server = ("--server", live.url)
        refused = await cli("rm", sleepy["id"], *server, cwd=tmp_path)
        assert refused.code == 1 and "cancel it first" in refused.err
        removed = await cli("rm", run["id"], sleepy["id"], "--force", *server, cwd=tmp_path)
        assert removed.code == 0, removed.err
        assert f"deleted {run['id']} (succeeded)" in removed.out
        assert f"deleted {sleepy['id']} (cancelled)" in removed.out

        swept = await cli("gc", "--json", *server, cwd=tmp_path)
        assert json.loads(swept.out)["runs_deleted"] == 0
        status = json.loads((await cli("status", "--json", *server, cwd=tmp_path)).out)
        assert status["engine"] == "sqlite" and status["runs"]["runs"] == 0
    finally:
        await live.stop()
