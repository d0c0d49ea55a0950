"""Extension points for other layers: extra routers, start-up hooks, end checks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
from fastapi import APIRouter, Request
from starlette.responses import Response

from runstream.core.model import StreamInfo
from runstream.server.runtime import Runtime, get_runtime
from runstream.server.transports import sse_response
from tests.server.live import SSEReader, StartServer, make_settings, publish


def runs_like_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/jobs/{job}/events")
    async def job_events(request: Request, job: str) -> Response:
        # A job's stream may not exist yet when its client subscribes.
        return await sse_response(
            get_runtime(request),
            job,
            last_event_id=request.headers.get("last-event-id"),
            after=request.query_params.get("after"),
            wait_for_create=True,
        )

    return router


async def test_extra_router_streams_one_not_created_yet(start_server: StartServer) -> None:
    live = await start_server(routers=[runs_like_router()])
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        assert (await http.get("/v1/streams/j1")).status_code == 404
        async with http.stream(
            "GET", "/v1/jobs/j1/events", headers={"Accept": "text/event-stream"}
        ) as response:
            sse = SSEReader(response)
            await publish(http, "j1", 2)
            await http.post("/v1/streams/j1/close")
            got = await sse.rest()
    assert [m.event for m in got] == ["tick", "tick", "end"]


async def test_startup_hook_can_add_an_end_check(start_server: StartServer) -> None:
    terminal: set[str] = set()
    cleaned: list[bool] = []

    async def run_is_terminal(stream: str, info: StreamInfo | None) -> str | None:
        return "run_terminal" if stream in terminal else None

    async def hook(runtime: Runtime) -> Callable[[], Awaitable[None]]:
        runtime.hub.add_end_check(run_is_terminal)

        async def cleanup() -> None:
            cleaned.append(True)

        return cleanup

    live = await start_server(make_settings(reconcile_interval=0.1), on_startup=[hook])
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        await publish(http, "run1", 1)
        async with http.stream(
            "GET", "/v1/streams/run1/events", headers={"Accept": "text/event-stream"}
        ) as response:
            sse = SSEReader(response)
            assert len(await sse.take(1)) == 1
            terminal.add("run1")
            assert await asyncio.wait_for(sse.rest(), 10) == []
    await live.stop()
    assert cleaned == [True]
