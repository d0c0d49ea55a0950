"""The sans-I/O line splitter: bytes in, OutputLine records out."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runstream.core.model import encode_data
from runstream.errors import ValidationError
from runstream.runner.lines import (
    DEFAULT_MAX_LINE,
    LineSplitter,
    OutputBatch,
    OutputLine,
    StreamName,
    encode_runs,
    parse_level,
)


def texts(items: list[OutputLine]) -> list[str]:
    return [item.line for item in items]


def joined_lines(items: list[OutputLine]) -> list[str]:
    """Reassemble whole lines: partial pieces are concatenated with what follows."""
    lines: list[str] = []
    current = ""
    for item in items:
        current += item.line
        if not item.partial:
            lines.append(current)
            current = ""
    assert current == "", "a partial piece was never completed"
    return lines


# -- line ends -------------------------------------------------------------------


def test_lf_and_crlf_end_lines_and_text_has_no_terminator() -> None:
    splitter = LineSplitter("stdout")
    out = splitter.feed(b"one\ntwo\r\nthree\n")
    assert texts(out) == ["one", "two", "three"]
    assert all(not item.partial and not item.cr for item in out)
    assert all(item.stream == "stdout" for item in out)


def test_empty_lines_are_kept() -> None:
    out = LineSplitter("stderr").feed(b"\n\na\n\n")
    assert texts(out) == ["", "", "a", ""]
    assert {item.stream for item in out} == {"stderr"}


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"abc\r") == []
    out = splitter.feed(b"\ndef\n")
    assert out == [OutputLine("stdout", "abc"), OutputLine("stdout", "def")]


def test_line_split_across_feeds_is_joined() -> None:
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo wor") == []
    assert splitter.feed(b"ld\n") == [OutputLine("stdout", "hello world")]


def test_final_line_without_newline_is_emitted_on_close() -> None:
    splitter = LineSplitter("stdout")
    assert texts(splitter.feed(b"a\nlast")) == ["a"]
    assert splitter.close() == [OutputLine("stdout", "last")]
    assert splitter.pending_bytes == 0


def test_close_with_nothing_pending_emits_nothing() -> None:
    splitter = LineSplitter("stdout")
    splitter.feed(b"a\n")
    assert splitter.close() == []


# -- carriage returns ------------------------------------------------------------


def test_bare_cr_ends_a_segment_marked_cr() -> None:
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"10%\r") == []  # could still become "\r\n"
    out = splitter.feed(b"20%")
    assert out == [OutputLine("stdout", "10%", cr=True)]
    assert splitter.close() == [OutputLine("stdout", "20%")]


def test_cr_at_end_of_stream_is_a_cr_segment() -> None:
    splitter = LineSplitter("stdout")
    splitter.feed(b"done\r")
    assert splitter.close() == [OutputLine("stdout", "done", cr=True)]


def test_several_cr_segments_in_one_feed_keep_only_the_last() -> None:
    splitter = LineSplitter("stdout")
    out = splitter.feed(b"1%\r2%\r3%\r4%\rstill going")
    assert out == [OutputLine("stdout", "4%", cr=True)]
    assert splitter.close() == [OutputLine("stdout", "still going")]


def test_cr_segments_separated_by_a_line_are_all_kept() -> None:
    out = LineSplitter("stdout").feed(b"a\rb\rline\nc\rd\r\n")
    assert out == [
        OutputLine("stdout", "b", cr=True),
        OutputLine("stdout", "line"),
        OutputLine("stdout", "c", cr=True),
        OutputLine("stdout", "d"),
    ]


def test_cr_at_column_zero_emits_nothing() -> None:
    splitter = LineSplitter("stdout")
    out = splitter.feed(b"\r 10%\r 20%")
    assert out == [OutputLine("stdout", " 10%", cr=True)]


def test_cr_progress_bar_keeps_memory_and_events_bounded() -> None:
    splitter = LineSplitter("stdout")
    events: list[OutputLine] = []
    for feed in range(200):
        chunk = "".join(f"\rprogress {feed}.{step:04d}" for step in range(500))
        events += splitter.feed(chunk.encode())
        assert splitter.pending_bytes < 64
    events += splitter.close()
    # One event per feed (the last bar of each), not one per update.
    assert len(events) <= 201
    assert events[-1].line == "progress 199.0499"


# -- long lines --------------------------------------------------------------------


def test_one_mib_line_without_newline_comes_out_whole_in_partial_pieces() -> None:
    line = bytes(range(33, 127)) * (1024 * 1024 // 94 + 1)
    line = line[: 1024 * 1024]
    splitter = LineSplitter("stdout", max_line=64 * 1024)
    out: list[OutputLine] = []
    for i in range(0, len(line), 65536):
        out += splitter.feed(line[i : i + 65536])
        assert splitter.pending_bytes <= 64 * 1024
    out += splitter.close()
    assert "".join(texts(out)) == line.decode()
    assert all(item.partial for item in out[:-1])
    assert not out[-1].partial
    assert all(len(item.line) <= 64 * 1024 for item in out)
    assert len(out) == 16


def test_long_line_with_newline_is_split_at_max_line() -> None:
    out = LineSplitter("stdout", max_line=4).feed(b"abcdefghij\nk\n")
    assert out == [
        OutputLine("stdout", "abcd", partial=True),
        OutputLine("stdout", "efgh", partial=True),
        OutputLine("stdout", "ij"),
        OutputLine("stdout", "k"),
    ]


def test_line_of_exactly_max_line_bytes_is_not_split() -> None:
    assert LineSplitter("stdout", max_line=5).feed(b"12345\n") == [OutputLine("stdout", "12345")]


def test_multibyte_pieces_fit_max_line_bytes_and_cut_between_characters() -> None:
    text = "aé€😀" * 50  # 1, 2, 3 and 4 byte characters
    splitter = LineSplitter("stdout", max_line=7)
    out = splitter.feed(text.encode() + b"\n")
    assert "".join(texts(out)) == text
    assert all(len(item.line.encode()) <= 7 for item in out)
    assert "\ufffd" not in "".join(texts(out))


def test_max_line_below_four_bytes_is_rejected() -> None:
    with pytest.raises(ValidationError):
        LineSplitter("stdout", max_line=3)


# -- decoding ------------------------------------------------------------------------


def test_multibyte_character_split_across_feeds_decodes() -> None:
    euro = "€".encode()
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"price " + euro[:1]) == []
    assert splitter.feed(euro[1:2]) == []
    assert splitter.feed(euro[2:] + b"5\n") == [OutputLine("stdout", "price €5")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    out = LineSplitter("stdout").feed(b"bad \xff\xfe bytes \xc3\x28\n")
    assert out == [OutputLine("stdout", "bad \ufffd\ufffd bytes \ufffd(")]


def test_truncated_character_at_end_of_stream_becomes_replacement() -> None:
    splitter = LineSplitter("stdout")
    splitter.feed(b"cut \xe2\x82")
    assert splitter.close() == [OutputLine("stdout", "cut \ufffd")]


def test_ansi_colour_codes_are_kept() -> None:
    raw = "\x1b[31mred\x1b[0m and \x1b[1;32mbold green\x1b[0m"
    assert LineSplitter("stdout").feed(raw.encode() + b"\n") == [OutputLine("stdout", raw)]


# -- timer flush ----------------------------------------------------------------------


def test_flush_emits_pending_text_as_partial_and_the_line_continues() -> None:
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"Password: ") == []
    assert splitter.flush() == [OutputLine("stdout", "Password: ", partial=True)]
    assert splitter.flush() == []
    out = splitter.feed(b"ok\n")
    assert out == [OutputLine("stdout", "ok")]


def test_flush_then_newline_ends_the_line_with_an_empty_record() -> None:
    splitter = LineSplitter("stdout")
    splitter.feed(b"waiting")
    flushed = splitter.flush()
    out = splitter.feed(b"\nnext\n")
    assert flushed + out == [
        OutputLine("stdout", "waiting", partial=True),
        OutputLine("stdout", ""),
        OutputLine("stdout", "next"),
    ]


def test_flush_keeps_a_held_cr_until_the_next_byte_decides() -> None:
    splitter = LineSplitter("stdout")
    splitter.feed(b"50%\r")
    assert splitter.flush() == [OutputLine("stdout", "50%", partial=True)]
    out = splitter.feed(b"60%")
    assert out == [OutputLine("stdout", "", cr=True)]  # ends the flushed "50%" segment
    assert splitter.close() == [OutputLine("stdout", "60%")]


def test_flush_with_only_a_partial_character_emits_nothing() -> None:
    splitter = LineSplitter("stdout")
    splitter.feed(b"\xe2\x82")
    assert splitter.flush() == []
    assert splitter.pending_bytes == 2
    assert splitter.feed(b"\xac\n") == [OutputLine("stdout", "€")]


def test_started_line_that_ends_at_eof_is_terminated() -> None:
    splitter = LineSplitter("stdout")
    splitter.feed(b"abc")
    splitter.flush()
    assert splitter.close() == [OutputLine("stdout", "")]


# -- reassembly property -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(["a", "é", "€", "😀", "\n", " ", "\ufffd"]), max_size=300
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=1200), max_size=30),
    flush_after=st.lists(st.booleans(), max_size=31),
    max_line=st.integers(min_value=4, max_value=40),
)
def test_partial_pieces_reassemble_exactly(
    text: str, cuts: list[int], flush_after: list[bool], max_line: int
) -> None:
    data = text.encode()
    bounds = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    splitter = LineSplitter("stdout", max_line=max_line)
    out: list[OutputLine] = []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        out += splitter.feed(data[start:end])
        if i < len(flush_after) and flush_after[i]:
            out += splitter.flush()
        assert splitter.pending_bytes <= max_line + 3
    out += splitter.close()
    expected = text.split("\n")
    if expected[-1] == "":
        expected.pop()
    assert joined_lines(out) == expected
    assert all(len(item.line.encode()) <= max_line for item in out)


# -- data shape and levels --------------------------------------------------------------


def test_to_data_has_only_the_flags_that_are_set() -> None:
    assert OutputLine("stdout", "x").to_data() == {"line": "x"}
    assert OutputLine("stderr", "x", partial=True).to_data() == {"line": "x", "partial": True}
    assert OutputLine("stdout", "x", cr=True, level="error").to_data() == {
        "line": "x",
        "cr": True,
        "level": "error",
    }


@settings(max_examples=300, deadline=None)
@given(
    line=st.text(),
    partial=st.booleans(),
    cr=st.booleans(),
    level=st.sampled_from([None, "error", "info"]),
)
def test_to_data_json_matches_the_model_encoding(
    line: str, partial: bool, cr: bool, level: str | None
) -> None:
    # The splitter never produces lone surrogates; JSON text cannot carry them as UTF-8.
    line = line.encode("utf-8", "replace").decode("utf-8")
    item = OutputLine("stdout", line, partial, cr, level)
    assert item.to_data_json() == encode_data(item.to_data())
    assert json.loads(item.to_data_json()) == item.to_data()


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ("ERROR something broke", "error"),
        ("ERROR", "error"),
        ("error: file not found", "error"),
        ("ERROR:root:boom", "error"),
        ("[WARN] disk almost full", "warning"),
        ("[warning] x", "warning"),
        ("Warning: deprecated", "warning"),
        ("INFO  starting", "info"),
        ("debug: x=1", "debug"),
        ("[DEBUG] x", "debug"),
        ("CRITICAL meltdown", "critical"),
        ("FATAL: out of memory", "critical"),
        ("crit: x", "critical"),
        ("ERR bad", "error"),
        ("2024-05-01 12:00:00,123 ERROR boom", "error"),
        ("2024-05-01T12:00:00.123Z [info] ready", "info"),
        ("2024-05-01T12:00:00+02:00 WARNING: x", "warning"),
        ("\x1b[31mERROR\x1b[0m boom", "error"),
        ("\x1b[33m[warn]\x1b[0m x", "warning"),
    ],
)
def test_parse_level_recognises_leading_forms(line: str, level: str) -> None:
    assert parse_level(line) == level


@pytest.mark.parametrize(
    "line",
    [
        "",
        "hello world",
        "Error handling is hard",  # prose: mixed case without colon or brackets
        "errors: 3",
        "INFORMATION follows",
        "the ERROR is here",
        "  ERROR indented",
        "ERRORS found",
        "2024-05-01 not a timestamp ERROR",
        "[error without close",
    ],
)
def test_parse_level_ignores_other_text(line: str) -> None:
    assert parse_level(line) is None


def test_level_is_set_on_lines_and_only_on_the_first_piece() -> None:
    out = LineSplitter("stderr", max_line=8).feed(b"ERROR: a long failure\nplain\n[warn] x\n")
    assert [(item.line, item.level) for item in out] == [
        ("ERROR: a", "error"),
        (" long fa", None),
        ("ilure", None),
        ("plain", None),
        ("[warn] x", "warning"),
    ]


# -- batches: the same records, cheaper -------------------------------------------------

# Pieces of output that exercise every rule: line ends of each kind, "\r" segments
# (alone, doubled, at column 0, before "\n"), level prefixes, ANSI codes, quotes and
# backslashes for the JSON, control characters, multi-byte and invalid UTF-8, long runs.
TRICKY = [
    b"plain line\n",
    b"crlf line\r\n",
    b"\r",
    b"\n",
    b"progress 10%\r",
    b"progress 20%\rprogress 30%\r",
    b"ERROR: failed\n",
    b"[warn] careful\n",
    b"INFO  ready\n",
    b"2024-05-01 12:00:00,123 ERROR boom\n",
    b"\x1b[31mcritical: red\x1b[0m\n",
    b'say "hi" \\ back\\slash\n',
    b"tab\there\x00nul\x07bell\x7f\n",
    "h\u00e9llo \u20ac \U0001f600\n".encode(),
    b"\xe2\x82",  # half of a euro sign
    b"\xac done\n",
    b"invalid \xff\xfe bytes\n",
    b"x" * 70,
    b"y" * 150 + b"\n",
    b"no newline at the end",
]


def feed_both(
    chunks: list[bytes], flushes: list[bool], max_line: int
) -> tuple[list[OutputLine], OutputBatch]:
    """Feed the same chunks to two splitters, one through feed(), one through feed_batch()."""
    plain = LineSplitter("stderr", max_line=max_line)
    batched = LineSplitter("stderr", max_line=max_line)
    records: list[OutputLine] = []
    batch = OutputBatch()
    for i, chunk in enumerate(chunks):
        records += plain.feed(chunk)
        batch.extend(batched.feed_batch(chunk))
        if i < len(flushes) and flushes[i]:
            records += plain.flush()
            batch.extend(OutputBatch(batched.flush()))
    records += plain.close()
    batch.extend(OutputBatch(batched.close()))
    return records, batch


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(TRICKY), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
    flushes=st.lists(st.booleans(), max_size=21),
    max_line=st.sampled_from([4, 16, 64, DEFAULT_MAX_LINE]),
)
def test_feed_batch_gives_the_records_feed_gives(
    pieces: list[bytes], cuts: list[int], flushes: list[bool], max_line: int
) -> None:
    data = b"".join(pieces)
    bounds = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    records, batch = feed_both(chunks, flushes, max_line)
    assert list(batch) == records
    assert len(batch) == len(records)
    assert [batch[i] for i in range(len(batch))] == records
    # The encoded data is each record's to_data_json, in order.
    encoded = [text for _, run in encode_runs(batch) for text in run]
    assert encoded == [item.to_data_json() for item in records]
    assert encoded == [encode_data(item.to_data()) for item in records]


def test_feed_batch_keeps_levels_flags_and_progress_collapsing() -> None:
    # Default max_line: every line after the first takes the bulk path.
    splitter = LineSplitter("stdout")
    batch = splitter.feed_batch(b"a\nERROR: x\n[info] y\n\nplain\n0%\r50%\r100%\rdone\nrest")
    assert list(batch) == [
        OutputLine("stdout", "a"),
        OutputLine("stdout", "ERROR: x", level="error"),
        OutputLine("stdout", "[info] y", level="info"),
        OutputLine("stdout", ""),
        OutputLine("stdout", "plain"),
        OutputLine("stdout", "100%", cr=True),
        OutputLine("stdout", "done"),
    ]
    assert list(OutputBatch(splitter.close())) == [OutputLine("stdout", "rest")]
    # A line too long for max_line is cut into partial pieces.
    splitter = LineSplitter("stdout", max_line=8)
    assert list(splitter.feed_batch(b"ok\nWARN: 12345678901\nok\n")) == [
        OutputLine("stdout", "ok"),
        OutputLine("stdout", "WARN: 12", partial=True, level="warning"),
        OutputLine("stdout", "34567890", partial=True),
        OutputLine("stdout", "1"),
        OutputLine("stdout", "ok"),
    ]


def test_output_batch_is_a_read_only_sequence_of_records() -> None:
    records = [
        OutputLine("stdout", "one"),
        OutputLine("stdout", "two", partial=True),
        OutputLine("stderr", "err", level="error"),
        OutputLine("stdout", "three"),
    ]
    batch = OutputBatch(records[:2])
    batch.extend(OutputBatch(records[2:]))
    assert len(batch) == 4 and bool(batch)
    assert list(batch) == records
    assert batch[0] == records[0] and batch[-1] == records[-1] and batch[2] == records[2]
    assert batch[1:3] == records[1:3]
    assert batch[::-1] == records[::-1]
    assert list(reversed(batch)) == records[::-1]
    assert records[2] in batch and batch.index(records[3]) == 3
    with pytest.raises(IndexError):
        batch[4]
    with pytest.raises(IndexError):
        batch[-5]
    empty = OutputBatch()
    assert len(empty) == 0 and not empty and list(empty) == []
    assert list(encode_runs(empty)) == []
    assert "4 records" in repr(batch)


def test_encode_runs_groups_consecutive_records_of_one_stream() -> None:
    records = [
        OutputLine("stdout", "a"),
        OutputLine("stdout", 'b "quoted"', cr=True),
        OutputLine("stderr", "c", partial=True),
        OutputLine("stdout", "d", level="info"),
        OutputLine("stdout", "e"),
    ]
    expected: list[tuple[StreamName, list[str]]] = [
        ("stdout", ['{"line":"a"}', '{"line":"b \\"quoted\\"","cr":true}']),
        ("stderr", ['{"line":"c","partial":true}']),
        ("stdout", ['{"line":"d","level":"info"}', '{"line":"e"}']),
    ]
    assert list(encode_runs(records)) == expected
    assert list(encode_runs(OutputBatch(records))) == expected
    assert list(encode_runs([])) == []
