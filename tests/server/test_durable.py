"""The Durable Streams endpoint's own rules: auth, limits, browser safety, and event streams
read through it (one log, two dialects). The protocol itself is the official suite's job
(tests/durable)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runstream.app import build_app
from runstream.config import Token
from tests.server.live import make_settings, serve_in_thread

JSON = {"Content-Type": "application/json"}


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    backend = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'd.db'}"
    settings = make_settings(
        backend=backend, workers=0, ds_long_poll=5.0, limit_max_body_bytes=1000
    )
    with serve_in_thread(build_app(settings), settings) as base:
        yield base


def offset(position: int) -> str:
    return f"{0:016d}_{position:016d}"


def test_an_event_stream_reads_as_a_json_stream_and_follows_live(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        events = [
            {"type": "stdout", "data": {"line": "a"}},
            {"type": "stdout", "data": {"line": "b"}},
        ]
        assert http.post("/v1/streams/build-7/events", json=events).status_code == 201
        first = http.get("/v1/stream/build-7")
        assert first.status_code == 200 and first.headers["content-type"] == "application/json"
        assert [(m["id"], m["data"]) for m in first.json()] == [
            (1, {"line": "a"}),
            (2, {"line": "b"}),
        ]
        assert first.headers["stream-next-offset"] == offset(2)
        # Resume after event 1 exactly; then wait live for an append made meanwhile.
        assert [m["id"] for m in http.get(f"/v1/stream/build-7?offset={offset(1)}").json()] == [2]

        def later() -> None:  # before or while the long-poll waits: it gets it either way
            httpx.post(f"{url}/v1/streams/build-7/events", json={"type": "tick", "data": 3})
            httpx.post(f"{url}/v1/streams/build-7/close", json={"status": "done"})

        threading.Thread(target=later).start()
        seen, at = [], offset(2)
        while True:  # long-poll until the stream is closed
            live = http.get(f"/v1/stream/build-7?offset={at}&live=long-poll")
            assert live.status_code in (200, 204)
            seen += [m["type"] for m in live.json()] if live.status_code == 200 else []
            at = live.headers["stream-next-offset"]
            if live.headers.get("stream-closed") == "true":
                break
        assert seen == ["tick", "end"] and at == offset(4)
        # Read-only here: the native API writes it.
        assert http.post("/v1/stream/build-7", headers=JSON, content=b"{}").status_code == 405
        assert http.delete("/v1/stream/build-7").status_code == 405
        assert http.put("/v1/stream/build-7", headers=JSON).status_code == 409
        assert http.get("/v1/streams/build-7/events?after=0").status_code == 200


def test_runstream_names_are_read_only(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        for method in ("PUT", "POST", "DELETE"):
            r = http.request(method, "/v1/stream/runstream:mine", headers=JSON, content=b"{}")
            assert r.status_code == 405, method
        assert http.get("/v1/stream/runstream:mine").status_code == 404


def test_bodies_over_the_limit_are_refused_and_nothing_is_stored(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.put("/v1/stream/big", headers={"Content-Type": "text/plain"}).status_code == 201
        r = http.post("/v1/stream/big", headers={"Content-Type": "text/plain"}, content=b"x" * 1001)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert http.get("/v1/stream/big").content == b""
        ok = http.post(
            "/v1/stream/big", headers={"Content-Type": "text/plain"}, content=b"x" * 1000
        )
        assert ok.status_code == 204


def test_cross_origin_writes_are_refused_like_the_native_api(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        evil = {"Content-Type": "text/plain", "Origin": "https://evil.example"}
        assert http.put("/v1/stream/x", headers=evil).status_code == 403
        assert http.get("/v1/stream/x").status_code == 404
        r = http.put("/v1/stream/x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 201 and r.headers["x-content-type-options"] == "nosniff"


def test_tokens_and_scopes_apply(tmp_path: Path) -> None:
    tokens = (Token("rw", frozenset({"read", "write"})), Token("ro", frozenset({"read"})))
    settings = make_settings(backend="memory://", workers=0, tokens=tokens)
    with (
        serve_in_thread(build_app(settings), settings) as base,
        httpx.Client(base_url=base) as http,
    ):
        plain = {"Content-Type": "text/plain"}
        assert http.put("/v1/stream/s", headers=plain).status_code == 401
        ro = {**plain, "Authorization": "Bearer ro"}
        assert http.put("/v1/stream/s", headers=ro).status_code == 403
        rw = {**plain, "Authorization": "Bearer rw"}
        assert http.put("/v1/stream/s", headers=rw, content=b"hi").status_code == 201
        assert http.get("/v1/stream/s").status_code == 401
        assert http.get("/v1/stream/s", headers={"Authorization": "Bearer ro"}).text == "hi"
