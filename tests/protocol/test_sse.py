"""The sans-I/O SSE codec: WHATWG parsing rules (CHECKLISTS A), bounds, encoder round trips."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runstream.errors import ValidationError
from runstream.protocol.sse import (
    SSEDecoder,
    SSEMessage,
    check_response,
    encode_comment,
    encode_event,
    encode_retry,
    reconnect_headers,
)

BOM = b"\xef\xbb\xbf"


def decode_all(
    body: bytes, *, max_line: int = 1 << 20, max_event: int = 8 << 20
) -> tuple[list[SSEMessage], SSEDecoder]:
    decoder = SSEDecoder(max_line=max_line, max_event=max_event)
    messages = decoder.feed(body)
    messages += decoder.close()
    return messages, decoder


def decode_chunks(
    chunks: Iterable[bytes], *, max_line: int = 1 << 20, max_event: int = 8 << 20
) -> tuple[list[SSEMessage], SSEDecoder]:
    decoder = SSEDecoder(max_line=max_line, max_event=max_event)
    messages: list[SSEMessage] = []
    for chunk in chunks:
        messages += decoder.feed(chunk)
    messages += decoder.close()
    return messages, decoder


def state(decoder: SSEDecoder) -> tuple[object, ...]:
    return (
        decoder.last_event_id,
        decoder.retry,
        decoder.comments,
        decoder.bytes_received,
        decoder.overflows,
        decoder.malformed,
    )


def msg(data: str, event: str = "message", id: str = "", retry: int | None = None) -> SSEMessage:
    return SSEMessage(event=event, data=data, id=id, retry=retry)


def split_at(body: bytes, cuts: Sequence[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


# -- A.1 BOM ------------------------------------------------------------------


def test_leading_bom_is_stripped() -> None:
    messages, _ = decode_all(BOM + b"data: x\n\n")
    assert messages == [msg("x")]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_leading_bom_split_across_chunks_is_stripped(cut: int) -> None:
    body = BOM + b"data: x\n\n"
    messages, _ = decode_chunks([body[:cut], body[cut:]])
    assert messages == [msg("x")]


def test_leading_bom_fed_one_byte_at_a_time_is_stripped() -> None:
    body = BOM + b"data: x\n\n"
    messages, _ = decode_chunks([body[i : i + 1] for i in range(len(body))])
    assert messages == [msg("x")]


def test_second_bom_is_kept_as_content() -> None:
    # With the first BOM gone, the second starts the field name: "\ufeffdata"
    # is an unknown field, so nothing is dispatched from the first event.
    messages, _ = decode_all(BOM + BOM + b"data: x\n\ndata: \xef\xbb\xbfy\n\n")
    assert messages == [msg("\ufeffy")]


def test_bom_is_stripped_again_on_the_next_connection() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(BOM + b"data: a\n\n") == [msg("a")]
    decoder.close()
    assert decoder.feed(BOM + b"data: b\n\n") == [msg("b")]


# -- A.2 UTF-8 ----------------------------------------------------------------


def test_invalid_utf8_becomes_replacement_character() -> None:
    messages, _ = decode_all(b"data: a\xffb\xc3\n\nevent: \x80\ndata: c\n\n")
    assert messages == [msg("a\ufffdb\ufffd"), msg("c", event="\ufffd")]


@pytest.mark.parametrize("cut", range(6, 10))
def test_multibyte_character_split_across_chunks_decodes(cut: int) -> None:
    body = "data: €😀\n\n".encode()
    messages, _ = decode_chunks([body[:cut], body[cut:]])
    assert messages == [msg("€😀")]


def test_feed_accepts_any_bytes_like_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(bytearray(b"data: a")) == []
    assert decoder.feed(memoryview(b"\n\n")) == [msg("a")]
    assert decoder.feed(b"") == []
    assert decoder.bytes_received == 9


# -- A.3 line endings ---------------------------------------------------------


def test_crlf_lf_and_cr_line_endings_mixed() -> None:
    messages, _ = decode_all(b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r")
    assert messages == [msg("a\nb\nc"), msg("d")]


def test_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == [msg("a")]  # dispatched without waiting
    assert decoder.feed(b"\ndata: b\r") == []  # that LF closed the CRLF, not a blank line
    assert decoder.feed(b"\n\r") == [msg("b")]
    assert decoder.feed(b"\n") == []


def test_lone_cr_at_chunk_end_is_a_line_ending_when_no_lf_follows() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [msg("a")]


# -- A.4 dispatch -------------------------------------------------------------


def test_blank_line_dispatches_and_repeated_blank_lines_dispatch_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [msg("a")]
    assert decoder.feed(b"\n\n\r\n\r") == []


# -- A.5 comments -------------------------------------------------------------


def test_comment_lines_are_ignored_but_counted() -> None:
    messages, decoder = decode_all(b": keepalive\n:\ndata: a\n: mid-event\n\n:x\n\n")
    assert messages == [msg("a")]
    assert decoder.comments == 4


# -- A.6/A.7 field syntax -----------------------------------------------------


def test_field_splits_on_first_colon_and_strips_exactly_one_space() -> None:
    messages, _ = decode_all(b"data: a: b:c\n\ndata:  two\n\ndata:none\n\nevent:\tx\ndata\n\n")
    assert messages == [msg("a: b:c"), msg(" two"), msg("none"), msg("", event="\tx")]


def test_line_without_colon_is_a_field_with_empty_value() -> None:
    messages, decoder = decode_all(b"id: 7\ndata\ndata\n\nid\ndata\nevent\n\n")
    assert messages == [msg("\n", id="7"), msg("", id="")]
    assert decoder.last_event_id == ""


# -- A.8 field names ----------------------------------------------------------


def test_field_names_are_case_sensitive_and_unknown_fields_are_ignored() -> None:
    body = b"Data: no\nDATA: no\nID: 9\nEvent: no\nfoo: bar\ndata : no\ndata: yes\n\n"
    messages, decoder = decode_all(body)
    assert messages == [msg("yes")]
    assert decoder.malformed == 0


# -- A.9 data joining ---------------------------------------------------------


def test_data_lines_are_joined_with_lf_and_one_trailing_lf_is_dropped() -> None:
    messages, _ = decode_all(b"data: a\ndata: b\n\ndata: a\ndata:\n\ndata:\ndata:\n\n")
    assert messages == [msg("a\nb"), msg("a\n"), msg("\n")]


# -- A.10 empty data ----------------------------------------------------------


def test_event_without_data_is_not_dispatched_but_updates_last_event_id() -> None:
    messages, decoder = decode_all(b"id: 5\nevent: ping\n\ndata: x\n\n")
    assert messages == [msg("x", id="5")]  # "ping" did not leak into the next event
    assert decoder.last_event_id == "5"


# -- A.11 event type ----------------------------------------------------------


def test_empty_event_type_means_message_and_type_resets_after_dispatch() -> None:
    messages, _ = decode_all(
        b"event: a\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\nevent\ndata: 4\n\n"
    )
    assert [(m.event, m.data) for m in messages] == [
        ("a", "1"),
        ("message", "2"),
        ("message", "3"),
        ("message", "4"),
    ]


# -- A.12 ids -----------------------------------------------------------------


def test_id_containing_nul_is_ignored_and_counted_malformed() -> None:
    messages, decoder = decode_all(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert messages == [msg("a", id="1"), msg("b", id="1")]
    assert decoder.last_event_id == "1"
    assert decoder.malformed == 1


def test_empty_id_clears_the_last_event_id() -> None:
    messages, decoder = decode_all(b"id: 1\ndata: a\n\nid:\ndata: b\n\n")
    assert messages == [msg("a", id="1"), msg("b", id="")]
    assert decoder.last_event_id == ""


def test_id_carries_over_to_events_without_one() -> None:
    messages, _ = decode_all(b"id: e:1\ndata: a\n\ndata: b\n\n")
    assert messages == [msg("a", id="e:1"), msg("b", id="e:1")]


def test_last_event_id_can_be_seeded_and_assigned() -> None:
    decoder = SSEDecoder(last_event_id="e:41")
    assert decoder.feed(b"data: a\n\n") == [msg("a", id="e:41")]
    decoder.last_event_id = "e:50"
    assert decoder.feed(b"data: b\n\n") == [msg("b", id="e:50")]


# -- A.13 retry ---------------------------------------------------------------


def test_retry_without_data_sets_reconnection_time() -> None:
    messages, decoder = decode_all(b"retry: 2500\n\n")
    assert messages == []
    assert decoder.retry == 2500
    messages, decoder = decode_all(b"retry: 10\ndata: a\n\ndata: b\n\n")
    assert messages == [msg("a", retry=10), msg("b", retry=10)]


@pytest.mark.parametrize(
    "value",
    [b"1.5", b"-1", b"+5", b" 10", b"10 ", b"", b"1e3", b"\xd9\xa1", b"\xc2\xb2", b"0x10"],
    ids=repr,
)
def test_retry_accepts_only_ascii_digits(value: bytes) -> None:
    messages, decoder = decode_all(b"retry: 700\n\nretry: " + value + b"\ndata: a\n\n")
    assert messages == [msg("a", retry=700)]
    assert decoder.retry == 700
    assert decoder.malformed == 1


def test_retry_with_leading_zeros_is_decimal_and_absurdly_long_values_are_ignored() -> None:
    _, decoder = decode_all(b"retry: 0000000000000000000000000000000042\n\n")
    assert decoder.retry == 42
    _, decoder = decode_all(b"retry: 5\n\nretry: " + b"9" * 5000 + b"\n\n")
    assert (decoder.retry, decoder.malformed) == (5, 1)


# -- A.14 EOF -----------------------------------------------------------------


def test_eof_in_the_middle_of_an_event_discards_it_and_its_id() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [msg("a", id="1")]
    assert decoder.close() == []
    assert decoder.last_event_id == "1"
    # The next connection starts clean: nothing of event 2 survives.
    assert decoder.feed(b"data: c\n\n") == [msg("c", id="1")]


def test_eof_after_an_unterminated_last_line_discards_it() -> None:
    messages, decoder = decode_all(b"data: a\n\ndata: b")
    assert messages == [msg("a")]
    assert decoder.buffered == 0


# -- A.15 bounds --------------------------------------------------------------


@pytest.mark.timeout(30)
def test_endless_line_is_dropped_and_memory_stays_bounded() -> None:
    decoder = SSEDecoder(max_line=64 * 1024)
    piece = b"x" * 65536
    assert decoder.feed(b"data: ") == []
    for _ in range(160):  # 10 MiB without a line ending
        assert decoder.feed(piece) == []
        assert decoder.buffered <= decoder.max_line
    assert decoder.feed(b"\n\nid: 2\ndata: after\n\n") == [msg("after", id="2")]
    assert decoder.overflows == 1
    assert decoder.bytes_received == 6 + 160 * 65536 + 21


def test_overlong_data_line_drops_its_whole_event() -> None:
    body = b"id: 1\ndata: ok\n\nid: 2\ndata: short\ndata: " + b"y" * 100 + b"\n\ndata: next\n\n"
    for chunks in ([body], [body[i : i + 7] for i in range(0, len(body), 7)]):
        messages, decoder = decode_chunks(chunks, max_line=50)
        # Event 2 is never delivered truncated; its id is committed so a
        # reconnect does not ask for it again forever.
        assert messages == [msg("ok", id="1"), msg("next", id="2")]
        assert decoder.overflows == 1


@pytest.mark.parametrize(
    "line", [b": " + b"p" * 100, b"padding: " + b"p" * 100, b"retry: " + b"1" * 100]
)
def test_overlong_comment_or_other_field_does_not_drop_the_event(line: bytes) -> None:
    messages, decoder = decode_all(line + b"\nid: 3\ndata: x\n\n", max_line=50)
    assert messages == [msg("x", id="3")]
    assert decoder.overflows == 1


def test_overlong_id_drops_the_event_instead_of_mislabelling_it() -> None:
    messages, decoder = decode_all(b"id: 1\n\nid: " + b"9" * 100 + b"\ndata: x\n\n", max_line=50)
    assert messages == []
    assert decoder.last_event_id == "1"


def test_oversized_event_is_dropped_and_the_next_one_delivered() -> None:
    big = b"".join(b"data: " + b"z" * 40 + b"\n" for _ in range(10))
    decoder = SSEDecoder(max_line=64, max_event=200)
    assert decoder.feed(b"data: a\n\n" + big) == [msg("a")]
    assert decoder.buffered <= 200
    assert decoder.feed(b"data: more\n\ndata: b\n\n") == [msg("b")]
    assert decoder.overflows == 1


def test_event_of_exactly_max_event_is_delivered() -> None:
    # data buffer "abc\nde\n" is 7 bytes, type "t" 1 byte.
    messages, decoder = decode_all(b"event: t\ndata: abc\ndata: de\n\n", max_event=8)
    assert messages == [msg("abc\nde", event="t")]
    assert decoder.overflows == 0
    messages, decoder = decode_all(b"event: tt\ndata: abc\ndata: de\n\n", max_event=8)
    assert (messages, decoder.overflows) == ([], 1)


def test_line_of_exactly_max_line_is_kept() -> None:
    line = b"data: " + b"q" * 10
    messages, _ = decode_chunks([line[:3], line[3:], b"\n\n"], max_line=len(line))
    assert messages == [msg("q" * 10)]


@pytest.mark.parametrize(("max_line", "max_event"), [(0, 10), (10, -1), (True, 10), (10, 2.5)])
def test_bounds_must_be_positive_integers(max_line: int, max_event: int) -> None:
    with pytest.raises(ValidationError):
        SSEDecoder(max_line=max_line, max_event=max_event)


# -- A.16/A.17 connection helpers ---------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "expected"),
    [
        (200, "text/event-stream", "open"),
        (200, "text/event-stream; charset=utf-8", "open"),
        (200, "Text/Event-Stream;charset=UTF-8", "open"),
        (200, " text/event-stream ", "open"),
        (204, None, "stop"),
        (204, "text/event-stream", "stop"),
        (200, "application/json", "fail"),
        (200, "text/event-streams", "fail"),
        (200, None, "fail"),
        (200, "", "fail"),
        (201, "text/event-stream", "fail"),
        (301, "text/event-stream", "fail"),
        (404, "text/event-stream", "fail"),
        (500, "text/html", "fail"),
        (503, "text/event-stream", "fail"),
    ],
)
def test_check_response_opens_only_200_event_stream_and_stops_on_204(
    status: int, content_type: str | None, expected: str
) -> None:
    assert check_response(status, content_type) == expected


def test_reconnect_sends_last_event_id_only_when_non_empty() -> None:
    decoder = SSEDecoder()
    assert reconnect_headers(decoder.last_event_id) == {}
    decoder.feed(b"id: e:3\ndata: a\n\n")
    decoder.close()
    assert reconnect_headers(decoder.last_event_id) == {"Last-Event-ID": "e:3"}
    decoder.feed(b"id\ndata: b\n\n")
    assert reconnect_headers(decoder.last_event_id) == {}


# -- chunking invariance ------------------------------------------------------

SAMPLES = [
    BOM + b'id: e:1\nevent: stdout\ndata: {"line": "h\xc3\xa9llo \xe2\x82\xac"}\n\n',
    b": keepalive\r\nretry: 3000\r\n\r\nid: 1\r\ndata: a\r\ndata: b\r\n\r\n",
    b"data: cr\rdata: only\r\rid\rdata\r\r",
    b"event: x\ndata: 1\n\n\n\nid: 2\x00\ndata: \xff\xfe\n\nretry: -1\ndata: \xf0\x9f\x98\x80\n\n",
    BOM + BOM + b"data: a\r\n\r\ndata:b\r\r\n\nDATA: c\nfoo\n\ndata: tail",
    b"id: 1\ndata: " + b"w" * 40 + b"\n\n:" + b"c" * 40 + b"\r\ndata: ok\r\n\r\n",
]


@pytest.mark.parametrize("body", SAMPLES, ids=range(len(SAMPLES)))
def test_every_split_position_gives_identical_output(body: bytes) -> None:
    bounds = {"max_line": 32, "max_event": 64}  # the bounds take part too
    expected, whole = decode_all(body, **bounds)
    assert expected or whole.comments  # each sample exercises something
    for cut in range(len(body) + 1):
        messages, decoder = decode_chunks([body[:cut], body[cut:]], **bounds)
        assert messages == expected, cut
        assert state(decoder) == state(whole), cut
    messages, decoder = decode_chunks([body[i : i + 1] for i in range(len(body))], **bounds)
    assert messages == expected
    assert state(decoder) == state(whole)


# -- differential check against a literal reading of the standard -------------


@dataclass
class Reference:
    """The WHATWG algorithm transcribed step by step: whole body, no bounds."""

    messages: list[SSEMessage] = field(default_factory=list)
    last_event_id: str = ""
    retry: int | None = None
    comments: int = 0
    malformed: int = 0

    extension: bool = True
    """Also keep runstream's ``time`` field (a standard parser ignores it: ``False``)."""

    def parse(self, body: bytes) -> None:
        text = body.decode("utf-8", "replace")
        text = text.removeprefix("\ufeff")
        lines = re.split("\r\n|\r|\n", text)
        lines.pop()  # the end of the body: an incomplete line (or "") is discarded
        data, event, id_buffer, time = "", "", "", ""
        for line in lines:
            if line == "":
                self.last_event_id = id_buffer
                if data:
                    data = data.removesuffix("\n")
                    self.messages.append(
                        SSEMessage(event or "message", data, self.last_event_id, self.retry, time)
                    )
                data, event, time = "", "", ""
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data += value + "\n"
            elif name == "event":
                event = value
            elif name == "id":
                if "\0" in value:
                    self.malformed += 1
                else:
                    id_buffer = value
            elif name == "retry":
                if value and all("0" <= c <= "9" for c in value):
                    self.retry = int(value)
                else:
                    self.malformed += 1
            elif name == "time" and self.extension:
                time = value
            # "Otherwise: The field is ignored."


