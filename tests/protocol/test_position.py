"""A reader's position without sockets: what each received event means, where to resume."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runstream.core.model import Reset, StreamInfo
from runstream.errors import ValidationError
from runstream.protocol.cursor import Position
from runstream.protocol.position import ReaderPosition


def feed(pos: ReaderPosition, ids: list[int], epoch: str | None = "ep") -> list[int]:
    """Deliver what the position accepts, as a follower does; return the delivered ids."""
    out = []
    for i in ids:
        if pos.on_event(i, "tick", epoch) in ("deliver", "end"):
            pos.delivered(i, "tick", epoch)
            out.append(i)
    return out


def test_a_fresh_reader_accepts_any_first_id_because_history_may_be_trimmed() -> None:
    pos = ReaderPosition()
    assert not pos.pinned and pos.token == "0"
    assert pos.on_event(50, "tick", "ep") == "deliver"
    pos.delivered(50, "tick", "ep")
    assert pos.token == "ep:50" and pos.pinned
    assert pos.on_event(52, "tick", "ep") == "gap"
    assert pos.on_event(51, "tick", "ep") == "deliver"


def test_ids_at_or_below_the_position_are_duplicates() -> None:
    pos = ReaderPosition.parse("ep:10")
    assert [pos.on_event(i, "tick", "ep") for i in (9, 10, 11)] == [
        "duplicate",
        "duplicate",
        "deliver",
    ]


def test_deciding_changes_nothing_until_delivered() -> None:
    pos = ReaderPosition.parse("ep:3")
    assert pos.on_event(4, "tick", "ep") == "deliver"
    assert pos.token == "ep:3"  # the consumer never took event 4: resume before it
    assert pos.on_event(4, "tick", "ep") == "deliver"


def test_an_event_from_another_epoch_is_a_mismatch_not_a_delivery() -> None:
    pos = ReaderPosition.parse("ep:3")
    assert pos.on_event(4, "tick", "other") == "epoch_mismatch"
    assert pos.on_event(4, "tick", None) == "deliver"  # a transport that omits the epoch


def test_the_end_entry_is_last_and_nothing_follows_it() -> None:
    pos = ReaderPosition.parse("ep:1")
    assert pos.on_event(2, "end", "ep") == "end"
    pos.delivered(2, "end", "ep")
    assert pos.ended and pos.on_event(3, "tick", "ep") == "after_end"


def test_a_reset_moves_the_position_and_reports_what_it_replaced() -> None:
    pos = ReaderPosition.parse("old:7")
    reset = pos.reset(Reset("new", 0, "epoch_changed", 999))
    assert reset == Reset("new", 0, "epoch_changed", 7)  # requested: what this reader had
    assert pos.token == "new:0" and pos.pinned
    assert pos.on_event(2, "tick", "new") == "gap"  # after a reset the next id is exact
    assert pos.on_event(1, "tick", "new") == "deliver"


def test_a_reset_that_already_names_the_position_is_returned_as_is() -> None:
    pos = ReaderPosition.parse("e:5")
    reset = Reset("e", 40, "trimmed", 5)
    assert pos.reset(reset) is reset


def test_skip_moves_past_an_unusable_event() -> None:
    pos = ReaderPosition.parse("e:5")
    pos.skip(6, "e")
    assert pos.token == "e:6" and pos.on_event(7, "tick", "e") == "deliver"


def test_learning_the_epoch_does_not_pin_a_fresh_reader() -> None:
    pos = ReaderPosition()
    pos.learn_epoch("ep")
    pos.learn_epoch("other")  # only the first one counts
    assert pos.token == "ep:0" and not pos.pinned
    assert pos.on_event(30, "tick", None) == "deliver"


@pytest.mark.parametrize(
    ("after", "token", "pinned"),
    [(None, "0", False), ("", "0", False), (5, "5", True), ("ep:0", "ep:0", False)],
)
def test_parse_accepts_what_follow_accepts(
    after: str | int | None, token: str, pinned: bool
) -> None:
    pos = ReaderPosition.parse(after)
    assert (pos.token, pos.pinned) == (token, pinned)
    assert pos.as_position() == Position(pos.offset, pos.epoch)


def test_now_is_resolved_from_the_stream_state_not_parsed() -> None:
    with pytest.raises(ValidationError):
        ReaderPosition.parse("now")
    open_ = StreamInfo("s", "ep", "open", 1, 9, 0.0)
    closed = StreamInfo("s", "ep", "closed", 1, 9, 0.0)
    assert ReaderPosition.at_tail(open_).token == "ep:9"
    assert ReaderPosition.at_tail(closed).token == "ep:8"  # the end entry is still handed over
    missing = ReaderPosition.at_tail(None)
    assert missing.token == "0" and missing.on_event(2, "tick", "ep") == "gap"


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=200))
def test_whatever_arrives_the_delivered_ids_are_contiguous_and_never_repeat(
    received: list[int],
) -> None:
    pos = ReaderPosition.parse("ep:0")
    pos.pinned = True  # the log starts at 1
    delivered = feed(pos, received)
    assert delivered == list(range(1, len(delivered) + 1))
    assert pos.offset == len(delivered)


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=12),
            st.sampled_from(["tick", "end"]),
            st.sampled_from([None, "ep", "other"]),
        ),
        max_size=60,
    ),
    st.sampled_from([None, "ep:0", "ep:3", "4"]),
)
def test_advance_decides_and_commits_exactly_as_on_event_then_delivered(
    received: list[tuple[int, str, str | None]], after: str | None
) -> None:
    one, two = ReaderPosition.parse(after), ReaderPosition.parse(after)
    for id_, type_, epoch in received:
        verdict = two.on_event(id_, type_, epoch)
        if verdict in ("deliver", "end"):
            two.delivered(id_, type_, epoch)
        assert one.advance(id_, type_, epoch) == verdict
        assert (one.token, one.pinned, one.ended) == (two.token, two.pinned, two.ended)
