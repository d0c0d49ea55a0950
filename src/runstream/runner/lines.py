"""Turn a child's raw output bytes into line records, without doing any I/O.

:class:`LineSplitter` is fed the chunks read from one pipe and returns
:class:`OutputLine` records. It is a plain object: the caller reads the pipe,
calls :meth:`~LineSplitter.feed` for every chunk, :meth:`~LineSplitter.flush`
from a timer, and :meth:`~LineSplitter.close` once at end of file.

Rules it implements:

* Bytes are decoded with an incremental UTF-8 decoder, ``errors="replace"``: a
  multi-byte character split across two reads decodes correctly, invalid bytes
  become U+FFFD, nothing ever raises.
* ``"\\n"`` and ``"\\r\\n"`` end a line (also when the ``"\\r"`` and the
  ``"\\n"`` arrive in different chunks). A bare ``"\\r"`` ends a *segment*
  with ``cr=True``: a terminal would move the cursor back and overwrite it, as
  progress bars do. When several such segments arrive in one chunk, only the
  last is kept; this is what keeps a fast progress bar bounded in memory and
  in events. A bare ``"\\r"`` with nothing before it shows nothing and emits
  nothing.
* A line longer than ``max_line`` bytes is emitted as several records, each
  but the last with ``partial=True``. The limit counts UTF-8 bytes of the
  *decoded* text (a replaced invalid byte counts as the 3 bytes of U+FFFD), and
  cuts fall on character boundaries, so every piece is at most ``max_line``
  bytes.
* :meth:`~LineSplitter.flush` emits text still waiting for its line end as a
  ``partial=True`` record, so a child that prints a prompt and then sleeps is
  visible at once; the rest of the line follows in later records.
* ANSI escape sequences are kept as they are.

For throughput, :meth:`LineSplitter.feed_batch` returns the same records as
:meth:`~LineSplitter.feed` in an :class:`OutputBatch`, a compact sequence
that creates an :class:`OutputLine` only when one is looked at, and
:func:`encode_runs` turns records into event data JSON in bulk. A child
printing hundreds of thousands of lines per second then costs a few string
operations per line, not several Python objects.

Apart from overwritten ``"\\r"`` segments nothing is dropped: concatenating a
record with ``partial=True`` and the records that follow it, up to the first
one without ``partial``, reproduces the line exactly. A record that ends a
line whose pieces were already emitted can have an empty ``line``.
"""

from __future__ import annotations

import bisect
import codecs
import json.encoder
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, overload

from runstream.errors import ValidationError

__all__ = [
    "DEFAULT_MAX_LINE",
    "LineSplitter",
    "OutputBatch",
    "OutputLine",
    "StreamName",
    "encode_runs",
    "parse_level",
]

StreamName: TypeAlias = Literal["stdout", "stderr"]

DEFAULT_MAX_LINE = 64 * 1024
"""Longest line, in UTF-8 bytes, emitted as one record (SPEC §1)."""

_MIN_MAX_LINE = 4
"""A piece must have room for the longest UTF-8 character."""

# What JSONEncoder(ensure_ascii=False) uses for every str (its encode() of a lone
# str returns exactly this), without the method call. The text has no lone
# surrogates (it comes from a UTF-8 decoder), so ensure_ascii=False is exact.
_json_str = json.encoder.encode_basestring


