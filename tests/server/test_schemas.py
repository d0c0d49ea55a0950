"""Request bodies are checked by the models OpenAPI shows; the append hot path agrees with them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runstream.core.model import RESERVED_TYPES, NewEvent
from runstream.errors import InvalidParams, ValidationError
from runstream.server.runs import RunIn
from runstream.server.schemas import CloseIn, EventIn, validate_body

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
type_values = (
    st.text(max_size=110)
    | st.sampled_from([*RESERVED_TYPES, "a\nb", "a\rb", "a\x00b", "", "x" * 100, "x" * 101])
    | json_value
)
event_bodies = (
    st.dictionaries(st.sampled_from(["type", "data", "other"]), type_values, max_size=3)
    | json_value
)


def accepted_by_model(body: Any) -> bool:
    try:
        EventIn.model_validate(body)
    except Exception:
        return False
    return True


def accepted_by_hot_path(body: Any) -> bool:
    try:
        NewEvent.from_json(body)
    except ValidationError:
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(body=event_bodies)
@example(body={"type": "t", "data": float("inf")})  # a body's Infinity; found by a CI run
@example(body={"type": "t", "data": [1, {"x": float("-inf")}]})
def test_the_append_hot_path_accepts_exactly_what_the_event_model_accepts(body: Any) -> None:
    assert accepted_by_hot_path(body) == accepted_by_model(body), body


@pytest.mark.parametrize(
    ("payload", "error", "field"),
    [
        ([], ValidationError, "body"),
        ({"task": ""}, ValidationError, "task"),
        ({"task": "t", "extra": 1}, ValidationError, "extra"),
        ({"task": "t", "params": []}, InvalidParams, "params"),
        ({"task": "t", "timeout": "5"}, InvalidParams, "timeout"),
        ({"task": "t", "timeout": True}, InvalidParams, "timeout"),
        ({"task": "t", "timeout": 10**400}, InvalidParams, "timeout"),
    ],
)
def test_run_bodies_are_refused_naming_the_field(
    payload: Any, error: type[ValidationError], field: str
) -> None:
    invalid = {"params": InvalidParams, "timeout": InvalidParams}
    with pytest.raises(ValidationError) as caught:
        validate_body(RunIn, payload, invalid=invalid)
    assert type(caught.value) is error
    assert caught.value.field == field


def test_close_bodies_take_two_optional_strings() -> None:
    assert validate_body(CloseIn, {}).status is None
    assert validate_body(CloseIn, {"status": "ok", "reason": None}).status == "ok"
    for bad, field in (({"status": 5}, "status"), ({"why": "x"}, "why"), ([1], "body")):
        with pytest.raises(ValidationError) as caught:
            validate_body(CloseIn, bad)
        assert caught.value.field == field
