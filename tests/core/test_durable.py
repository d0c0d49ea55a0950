"""The Durable Streams rules without I/O (runstream.core.durable)."""

from __future__ import annotations

import pytest

from runstream.core.durable import (
    AppendRequest,
    DsConflict,
    DsError,
    DsStaleEpoch,
    DsState,
    Fork,
    Outcome,
    ProducerClaim,
    ProducerState,
    Verdict,
    cut_entry,
    decide_append,
    decide_producer,
    join_messages,
    json_messages,
    next_cursor,
    normalize_content_type,
    parse_decimal,
    parse_expires_at,
    parse_producer,
    state_from_json,
    state_to_json,
)
from runstream.errors import ValidationError


def claim(epoch: int, seq: int, pid: str = "p") -> ProducerClaim:
    return ProducerClaim(pid, epoch, seq)


def test_producer_rules_follow_the_protocol_table() -> None:
    state = ProducerState(epoch=1, last_seq=4)
    assert decide_producer(None, claim(0, 0)) is Verdict.ACCEPT
    assert decide_producer(state, claim(1, 5)) is Verdict.ACCEPT
    assert decide_producer(state, claim(1, 4)) is Verdict.DUPLICATE
    assert decide_producer(state, claim(1, 0)) is Verdict.DUPLICATE
    assert decide_producer(state, claim(2, 0)) is Verdict.ACCEPT
    with pytest.raises(DsStaleEpoch) as stale:
        decide_producer(state, claim(0, 9))
    assert stale.value.headers == {"Producer-Epoch": "1"}
    with pytest.raises(DsConflict) as gap:
        decide_producer(state, claim(1, 7))
    assert gap.value.headers == {"Producer-Expected-Seq": "5", "Producer-Received-Seq": "7"}
    with pytest.raises(DsError) as bad:
        decide_producer(state, claim(2, 3))
    assert bad.value.http_status == 400


@pytest.mark.parametrize("text", ["", "+1", "01", "1.0", "1e3", "-1", "x", str(2**53)])
def test_integers_in_headers_are_plain_decimals(text: str) -> None:
    with pytest.raises(DsError):
        parse_decimal(text, "Producer-Seq")


def test_producer_headers_come_together() -> None:
    assert parse_producer(None, None, None) is None
    assert parse_producer("a", "0", "3") == ProducerClaim("a", 0, 3)
    for partial in (("a", None, "1"), (None, "0", "1"), ("a", "0", None), ("", "0", "0")):
        with pytest.raises(DsError):
            parse_producer(*partial)


def test_json_mode_flattens_exactly_one_level() -> None:
    assert json_messages(b'{"a": 1}', allow_empty=False) == ['{"a":1}']
    assert json_messages(b"[1, [2, 3]]", allow_empty=False) == ["1", "[2,3]"]
    assert json_messages(b"[[[1]]]", allow_empty=False) == ["[[1]]"]
    assert json_messages(b"[]", allow_empty=True) == []
    with pytest.raises(DsError):
        json_messages(b"[]", allow_empty=False)
    with pytest.raises(ValidationError) as invalid:  # the one input rule (core/jsonbody)
        json_messages(b"{oops", allow_empty=False)
    assert invalid.value.http_status == 400


def test_sub_offsets_cut_bytes_or_messages() -> None:
    assert cut_entry("text/plain", b"hello", 3) == b"hel"
    entry = join_messages(['{"a":1}', '{"b":2}', '{"c":3}'])
    assert cut_entry("application/json", entry, 2) == b'{"a":1},{"b":2}'
    with pytest.raises(DsError):
        cut_entry("text/plain", b"hi", 3)
    with pytest.raises(DsError):
        cut_entry("application/json", entry, 4)


def state(**changes: object) -> DsState:
    base = DsState(name="s", uid="u", content_type="text/plain", created=0.0, touched=0.0)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_an_append_checks_and_stores_producer_seq_and_close_at_once() -> None:
    req = AppendRequest("text/plain", b"x", close=True, producer=claim(0, 0), stream_seq="b")
    plan = decide_append(state(), req, now=5.0)
    assert plan.outcome is Outcome.APPENDED and plan.entries == [b"x"]
    assert plan.state.tail == 1 and plan.state.closed and plan.state.closed_by == claim(0, 0)
    assert plan.state.producers == {"p": ProducerState(0, 0)} and plan.state.stream_seq == "b"
    # The retry of the closing append is a duplicate; anything else is refused.
    again = decide_append(plan.state, req, now=6.0)
    assert again.outcome is Outcome.DUPLICATE and again.entries == []
    with pytest.raises(DsConflict) as closed:
        decide_append(plan.state, AppendRequest("text/plain", b"y"), now=6.0)
    assert closed.value.headers == {"Stream-Closed": "true"} and closed.value.tail == 1


def test_stream_seq_compares_bytewise_and_content_types_must_match() -> None:
    current = state(stream_seq="2")
    with pytest.raises(DsConflict):
        decide_append(current, AppendRequest("text/plain", b"x", stream_seq="10"), now=0)
    assert decide_append(current, AppendRequest("TEXT/PLAIN", b"x", stream_seq="3"), now=0)
    with pytest.raises(DsConflict):
        decide_append(current, AppendRequest("application/json", b"{}"), now=0)
    with pytest.raises(DsError):
        decide_append(current, AppendRequest(None, b"x"), now=0)


def test_cursors_never_go_backwards() -> None:
    now = 1_800_000_000.0
    first = next_cursor(now, None, 1)
    assert int(next_cursor(now, first, 1)) > int(first)
    assert int(next_cursor(now, str(int(first) + 100), 3600)) > int(first) + 100


def test_settings_parse_strictly() -> None:
    assert normalize_content_type(None) == "application/octet-stream"
    assert normalize_content_type("Application/JSON;charset=utf-8") == (
        "application/json; charset=utf-8"
    )
    assert parse_expires_at("2030-01-01T00:00:00Z") == parse_expires_at("2030-01-01T00:00:00+00:00")
    with pytest.raises(DsError):
        parse_expires_at("tomorrow")


def test_state_round_trips_through_its_storage_form() -> None:
    original = state(
        ttl=60,
        tail=7,
        base=3,
        closed=True,
        closed_by=claim(2, 9, "w"),
        fork=Fork("src", 3, 1),
        forks=2,
        producers={"w": ProducerState(2, 9)},
        stream_seq="z",
    )
    assert state_from_json(state_to_json(original)) == original
