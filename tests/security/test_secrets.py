"""Secrets stay secret (issue 13, row 8).

- ``runstream serve``'s own output (uvicorn's access log and WebSocket lines
  included) never shows a token, however the request spelled it;
- a backend URL's password is masked wherever ``serve`` or ``worker`` print it;
- a WebSocket client (the UI) authenticates without a token in the URL: the
  token rides in a subprotocol, and the server selects ``runstream``, never
  echoing the token back.
"""

from __future__ import annotations

import asyncio
import base64
import signal
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from runstream.config import Token
from tests.cli.conftest import cli, finish, start_cli
from tests.conftest import RedisServer, free_port
from tests.server.conftest import start_server  # noqa: F401 - fixture
from tests.server.live import StartServer, make_settings

TOKEN = "tok-s3cret-4f9a71"
PASSWORD = "pw-s3cret-81c2e0"


async def wait_ready(url: str, proc: asyncio.subprocess.Process, path: str = "/healthz") -> None:
    async with httpx.AsyncClient(base_url=url, timeout=1) as http:
        for _ in range(600):
            if proc.returncode is not None:
                raise AssertionError(f"serve exited with {proc.returncode}")
            try:
                if (await http.get(path)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)  # polling another process's readiness; nothing to await
    raise AssertionError("serve did not become ready")


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    result = await finish(proc)
    return result.out + result.err


def ws_token_protocols(token: str) -> list[Subprotocol]:
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    return [Subprotocol("runstream"), Subprotocol(f"runstream.bearer.{encoded}")]


async def test_access_log_never_shows_a_token(tmp_path: Path) -> None:
    port = free_port()
    proc = await start_cli(
        "serve", "--backend", "memory://", "--port", str(port), "--workers", "0",
        cwd=tmp_path, env={"RUNSTREAM_TOKEN": TOKEN, "RUNSTREAM_LOG_LEVEL": "info"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            await http.post("/v1/streams/s/events", json={"type": "x"}, headers=auth)
            for query in (
                f"token={TOKEN}",
                f"after=0&token={TOKEN}&limit=5",
                f"%74oken={TOKEN}",  # the same parameter, spelled with an escape
                f"TOKEN={TOKEN}",
                "token=wrong-token-9d7e",
            ):
                await http.get(f"/v1/streams/s/events?{query}")
            r = await http.get(f"/v1/streams/s/events?token={TOKEN}")
            assert r.status_code == 200  # the query token does authenticate
        async with connect(f"ws://127.0.0.1:{port}/v1/streams/s/ws?token={TOKEN}") as ws:
            assert '"type":"x"' in str(await ws.recv())
    finally:
        output = await stop(proc)
    assert TOKEN not in output
    assert "wrong-token-9d7e" not in output
    # The lines were logged, with the value masked.
    assert output.count("token=***") >= 4, output
    assert "%74oken=***" in output
    assert "WebSocket /v1/streams/s/ws?token=***" in output


@pytest.mark.redis
async def test_serve_masks_the_backend_password(tmp_path: Path, private_redis: RedisServer) -> None:
    # Redis's default user has no password, and then takes any: the URL works as written.
    backend = f"redis://default:{PASSWORD}@127.0.0.1:{private_redis.port}/0?prefix=sec"
    port = free_port()
    proc = await start_cli(
        "serve", "--backend", backend, "--port", str(port), "--workers", "0",
        cwd=tmp_path, env={"RUNSTREAM_LOG_LEVEL": "info"},
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc, "/readyz")
    finally:
        output = await stop(proc)
    assert PASSWORD not in output
    assert f"redis://default:***@127.0.0.1:{private_redis.port}/0" in output


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--backend", f"redis+sentinel://user:{PASSWORD}@127.0.0.1:1/0"],
        ["serve", "--backend", f"sqlite://user:{PASSWORD}@host/x.db"],
        ["worker", "--backend", f"sqlite://user:{PASSWORD}@host/x.db"],
        ["worker", "--backend", f"https://{PASSWORD}@example.com/"],
    ],
)
async def test_bad_backend_url_errors_mask_the_password(tmp_path: Path, args: list[str]) -> None:
    result = await cli(*args, cwd=tmp_path)
    assert result.code != 0
    assert PASSWORD not in result.out + result.err
    assert "***@" in result.err


async def test_websocket_takes_the_token_in_a_subprotocol(
    start_server: StartServer,  # noqa: F811 - the fixture imported above
) -> None:
    reader = "read-only-token-1"
    live = await start_server(
        make_settings(
            tokens=(Token(TOKEN, frozenset({"read", "write"})), Token(reader, frozenset({"read"})))
        )
    )
    async with httpx.AsyncClient(base_url=live.url) as http:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        await http.post("/v1/streams/s/events", json={"type": "x"}, headers=auth)
    url = f"{live.ws_url}/v1/streams/s/ws"
    async with connect(url, subprotocols=ws_token_protocols(reader)) as ws:
        assert ws.subprotocol == "runstream"  # selected; the token is never echoed
        assert '"type":"x"' in str(await ws.recv())
        assert ws.request is not None and ws.response is not None
        assert reader not in ws.request.path
        assert reader not in str(ws.response.headers)
    for protocols in (
        [Subprotocol("runstream")],
        ws_token_protocols("not-the-token"),
        [Subprotocol("runstream"), Subprotocol("runstream.bearer.%%%")],
    ):
        with pytest.raises(InvalidStatus) as denied:
            async with connect(url, subprotocols=protocols):
                pass
        assert denied.value.response.status_code == 401
