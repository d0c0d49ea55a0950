"""Append, read as JSON and SSE, info, close, delete, list over a real server."""

from __future__ import annotations

import json

import httpx

from tests.server.live import LiveServer, open_sse, publish


async def test_append_one_event_returns_201_with_ids(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/streams/s1/events", json={"type": "hello", "data": {"x": 1}})
    assert r.status_code == 201
    body = r.json()
    assert body["stream"] == "s1" and body["first_id"] == 1 and body["last_id"] == 1
    assert isinstance(body["epoch"], str) and body["epoch"]


async def test_append_batch_then_json_read_returns_page(client: httpx.AsyncClient) -> None:
    await publish(client, "s2", 5)
    r = await client.get("/v1/streams/s2/events", params={"after": 2, "limit": 2})
    assert r.status_code == 200
    page = r.json()
    assert [e["id"] for e in page["events"]] == [3, 4]
    assert [e["data"]["i"] for e in page["events"]] == [2, 3]
    assert page["next_after"] == 4 and page["closed"] is False
    assert page["events"][0]["time"].endswith("Z")


async def test_sse_sends_retry_then_events_then_end(client: httpx.AsyncClient) -> None:
    await publish(client, "s3", 3)
    r = await client.post("/v1/streams/s3/close", json={"status": "succeeded"})
    assert r.status_code == 200 and r.json()["status"] == "closed"
    epoch = r.json()["epoch"]
    async with open_sse(client, "/v1/streams/s3/events") as sse:
        assert sse.response.status_code == 200
        assert sse.response.headers["content-type"].startswith("text/event-stream")
        messages = await sse.rest()
    assert [m.event for m in messages] == ["tick", "tick", "tick", "end"]
    assert [m.id for m in messages] == [f"{epoch}:{i}" for i in (1, 2, 3, 4)]
    assert json.loads(messages[0].data) == {"i": 0}
    assert json.loads(messages[-1].data) == {"status": "succeeded", "reason": None}
    assert messages[0].retry == 2000


async def test_sse_raw_wire_format(client: httpx.AsyncClient) -> None:
    await client.post("/v1/streams/raw/events", json={"type": "t", "data": {"a": [1, 2]}})
    await client.post("/v1/streams/raw/close")
    r = await client.get("/v1/streams/raw/events", headers={"Accept": "text/event-stream"})
    epoch = (await client.get("/v1/streams/raw")).json()["epoch"]
    page = await client.get("/v1/streams/raw/events", headers={"Accept": "application/json"})
    t1, t2 = (e["time"] for e in page.json()["events"])
    # ``time:`` is the server timestamp, as in JSON; standard parsers ignore the field.
    assert r.text == (
        "retry: 2000\n\n"
        f'id: {epoch}:1\nevent: t\ntime: {t1}\ndata: {{"a":[1,2]}}\n\n'
        f'id: {epoch}:2\nevent: end\ntime: {t2}\ndata: {{"status":null,"reason":null}}\n\n'
    )


async def test_sse_at_end_of_closed_stream_is_204(client: httpx.AsyncClient) -> None:
    await publish(client, "done", 2)
    info = (await client.post("/v1/streams/done/close")).json()
    headers = {"Accept": "text/event-stream", "Last-Event-ID": f"{info['epoch']}:3"}
    r = await client.get("/v1/streams/done/events", headers=headers)
    assert r.status_code == 204
    r = await client.get(
        "/v1/streams/done/events", headers={"Accept": "text/event-stream"}, params={"after": 3}
    )
    assert r.status_code == 204


async def test_unknown_stream_is_404_json(client: httpx.AsyncClient) -> None:
    # A catch-up read; SSE (and long-poll, WebSocket) wait for it unless told not to.
    for headers, params in (({}, {}), ({"Accept": "text/event-stream"}, {"wait_for_create": "0"})):
        r = await client.get("/v1/streams/nope/events", headers=headers, params=params)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "stream_not_found"
    r = await client.get("/v1/streams/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "stream_not_found"


async def test_info_close_delete_and_list(client: httpx.AsyncClient) -> None:
    for name in ("a.1", "a.2", "b.1"):
        await publish(client, name, 1)
    info = (await client.get("/v1/streams/a.1")).json()
    assert info["status"] == "open" and info["last_id"] == 1 and info["closed_at"] is None
    closed = (await client.post("/v1/streams/a.1/close", json={"reason": "done"})).json()
    assert closed["status"] == "closed" and closed["last_id"] == 2
    r = await client.get("/v1/streams", params={"prefix": "a.", "limit": 1})
    body = r.json()
    assert [s["stream"] for s in body["streams"]] == ["a.1"] and body["next_cursor"] == "a.1"
    r = await client.get("/v1/streams", params={"prefix": "a.", "cursor": "a.1", "limit": 1})
    assert [s["stream"] for s in r.json()["streams"]] == ["a.2"]
    assert (await client.delete("/v1/streams/a.2")).status_code == 204
    assert (await client.delete("/v1/streams/a.2")).status_code == 404
    r = await client.get("/v1/streams", params={"prefix": "a."})
    assert [s["stream"] for s in r.json()["streams"]] == ["a.1"]
    assert r.json()["next_cursor"] is None


async def test_append_to_closed_stream_is_409(client: httpx.AsyncClient) -> None:
    await client.post("/v1/streams/c/close")
    r = await client.post("/v1/streams/c/events", json={"type": "x"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "stream_closed"


async def test_producer_retry_is_not_stored_twice(client: httpx.AsyncClient) -> None:
    headers = {"Producer-Id": "p1", "Producer-Seq": "7"}
    first = await client.post(
        "/v1/streams/p/events", json=[{"type": "a"}, {"type": "b"}], headers=headers
    )
    again = await client.post(
        "/v1/streams/p/events", json=[{"type": "a"}, {"type": "b"}], headers=headers
    )
    assert first.status_code == again.status_code == 201
    assert (again.json()["first_id"], again.json()["last_id"]) == (1, 2)
    assert again.json()["duplicate"] is True
    assert (await client.get("/v1/streams/p")).json()["last_id"] == 2
    stale = await client.post(
        "/v1/streams/p/events",
        json={"type": "a"},
        headers={"Producer-Id": "p1", "Producer-Seq": "3"},
    )
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_producer_seq"


async def test_live_sse_receives_events_appended_after_connect(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    await publish(client, "livesse", 2)
    async with open_sse(client, "/v1/streams/livesse/events", after="now") as sse:
        await publish(client, "livesse", 3, start=2)
        got = await sse.take(3)
        assert [json.loads(m.data)["i"] for m in got] == [2, 3, 4]
        await client.post("/v1/streams/livesse/close")
        rest = await sse.rest()
    assert [m.event for m in rest] == ["end"]


async def test_service_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert "/v1/streams/{stream}/events" in (await client.get("/openapi.json")).json()["paths"]
    await publish(client, "m", 3)
    await client.post("/v1/streams/m/close")
    await client.get("/v1/streams/m/events", headers={"Accept": "text/event-stream"})
    metrics = (await client.get("/metrics")).text
    assert 'route="/v1/streams/{stream}/events",status="200"' in metrics
    assert 'runstream_events_delivered_total{transport="sse"} 4.0' in metrics
    assert 'runstream_stream_ends_total{reason="end",transport="sse"} 1.0' in metrics
    assert "runstream_events_appended_total 3.0" in metrics
    assert 'runstream_http_request_duration_seconds_count{method="POST"' in metrics
    root = await client.get("/")
    assert root.status_code == 200 and "built without the web UI" in root.text