@dataclass(frozen=True, slots=True)
class OutputLine:
    """One line, or one piece of a line, written by a child process.

    ``line`` is the text without its terminator. ``partial`` means the line
    continues in the next record of the same stream; ``cr`` means the text was
    ended by a bare carriage return (a terminal would overwrite it); ``level``
    is the log level found at the start of the line by :func:`parse_level`.
    """

    stream: StreamName
    line: str
    partial: bool = False
    cr: bool = False
    level: str | None = None

    def to_data(self) -> dict[str, object]:
        """The ``stdout``/``stderr`` event data: ``{"line": ...}`` plus the flags that are set."""
        data: dict[str, object] = {"line": self.line}
        if self.partial:
            data["partial"] = True
        if self.cr:
            data["cr"] = True
        if self.level is not None:
            data["level"] = self.level
        return data

    def to_data_json(self) -> str:
        """:meth:`to_data` as compact JSON, byte for byte what ``core.model.encode_data`` gives.

        For ``NewEvent(l.stream, l.to_data(), data_json=l.to_data_json())``:
        several times cheaper than encoding the dict generically, which
        matters at hundreds of thousands of lines per second.
        """
        text = '{"line":' + _json_str(self.line)
        if self.partial:
            text += ',"partial":true'
        if self.cr:
            text += ',"cr":true'
        if self.level is not None:
            text += ',"level":' + _json_str(self.level)
        return text + "}"


# -- log levels ---------------------------------------------------------------

_LEVEL_NAMES = {
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "err": "error",
    "error": "error",
    "crit": "critical",
    "critical": "critical",
    "fatal": "critical",
}
# Longer spellings first, so "warning" is not read as "warn" + "ing".
_WORDS = "debug|info|warning|warn|error|err|critical|crit|fatal"
_SGR = r"(?:\x1b\[[0-9;]*m)*"
_TIMESTAMP = (
    r"(?:\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
    r"(?:\x1b\[[0-9;]*m)*\s+)?"
)
_LEVEL_RE = re.compile(
    rf"{_SGR}{_TIMESTAMP}{_SGR}"
    rf"(?:\[(?P<bracket>(?i:{_WORDS}))\]"
    rf"|(?P<colon>(?i:{_WORDS})){_SGR}:"
    rf"|(?P<upper>{_WORDS.upper()}){_SGR}(?=\s|$))"
)
# Cheap pre-check: most lines cannot start a level form at all.
_LEVEL_FIRST_CHARS = frozenset("\x1b[0123456789diwecfDIWECF")


def parse_level(line: str) -> str | None:
    """The log level a line starts with, normalised, or ``None``.

    Recognised at the very start of the line, after optional ANSI colour codes
    and an optional ISO 8601 timestamp (``2024-05-01 12:00:00,123`` or
    ``2024-05-01T12:00:00.123Z``) followed by whitespace:

    * ``[LEVEL] ...`` — any case, e.g. ``[warn] disk almost full``;
    * ``LEVEL: ...`` — any case, e.g. ``error: not found``, ``ERROR:root:boom``;
    * ``LEVEL ...`` — upper case only, followed by whitespace or the end of the
      line, e.g. ``INFO  starting`` (``Error handling is hard`` is prose).

    Level words: ``debug``, ``info``, ``warn``/``warning``, ``err``/``error``,
    ``crit``/``critical``/``fatal``; the result is one of ``"debug"``,
    ``"info"``, ``"warning"``, ``"error"``, ``"critical"``.
    """
    if not line or line[0] not in _LEVEL_FIRST_CHARS:
        return None
    match = _LEVEL_RE.match(line)
    if match is None:
        return None
    word = match.group("bracket") or match.group("colon") or match.group("upper")
    return _LEVEL_NAMES[word.lower()]


# -- batches ------------------------------------------------------------------


