"""Response and body shapes, for the OpenAPI document only.

Handlers build their JSON from the model's ``to_json()`` (the single source
of the wire format); these pydantic models describe it to OpenAPI readers and
to schemathesis. Keep the two in step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str
    message: str
    epoch: str | None = None
    first_id: int | None = None
    reason: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


class EventIn(BaseModel):
    type: str = Field(min_length=1, max_length=100)
    data: Any = None


class EventOut(BaseModel):
    id: int
    type: str
    data: Any = None
    time: str


class PageOut(BaseModel):
    stream: str
    epoch: str
    events: list[EventOut]
    next_after: int
    closed: bool


class StreamInfoOut(BaseModel):
    stream: str
    epoch: str
    status: str
    first_id: int
    last_id: int
    created_at: str
    closed_at: str | None
    close_status: str | None = None
    close_reason: str | None = None


class StreamListOut(BaseModel):
    streams: list[StreamInfoOut]
    next_cursor: str | None


class AppendOut(BaseModel):
    stream: str
    epoch: str
    first_id: int
    last_id: int
    duplicate: bool = False


class CloseIn(BaseModel):
    status: str | None = Field(default=None, max_length=1000)
    reason: str | None = Field(default=None, max_length=1000)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses."""
    return {s: {"model": ErrorOut} for s in statuses}