field_names = st.sampled_from(
    ["data", "event", "id", "retry", "time", "Data", "ID", "Time", "x", "", "data "]
)
field_values = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n")),
    st.from_regex(r"\A[0-9]{1,6}\Z"),
    st.sampled_from(["", " ", "  a", "1.5", "-1", "+5", " 10", "a\0b", "€", "\ufeff"]),
)
separators = st.sampled_from([":", ": ", ":  ", ""])
line_ends = st.sampled_from(["\n", "\r", "\r\n"])
sse_lines = st.one_of(
    st.tuples(field_names, separators, field_values).map(lambda t: t[0] + t[1] + t[2]),
    st.text(max_size=10).map(lambda s: ":" + s.replace("\r", "").replace("\n", "")),
    st.just(""),
)


@st.composite
def sse_bodies(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(sse_lines, max_size=30))
    text = "".join(line + draw(line_ends) for line in lines)
    if draw(st.booleans()):
        text += draw(sse_lines)  # an unterminated last line
    body = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        body = BOM + body
    if draw(st.booleans()) and body:  # sprinkle invalid UTF-8
        at = draw(st.integers(0, len(body)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x80"]))
        body = body[:at] + junk + body[at:]
    return body


@given(body=sse_bodies(), data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decoder_matches_the_standard_on_any_chunking(body: bytes, data: st.DataObject) -> None:
    reference = Reference()
    reference.parse(body)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    messages, decoder = decode_chunks(split_at(body, cuts))
    assert messages == reference.messages
    assert decoder.last_event_id == reference.last_event_id
    assert decoder.retry == reference.retry
    assert decoder.comments == reference.comments
    assert decoder.malformed == reference.malformed
    assert decoder.overflows == 0


# -- fuzz: never raises, stays bounded ----------------------------------------

noisy_bytes = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\n", b":", b": ", b"data:", b"data: ", b"id:"]),
        st.sampled_from([b"event: ", b"retry: ", BOM, b"\xff", b"\xe2\x82", b"\x00"]),
    ),
    max_size=60,
).map(b"".join)


@given(
    body=noisy_bytes,
    max_line=st.integers(1, 48),
    max_event=st.integers(1, 96),
    data=st.data(),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_never_raise_and_buffer_stays_bounded(
    body: bytes, max_line: int, max_event: int, data: st.DataObject
) -> None:
    expected, whole = decode_all(body, max_line=max_line, max_event=max_event)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    decoder = SSEDecoder(max_line=max_line, max_event=max_event)
    messages: list[SSEMessage] = []
    for chunk in split_at(body, cuts):
        messages += decoder.feed(chunk)
        assert decoder.buffered <= max_line + max_event + 2
    messages += decoder.close()
    assert decoder.buffered == 0
    assert messages == expected
    assert state(decoder) == state(whole)
    for message in messages:
        assert len(message.data) + len(message.event) <= max_event + len("message")


# -- encoder ------------------------------------------------------------------


def test_encode_event_orders_retry_id_event_data() -> None:
    frame = encode_event('{"a":1}', event="stdout", id="e:7", retry=1500)
    assert frame == b'retry: 1500\nid: e:7\nevent: stdout\ndata: {"a":1}\n\n'
    assert encode_event("x") == b"data: x\n\n"


def test_time_field_comes_before_data_and_decodes_as_message_time() -> None:
    frame = encode_event('{"a":1}', event="t", id="e:7", time="2026-12-04T10:00:00.123Z")
    assert frame == b'id: e:7\nevent: t\ntime: 2026-12-04T10:00:00.123Z\ndata: {"a":1}\n\n'
    messages, _ = decode_all(frame + b"data: next\n\n")
    assert messages == [
        SSEMessage("t", '{"a":1}', "e:7", None, "2026-12-04T10:00:00.123Z"),
        SSEMessage("message", "next", "e:7", None, ""),  # the time does not carry over
    ]
    with pytest.raises(ValidationError):
        encode_event("x", time="a\nid: 9")


def test_time_is_per_event_and_a_standard_parser_sees_the_same_events_without_it() -> None:
    body = (
        b"id: e:1\nevent: t\ntime: 2026-12-04T10:00:00Z\ndata: 1\n\n"
        b"id: e:2\nevent: t\ndata: 2\n\n"
        b"time: orphan\n\n"  # a time alone dispatches nothing
        b"id: e:3\ndata: 3\n\n"
    )
    messages, _ = decode_all(body)
    assert [(m.id, m.time) for m in messages] == [
        ("e:1", "2026-12-04T10:00:00Z"),
        ("e:2", ""),
        ("e:3", ""),
    ]
    standard = Reference(extension=False)  # WHATWG: "Otherwise: The field is ignored."
    standard.parse(body)
    assert [(m.event, m.data, m.id) for m in standard.messages] == [
        (m.event, m.data, m.id) for m in messages
    ]
    assert standard.malformed == 0  # an unknown field is not an error either


def test_encode_event_splits_every_kind_of_line_ending_into_data_lines() -> None:
    assert encode_event("a\r\nb\rc\nd\n") == b"data: a\ndata: b\ndata: c\ndata: d\ndata: \n\n"
    # U+2028 and friends are not SSE line endings and stay inside the line.
    assert encode_event("a\u2028b\x0bc\x85") == "data: a\u2028b\x0bc\x85\n\n".encode()


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b", "\n"])
@pytest.mark.parametrize("name", ["event", "id"])
def test_encode_event_rejects_cr_lf_nul_in_event_and_id(name: str, bad: str) -> None:
    fields = {"event": None, "id": None} | {name: bad}
    with pytest.raises(ValidationError):
        encode_event("x", event=fields["event"], id=fields["id"])


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_encode_rejects_invalid_retry(bad: object) -> None:
    with pytest.raises(ValidationError):
        encode_event("x", retry=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        encode_retry(bad)  # type: ignore[arg-type]


def test_encode_rejects_text_that_is_not_encodable_as_utf8() -> None:
    with pytest.raises(ValidationError):
        encode_event("\ud800")


def test_encode_comment_cannot_inject_lines() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("keepalive") == b": keepalive\n\n"
    frame = encode_comment("x\ndata: evil\r\rid: 9")
    messages, decoder = decode_all(frame)
    assert messages == []
    assert decoder.last_event_id == ""
    assert decoder.comments == 4


def test_encode_retry_sets_the_client_reconnection_time() -> None:
    assert encode_retry(3000) == b"retry: 3000\n\n"
    messages, decoder = decode_all(encode_retry(0) + encode_retry(3000))
    assert (messages, decoder.retry) == ([], 3000)


safe_fields = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), max_size=20
)
events = st.tuples(
    st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    st.none() | safe_fields,
    st.none() | safe_fields,
    st.none() | st.integers(0, 10**12),
)


@given(batch=st.lists(events, max_size=10), data=st.data())
@settings(max_examples=200, deadline=None)
def test_encoder_output_decodes_to_the_same_events(
    batch: list[tuple[str, str | None, str | None, int | None]], data: st.DataObject
) -> None:
    body = b"".join(
        encode_event(text, event=event, id=id, retry=retry) for text, event, id, retry in batch
    )
    expected: list[SSEMessage] = []
    last_id, last_retry = "", None
    for text, event, id, retry in batch:
        last_id = last_id if id is None else id
        last_retry = last_retry if retry is None else retry
        data_text = text.replace("\r\n", "\n").replace("\r", "\n")
        expected.append(SSEMessage(event or "message", data_text, last_id, last_retry))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=6))
    messages, decoder = decode_chunks(split_at(body, cuts))
    assert messages == expected
    assert decoder.last_event_id == last_id
    assert (decoder.malformed, decoder.overflows) == (0, 0)