class _Run:
    """Records of one stream, in order: a text per record, full records only where needed.

    Record ``i`` is ``special[i]`` if present, else a plain line:
    ``OutputLine(stream, texts[i])`` (no flag set, no level).
    """

    __slots__ = ("special", "stream", "texts")

    def __init__(self, stream: StreamName) -> None:
        self.stream: StreamName = stream
        self.texts: list[str] = []
        self.special: dict[int, OutputLine] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def append(self, record: OutputLine) -> None:
        if record.partial or record.cr or record.level is not None:
            self.special[len(self.texts)] = record
        self.texts.append(record.line)

    def extend_plain(self, lines: list[str]) -> None:
        """Add whole lines that fit ``max_line``; those starting with a log level get it."""
        start = len(self.texts)
        self.texts += lines
        stream, level_chars = self.stream, _LEVEL_FIRST_CHARS
        for i, line in enumerate(lines):
            if line[:1] in level_chars:
                level = parse_level(line)
                if level is not None:
                    self.special[start + i] = OutputLine(stream, line, False, False, level)

    def ends_with(self, record: OutputLine) -> bool:
        """True if ``record`` (a record with a flag set) is the last one, the very object."""
        return self.special.get(len(self.texts) - 1) is record

    def replace_last(self, record: OutputLine) -> None:
        self.texts[-1] = record.line
        self.special[len(self.texts) - 1] = record

    def record(self, i: int) -> OutputLine:
        found = self.special.get(i)
        return found if found is not None else OutputLine(self.stream, self.texts[i])

    def records(self) -> list[OutputLine]:
        return [self.record(i) for i in range(len(self.texts))]

    def data_json(self) -> list[str]:
        """:meth:`OutputLine.to_data_json` of every record, in order."""
        out = ['{"line":' + _json_str(text) + "}" for text in self.texts]
        for i, record in self.special.items():
            out[i] = record.to_data_json()
        return out


class OutputBatch(Sequence[OutputLine]):
    """Output records in order (of one or both streams), stored compactly.

    A read-only sequence of :class:`OutputLine`: indexing and iteration create
    the records on demand, equal to those :meth:`LineSplitter.feed` returns.
    Plain lines (no flag, no level) are kept as bare strings, so a batch of
    many lines costs little until each record is looked at, and
    :func:`encode_runs` encodes it without creating any.

    :func:`~runstream.runner.process.run_process` hands its sink batches of
    this type. It is built with :meth:`extend` (by whoever gathers records)
    and must not be changed once handed on.
    """

    __slots__ = ("_len", "_runs", "_starts")

    def __init__(self, records: Iterable[OutputLine] = ()) -> None:
        self._runs: list[_Run] = []
        self._starts: list[int] = []  # index of each run's first record
        self._len = 0
        run: _Run | None = None
        for record in records:
            if run is None or record.stream != run.stream:
                run = _Run(record.stream)
                self._add(run)
            run.append(record)
            self._len += 1

    @classmethod
    def _of(cls, run: _Run) -> OutputBatch:
        batch = cls()
        if run.texts:
            batch._add(run)
            batch._len = len(run.texts)
        return batch

    def _add(self, run: _Run) -> None:
        self._runs.append(run)
        self._starts.append(self._len)

    def extend(self, other: OutputBatch) -> None:
        """Append the records of ``other`` (which must not change afterwards)."""
        for run in other._runs:
            self._add(run)
            self._len += len(run.texts)

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> OutputLine: ...

    @overload
    def __getitem__(self, index: slice) -> list[OutputLine]: ...

    def __getitem__(self, index: int | slice) -> OutputLine | list[OutputLine]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("OutputBatch index out of range")
        k = bisect.bisect_right(self._starts, index) - 1
        return self._runs[k].record(index - self._starts[k])

    def __iter__(self) -> Iterator[OutputLine]:
        for run in self._runs:
            special, stream = run.special, run.stream
            for i, text in enumerate(run.texts):
                found = special.get(i)
                yield found if found is not None else OutputLine(stream, text)

    def __repr__(self) -> str:
        return f"<OutputBatch of {self._len} records>"


