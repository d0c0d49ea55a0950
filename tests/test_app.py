"""``build_app`` (what ``runstream serve`` runs) serves the UI, the streams and the runs API."""

from __future__ import annotations

from pathlib import Path

import httpx

from runstream.app import build_app
from runstream.config import ServerSettings, Settings
from tests.server.live import serve_in_task


async def test_full_app_serves_ui_assets_streams_and_runs(tmp_path: Path) -> None:
    settings = Settings(
        server=ServerSettings(backend=f"sqlite:///{tmp_path / 'rs.db'}", workers=1),
        tasks={"echo": {"command": ["echo", "{word}"], "params": {"word": {"default": "hi"}}}},
    )
    live = await serve_in_task(build_app(settings), settings)
    try:
        async with httpx.AsyncClient(base_url=live.url) as http:
            page = await http.get("/")
            assert page.status_code == 200
            assert 'src="ui/app.js"' in page.text
            for asset, kind in (("app.js", "javascript"), ("app.css", "css")):
                r = await http.get(f"/ui/{asset}")
                assert r.status_code == 200 and kind in r.headers["content-type"]
            missing = await http.get("/ui/pyproject.toml")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
            tasks = (await http.get("/v1/tasks")).json()["tasks"]
            assert [t["name"] for t in tasks] == ["echo"]
            created = await http.post("/v1/runs", json={"task": "echo", "params": {"word": "yo"}})
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            page_json = (await http.get(f"/v1/runs/{run_id}/events", params={"wait": 10})).json()
            assert page_json["events"][0]["type"] == "status"
            r = await http.post("/v1/streams/s1/events", json={"type": "t", "data": 1})
            assert r.status_code == 201
    finally:
        await live.stop()
