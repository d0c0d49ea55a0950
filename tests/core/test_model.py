from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runstream.core.model import (
    END_TYPE,
    HEARTBEAT_TYPE,
    RESERVED_TYPES,
    RESET_TYPE,
    EncodedEvents,
    Event,
    NewEvent,
    Producer,
    StreamInfo,
    new_epoch,
    rfc3339,
    validate_stream_name,
)
from runstream.errors import ValidationError

NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,199}\Z")


@given(NAME)
def test_names_matching_the_spec_pattern_are_valid(name: str) -> None:
    assert validate_stream_name(name) == name


@given(st.text(min_size=1, max_size=3).filter(lambda s: not s[0].isascii() or not s[0].isalnum()))
def test_names_not_starting_with_ascii_alnum_are_invalid(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_stream_name(name)
    assert exc.value.field == "stream"


def test_records_are_frozen() -> None:
    event = Event(1, "t", {"a": 1}, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.id = 2  # type: ignore[misc]


def test_new_event_encodes_data_once_compactly() -> None:
    assert NewEvent("t", {"a": [1, "é"]}).data_json == '{"a":[1,"é"]}'


@pytest.mark.parametrize("data", [math.nan, math.inf, {1: object()}, {"s": {1, 2}}])
def test_non_json_data_is_rejected(data: object) -> None:
    with pytest.raises(ValidationError):
        NewEvent("t", data)


def test_from_json_rejects_unknown_fields_and_missing_type() -> None:
    assert NewEvent.from_json({"type": "a", "data": 1}) == NewEvent("a", 1)
    for bad in ({"data": 1}, {"type": "a", "extra": 1}, [], "x"):
        with pytest.raises(ValidationError):
            NewEvent.from_json(bad)


def test_end_type_is_reserved() -> None:
    with pytest.raises(ValidationError):
        NewEvent(END_TYPE, None)
    assert Event(3, END_TYPE, {"status": "ok"}, 0.0).is_end


@pytest.mark.parametrize("type_", sorted(RESERVED_TYPES))
def test_control_message_types_are_reserved(type_: str) -> None:
    assert {END_TYPE, RESET_TYPE, HEARTBEAT_TYPE} <= RESERVED_TYPES
    with pytest.raises(ValidationError, match="reserved"):
        NewEvent(type_, None)


def test_an_event_knows_its_idempotency_key_once_its_epoch_is_known() -> None:
    event = Event(7, "tick", 1, 0.0, epoch="ab12")
    assert event.idempotency_key("run:1") == "run:1:ab12:7"
    assert event == Event(7, "tick", 1, 0.0)  # the epoch takes no part in equality
    with pytest.raises(ValidationError):
        Event(7, "tick", 1, 0.0).idempotency_key("s")


def test_producer_validates_id_and_seq() -> None:
    for pid, seq in (("", 1), ("p", -1), ("p", True), ("x" * 201, 1)):
        with pytest.raises(ValidationError):
            Producer(pid, seq)  # type: ignore[arg-type]


def test_epochs_are_distinct_and_colon_free() -> None:
    epochs = {new_epoch() for _ in range(1000)}
    assert len(epochs) == 1000
    assert not any(":" in e for e in epochs)


def test_times_are_rfc3339_utc() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1700000000.1234) == "2023-11-14T22:13:20.123Z"


def datetime_rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(
    st.one_of(
        st.floats(min_value=-2e9, max_value=4e9, allow_nan=False),
        st.integers(min_value=0, max_value=4_000_000_000).map(lambda s: s + 0.9999995),
        st.integers(min_value=0, max_value=4_000_000_000).map(lambda s: s - 0.0000005),
        st.integers(min_value=-2_000_000_000, max_value=4_000_000_000).map(float),
    )
)
def test_rfc3339_is_exactly_what_datetime_formats(ts: float) -> None:
    assert rfc3339(ts) == datetime_rfc3339(ts)
    assert rfc3339(ts) == datetime_rfc3339(ts)  # the same time again (one append's events)
    assert rfc3339(ts + 1.5) == datetime_rfc3339(ts + 1.5)  # another second: the cache moves


def test_stream_info_json_uses_wire_names() -> None:
    info = StreamInfo("s", "e", "open", 1, 0, 0.0)
    assert info.to_json()["stream"] == "s"
    assert info.to_json()["closed_at"] is None


def test_encoded_events_validate_their_type_and_are_frozen() -> None:
    run = EncodedEvents("stdout", ['{"line":"a"}', '{"line":"b"}'])
    assert (run.type, list(run.data_json)) == ("stdout", ['{"line":"a"}', '{"line":"b"}'])
    for bad in ("end", "reset", "", "x" * 101, "a\rb"):
        with pytest.raises(ValidationError):
            EncodedEvents(bad, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.type = "stderr"  # type: ignore[misc]


def test_trusted_constructor_equals_the_validated_one() -> None:
    data = {"line": "héllo \x1b[31mred\x1b[0m", "partial": True}
    fast = NewEvent.trusted(
        "stdout", data, '{"line":"héllo \\u001b[31mred\\u001b[0m","partial":true}'
    )
    slow = NewEvent("stdout", data)
    assert fast == slow
    assert fast.data_json == slow.data_json
