from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runstream.core.model import StreamInfo
from runstream.errors import ValidationError
from runstream.protocol.cursor import Position, check_position, format_sse_id, parse_position


def info(first: int, last: int, epoch: str = "ep1") -> StreamInfo:
    return StreamInfo("s", epoch, "open", first, last, 0.0)


@given(st.integers(min_value=0, max_value=2**62), st.from_regex(r"\A[0-9a-f]{1,12}\Z"))
def test_sse_id_round_trips(offset: int, epoch: str) -> None:
    assert parse_position(format_sse_id(epoch, offset)) == Position(offset, epoch)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, Position()),
        ("", Position()),
        ("0", Position(0)),
        ("42", Position(42)),
        (" 42 ", Position(42)),
        (7, Position(7)),
        ("now", Position(now=True)),
        ("abc:9", Position(9, "abc")),
    ],
)
def test_positions_parse(raw: str | int | None, expected: Position) -> None:
    assert parse_position(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "1.5", "x", ":5", "ep:", "ep:x", "١٢", "9" * 20, -3, "NOW"])
def test_bad_positions_are_rejected(raw: str | int) -> None:
    with pytest.raises(ValidationError):
        parse_position(raw)


def test_now_can_be_refused() -> None:
    with pytest.raises(ValidationError):
        parse_position("now", allow_now=False)


def test_position_inside_history_is_kept() -> None:
    assert check_position(info(1, 10), 4, "ep1") == (4, None)
    assert check_position(info(5, 10), 4, None) == (4, None)  # exactly at the trim boundary
    assert check_position(info(1, 10), 10, None) == (10, None)


def test_zero_starts_at_first_retained_without_reset() -> None:
    assert check_position(info(5, 10), 0, None) == (4, None)


def test_trimmed_position_resets_to_first_retained() -> None:
    pos, reset = check_position(info(5, 10), 2, None)
    assert pos == 4 and reset is not None
    assert (reset.reason, reset.after, reset.requested) == ("trimmed", 4, 2)


def test_other_epoch_resets_even_when_offset_exists() -> None:
    pos, reset = check_position(info(1, 10, "new"), 3, "old")
    assert pos == 0 and reset is not None and reset.reason == "epoch_changed"


def test_position_beyond_end_resets() -> None:
    pos, reset = check_position(info(1, 10), 11, None)
    assert pos == 0 and reset is not None and reset.reason == "ahead"
