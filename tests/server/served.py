"""A real server per backend for synchronous tests, and a reader that uses every transport."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect as ws_connect

from runstream.app import build_app
from runstream.client import Client
from runstream.core.model import Event
from runstream.protocol.sse import SSEDecoder
from tests.server.live import make_settings, serve_in_thread

ECHO_TASK = {
    "command": [sys.executable, "-c", "import sys; print(sys.argv[1])", "{msg}"],
    "params": {"msg": {"type": "string", "max_length": 1000}},
    "timeout": 60,
}


@dataclasses.dataclass
class Served:
    url: str
    http: httpx.Client
    max_depth: int
    json: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"Content-Type": "application/json"}
    )
    _names: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def name(self, prefix: str) -> str:
        """A stream name no other test uses."""
        return f"{prefix}-{uuid.uuid4().hex[:8]}-{next(self._names)}"


BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]
"""Params of a module fixture that calls :func:`served` (its ``request.param``)."""


@contextlib.contextmanager
def served(request: pytest.FixtureRequest, **limits: Any) -> Iterator[Served]:
    """The full app (streams, runs with an ``echo`` task, UI) on the backend ``request.param``.

    Runs are queued only (no workers). ``limits`` go to ``[limits]``.
    """
    kind = request.param
    if kind == "memory":
        backend = "memory://"
    elif kind == "sqlite":
        tmp = Path(request.getfixturevalue("tmp_path_factory").mktemp("srv"))
        backend = f"sqlite:///{tmp / 'srv.db'}"
    else:
        redis = request.getfixturevalue("redis_server")
        backend = f"{redis.url}?prefix=s{uuid.uuid4().hex[:10]}"
    settings = make_settings(
        backend=backend,
        keepalive=0.5,
        long_poll_max_wait=0.05,
        workers=0,
        **{f"limit_{k}": v for k, v in limits.items()},
    )
    settings = settings.evolve(tasks={"echo": ECHO_TASK})
    with (
        serve_in_thread(build_app(settings), settings) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        yield Served(url, http, settings.limits.max_json_depth)


def read_everywhere(srv: Served, stream: str) -> dict[str, list[tuple[str, Any]]]:
    """Every user event of a *closed* stream as ``(type, data)``, read over each transport."""
    return {
        "json": _read_json(srv, stream),
        "sse": _read_sse(srv, stream),
        "ws": _read_ws(srv, stream),
        "sdk": _read_sdk(srv, stream),
    }


def _read_json(srv: Served, stream: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    after = 0
    while True:
        resp = srv.http.get(f"/v1/streams/{stream}/events", params={"after": after})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        out += [(e["type"], e["data"]) for e in page["events"] if e["type"] != "end"]
        if page["closed"]:
            return out
        assert page["next_after"] > after, page
        after = page["next_after"]


def _read_sse(srv: Served, stream: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    decoder = SSEDecoder()
    headers = {"Accept": "text/event-stream"}
    with srv.http.stream("GET", f"/v1/streams/{stream}/events", headers=headers) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_bytes():
            for message in decoder.feed(chunk):
                if message.event == "end":
                    return out
                out.append((message.event, json.loads(message.data)))
    raise AssertionError(f"SSE ended without an end event after {len(out)} events")


def _read_ws(srv: Served, stream: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    url = srv.url.replace("http://", "ws://") + f"/v1/streams/{stream}/ws"
    with ws_connect(url, open_timeout=10, close_timeout=2, max_size=None) as ws:
        try:
            while True:
                message = json.loads(ws.recv(timeout=30))
                if message["type"] == "end":
                    return out
                out.append((message["type"], message["data"]))
        except ConnectionClosedOK:
            pass
    raise AssertionError(f"WebSocket closed without an end message after {len(out)} events")


def _read_sdk(srv: Served, stream: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    with Client(srv.url) as client, client.follow(stream, after=0) as events:
        for item in events:
            assert isinstance(item, Event), item
            if item.is_end:
                return out
            out.append((item.type, item.data))
    raise AssertionError("the SDK's follow ended without the end event")