def encode_runs(records: Sequence[OutputLine]) -> Iterator[tuple[StreamName, list[str]]]:
    """The records' :meth:`~OutputLine.to_data_json`, in order, a run of one stream at a time.

    Yields ``(stream, [data_json, ...])`` for runs of consecutive records of
    one stream; concatenating the lists gives one string per record. Two
    consecutive runs may have the same stream. Each run is encoded only when
    it is reached, so a consumer can interleave the encoding with other work.
    Works for any sequence of records; for an :class:`OutputBatch` it encodes
    plain lines in bulk without creating their records, several times cheaper
    than calling ``to_data_json`` on each.
    """
    if isinstance(records, OutputBatch):
        for run in records._runs:
            yield run.stream, run.data_json()
        return
    stream: StreamName | None = None
    data: list[str] = []
    for record in records:
        if record.stream != stream:
            if stream is not None:
                yield stream, data
            stream, data = record.stream, []
        data.append(record.to_data_json())
    if stream is not None:
        yield stream, data


# -- splitting ----------------------------------------------------------------

_LINE_END_RE = re.compile(r"(\r\n|\r|\n)")


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on CPython's str, so the common case costs nothing.
    return len(text) if text.isascii() else len(text.encode())


class LineSplitter:
    """Split one output stream into :class:`OutputLine` records (sans I/O).

    The caller must call :meth:`feed` (or :meth:`feed_batch`) with each chunk
    in order, may call :meth:`flush` at any time (typically from a timer), and
    must call :meth:`close` once at end of file to get the last line; after
    :meth:`close` the splitter is reset and could start a new stream.
    Records returned by successive calls are in stream order.

    ``max_line`` (bytes, at least 4) bounds both record size and the text
    held between calls: at most ``max_line`` bytes of an unfinished line are
    kept, plus up to 3 bytes of an unfinished UTF-8 character and a held
    ``"\\r"``.
    """

    __slots__ = (
        "_buf",
        "_buf_bytes",
        "_collapsible",
        "_decoder",
        "_held_cr",
        "_started",
        "max_line",
        "stream",
    )

    def __init__(self, stream: StreamName, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        if stream not in ("stdout", "stderr"):
            raise ValidationError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        if max_line < _MIN_MAX_LINE:
            raise ValidationError(f"max_line must be at least {_MIN_MAX_LINE} bytes")
        self.stream: StreamName = stream
        self.max_line = max_line
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf: list[str] = []  # text of the unfinished line not yet emitted
        self._buf_bytes = 0
        self._started = False  # pieces of the unfinished line were already emitted
        self._held_cr = False  # the last character seen was "\r": maybe half of "\r\n"
        self._collapsible: OutputLine | None = None  # a "\r" segment a later one may replace

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet emitted in any record."""
        undecoded = len(self._decoder.getstate()[0])
        return self._buf_bytes + self._held_cr + undecoded

    def feed(self, chunk: bytes) -> list[OutputLine]:
        """Decode ``chunk`` and return the records it completes (possibly none)."""
        return self._feed(chunk).records()

    def feed_batch(self, chunk: bytes) -> OutputBatch:
        """Like :meth:`feed`, but the records come as an :class:`OutputBatch` (cheaper)."""
        return OutputBatch._of(self._feed(chunk))

    def _feed(self, chunk: bytes) -> _Run:
        self._collapsible = None
        out = _Run(self.stream)
        self._process(self._decoder.decode(chunk), out)
        return out

    def flush(self) -> list[OutputLine]:
        """Emit the text of the unfinished line as a ``partial=True`` record.

        Returns an empty list when no text is waiting. A held ``"\\r"`` and
        the bytes of an unfinished character stay held: what they mean
        depends on what comes next.
        """
        self._collapsible = None
        if not self._buf:
            return []
        text = self._take_buf()
        level = None if self._started else parse_level(text)
        self._started = True
        return [OutputLine(self.stream, text, True, False, level)]

    def close(self) -> list[OutputLine]:
        """End of stream: return every remaining record, including a last line without newline.

        An unfinished character at the end becomes U+FFFD.
        """
        self._collapsible = None
        out = _Run(self.stream)
        self._process(self._decoder.decode(b"", True), out)
        if self._held_cr:
            self._held_cr = False
            self._segment(out, self._take_buf(), cr=True)
        elif self._buf or self._started:
            self._segment(out, self._take_buf(), cr=False)
        self._decoder.reset()
        return out.records()

    # -- internals -------------------------------------------------------------

    def _take_buf(self) -> str:
        text = "".join(self._buf)
        self._buf.clear()
        self._buf_bytes = 0
        return text

    def _process(self, text: str, out: _Run) -> None:
        if self._held_cr:
            text = "\r" + text
            self._held_cr = False
        if text.endswith("\r"):
            # Could be the first half of "\r\n": decide when the next chunk comes.
            text = text[:-1]
            self._held_cr = True
        if not text:
            return
        if "\r" in text:
            parts = _LINE_END_RE.split(text)
            tail = parts.pop()
            for i in range(0, len(parts), 2):
                segment = parts[i]
                if i == 0 and self._buf:
                    segment = self._take_buf() + segment
                self._segment(out, segment, cr=parts[i + 1] == "\r")
        else:
            lines = text.split("\n")
            tail = lines.pop()
            if lines:
                first = lines[0]
                if self._buf:
                    first = self._take_buf() + first
                self._segment(out, first, cr=False)
                del lines[0]
                # Fast path: whole lines that surely fit, the bulk of any real output.
                if lines and max(map(len, lines)) <= self.max_line // 4:
                    out.extend_plain(lines)
                else:
                    for line in lines:
                        self._segment(out, line, cr=False)
        if tail:
            self._buf.append(tail)
            self._buf_bytes += _utf8_len(tail)
            if self._buf_bytes > self.max_line:
                self._emit_overflow(out)

    def _segment(self, out: _Run, text: str, *, cr: bool) -> None:
        """Emit the end of the current line or ``"\\r"`` segment, whose text is ``text``."""
        started = self._started
        self._started = False
        if len(text) * 4 <= self.max_line or _utf8_len(text) <= self.max_line:
            if not cr:
                level = None if started else parse_level(text)
                out.append(OutputLine(self.stream, text, False, False, level))
                return
            if started:
                out.append(OutputLine(self.stream, text, False, True, None))
                return
            if not text:
                return  # a "\r" at column 0 overwrites nothing and shows nothing
            item = OutputLine(self.stream, text, False, True, parse_level(text))
            if self._collapsible is not None and out.ends_with(self._collapsible):
                out.replace_last(item)  # a terminal would overwrite the previous one anyway
            else:
                out.append(item)
            self._collapsible = item
            return
        pieces = self._split_long(text)
        last = pieces.pop()
        for piece in pieces:
            out.append(
                OutputLine(self.stream, piece, True, False, None if started else parse_level(piece))
            )
            started = True
        out.append(OutputLine(self.stream, last, False, cr, None))

    def _emit_overflow(self, out: _Run) -> None:
        """The unfinished line outgrew ``max_line``: emit full pieces, keep the rest."""
        pieces = self._split_long(self._take_buf())
        rest = pieces.pop()
        for piece in pieces:
            level = None if self._started else parse_level(piece)
            out.append(OutputLine(self.stream, piece, True, False, level))
            self._started = True
        self._buf.append(rest)
        self._buf_bytes = _utf8_len(rest)

    def _split_long(self, text: str) -> list[str]:
        """Cut ``text`` into pieces of at most ``max_line`` UTF-8 bytes, on character boundaries.

        Only the last piece may be shorter than the limit; it is never empty.
        """
        limit = self.max_line
        if text.isascii():
            return [text[i : i + limit] for i in range(0, len(text), limit)] or [""]
        data = text.encode()
        pieces: list[str] = []
        start = 0
        while len(data) - start > limit:
            cut = start + limit
            while data[cut] & 0xC0 == 0x80:  # never cut inside a character
                cut -= 1
            pieces.append(data[start:cut].decode())
            start = cut
        pieces.append(data[start:].decode())
        return pieces
