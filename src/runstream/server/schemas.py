"""Request and response shapes: what OpenAPI shows, and what request bodies are checked by.

Request bodies (:class:`CloseIn`, :class:`RunIn`) are validated by these very
models (:func:`validate_body`) after the one input rule of
:func:`runstream.core.jsonbody.parse_json`. Appends are the exception: the hot
path builds :class:`~runstream.core.model.NewEvent` from the decoded body
directly, and a test checks that it accepts exactly what :class:`EventIn`
accepts. Responses are built from the records' ``to_json()`` (the single
source of the wire format); the ``*Out`` models describe them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from runstream.core.model import MAX_TYPE_LENGTH, RESERVED_TYPES, encode_data
from runstream.errors import ValidationError


class ErrorBody(BaseModel):
    code: str
    message: str
    epoch: str | None = None
    first_id: int | None = None
    reason: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


_RESERVED: list[Any] = sorted(RESERVED_TYPES)


class EventIn(BaseModel):
    """One event of an append body (``data`` is any JSON value)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: str = Field(
        min_length=1,
        max_length=MAX_TYPE_LENGTH,
        pattern="^[^\r\n\x00]*$",
        json_schema_extra={"not": {"enum": _RESERVED}},
    )
    data: Any = None

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_TYPES:
            raise ValueError(f"event type {value!r} is reserved")
        return value

    @field_validator("data")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        # What the append hot path refuses too: NaN and infinities (a body's
        # ``Infinity`` parses to one), and values JSON cannot hold.
        try:
            encode_data(value)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        return value


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
    model_config = ConfigDict(extra="forbid", strict=True)

    status: str | None = Field(default=None, max_length=1000)
    reason: str | None = Field(default=None, max_length=1000)


Body = TypeVar("Body", bound=BaseModel)


def validate_body(
    model: type[Body], payload: Any, *, invalid: Mapping[str, type[ValidationError]] = {}
) -> Body:
    """``payload`` (decoded JSON) as ``model``, or a runstream ``ValidationError`` naming the field.

    ``invalid`` maps a top-level field to the error class to raise for it (e.g.
    :class:`~runstream.errors.InvalidParams`, 422, for a run's ``params``).
    """
    try:
        return model.model_validate(payload)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else "body"
        where = ".".join(loc) or "body"
        if err["type"] == "extra_forbidden":
            message = f"unknown field {where!r}"
        elif err["type"] == "model_type":
            fields = ", ".join(f'"{n}": ...' for n in model.model_fields)
            message = f"body must be an object {{{fields}}}"
        else:
            message = f"{where}: {err['msg']}"
        raise invalid.get(field, ValidationError)(message, field=field) from None


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses."""
    return {s: {"model": ErrorOut} for s in statuses}
