"""Turning HTTP answers into runstream values and exceptions (shared by every client call)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from runstream.core.model import Event, StreamInfo
from runstream.errors import (
    HistoryLost,
    HTTPStatusError,
    PayloadTooLarge,
    ProtocolError,
    RunNotFound,
    RunstreamError,
    StaleProducerSeq,
    StreamClosed,
    StreamNotFound,
    TaskNotFound,
    ValidationError,
)

BODY_EXCERPT = 500
"""How much of an unexpected response body goes into an error message."""

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def excerpt(body: str) -> str:
    body = body.strip()
    return body if len(body) <= BODY_EXCERPT else body[:BODY_EXCERPT] + "…"


def parse_time(value: object) -> float:
    """RFC 3339 (``...Z``) or a number to UNIX seconds; ``0.0`` when absent or unreadable."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (dates are ignored)."""
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_body(text: str) -> dict[str, Any]:
    """The ``error`` object of a runstream error body, or ``{}``."""
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    err = obj.get("error") if isinstance(obj, dict) else None
    return dict(err) if isinstance(err, dict) else {}


def error_from_response(status: int, text: str, *, what: str, stream: str = "") -> RunstreamError:
    """The runstream exception for an error answer; its message includes the body."""
    err = error_body(text)
    code = str(err.get("code", "")) if err else ""
    message = str(err.get("message", "")) if err else ""
    detail = message or excerpt(text) or "(empty body)"
    summary = f"{what}: HTTP {status}: {detail}"
    exc: RunstreamError
    if code == "history_lost" or status == 410:
        exc = HistoryLost(
            stream,
            epoch=str(err.get("epoch", "")),
            first_id=int(err.get("first_id", 0) or 0),
            reason=str(err.get("reason", "trimmed")),
            message=summary,
        )
    elif code in ("stream_not_found", "stream_deleted"):
        exc = StreamNotFound(stream, summary)
    elif code == "stream_closed":
        exc = StreamClosed(stream)
    elif code == "stale_producer_seq":
        exc = StaleProducerSeq(
            stream,
            str(err.get("producer", "")),
            int(err.get("seq", -1) or -1),
            int(err.get("last_seq", -1) or -1),
        )
    elif code == "run_not_found":
        exc = RunNotFound(summary)
    elif code == "task_not_found":
        exc = TaskNotFound(summary)
    elif status == 413 or code == "too_large":
        exc = PayloadTooLarge(summary)
    elif status in (400, 422) or code == "invalid":
        exc = ValidationError(summary, field=err.get("field") if err else None)
    else:
        exc = HTTPStatusError(summary, status=status, body=excerpt(text), error_code=code)
    return exc


def expect_json(text: str, *, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"{what}: response is not JSON: {excerpt(text)!r}") from exc


def event_from_json(obj: Any) -> Event:
    """An :class:`Event` from ``{"id", "type", "data", "time"}``; ProtocolError if malformed."""
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("id"), int)
        or isinstance(obj.get("id"), bool)
        or not isinstance(obj.get("type"), str)
    ):
        raise ProtocolError(f"malformed event in response: {excerpt(json.dumps(obj))}")
    return Event(obj["id"], obj["type"], obj.get("data"), parse_time(obj.get("time")))


def stream_info_from_json(obj: Any) -> StreamInfo:
    if not isinstance(obj, dict):
        raise ProtocolError("stream info response is not an object")
    try:
        closed_at = obj.get("closed_at")
        return StreamInfo(
            name=str(obj["stream"]),
            epoch=str(obj["epoch"]),
            status="closed" if obj.get("status") == "closed" else "open",
            first_id=int(obj["first_id"]),
            last_id=int(obj["last_id"]),
            created_at=parse_time(obj.get("created_at")),
            closed_at=parse_time(closed_at) if closed_at else None,
            close_status=obj.get("close_status"),
            close_reason=obj.get("close_reason"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed stream info: {excerpt(json.dumps(obj))}") from exc
