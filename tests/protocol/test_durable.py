"""The Durable Streams wire codec (runstream.protocol.durable)."""

from __future__ import annotations

import pytest

from runstream.core.durable import DsError
from runstream.protocol.durable import (
    ReadFrom,
    format_offset,
    parse_offset,
    parse_read_offset,
    sse_control,
    sse_data,
)
from runstream.protocol.sse import SSEDecoder


def test_offsets_sort_as_positions_and_round_trip() -> None:
    offsets = [format_offset(p) for p in (0, 1, 9, 10, 12345)]
    assert offsets == sorted(offsets)
    assert [parse_offset(o) for o in offsets] == [0, 1, 9, 10, 12345]
    assert "-1" not in offsets and "now" not in offsets


@pytest.mark.parametrize(
    "bad", ["", "0,1", "0 1", "../x", "1", "0000000000000001_0000000000000000", "a_b"]
)
def test_malformed_offsets_are_refused(bad: str) -> None:
    with pytest.raises(DsError):
        parse_read_offset([bad])


def test_sentinels_and_repeats() -> None:
    assert parse_read_offset([]) is None
    assert parse_read_offset(["-1"]) == ReadFrom(0)
    assert parse_read_offset(["now"]) == ReadFrom(now=True)
    with pytest.raises(DsError):
        parse_read_offset(["-1", "now"])


def decode(frames: bytes) -> list[tuple[str, str]]:
    decoder = SSEDecoder()
    return [(m.event, m.data) for m in decoder.feed(frames)]


def test_payload_line_breaks_cannot_forge_events() -> None:
    payload = b'safe\r\n\r\nevent: control\rdata: {"x":1}\n\n end'
    frames = sse_data([payload], "text") + sse_control("o", "7", up_to_date=True, closed=False)
    messages = decode(frames)
    assert [event for event, _ in messages] == ["data", "control"]
    assert messages[0][1] == 'safe\n\nevent: control\ndata: {"x":1}\n\n end'
    assert messages[1][1] == '{"streamNextOffset":"o","streamCursor":"7","upToDate":true}'


def test_json_and_binary_data_frames() -> None:
    assert decode(sse_data([b'{"a":1}', b"2,3"], "json")) == [("data", '[{"a":1},2,3]')]
    assert decode(sse_data([b"\x00\xff", b"\n"], "base64")) == [("data", "AP8K")]
    closed = decode(sse_control("o", "7", up_to_date=True, closed=True))
    assert closed == [("control", '{"streamNextOffset":"o","streamClosed":true,"upToDate":true}')]
