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

Apart from overwritten ``"\\r"`` segments nothing is dropped: concatenating a
record with ``partial=True`` and the records that follow it, up to the first
one without ``partial``, reproduces the line exactly. A record that ends a
line whose pieces were already emitted can have an empty ``line``.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Literal, TypeAlias

from runstream.errors import ValidationError

__all__ = [
    "DEFAULT_MAX_LINE",
    "LineSplitter",
    "OutputLine",
    "StreamName",
    "parse_level",
]

StreamName: TypeAlias = Literal["stdout", "stderr"]

DEFAULT_MAX_LINE = 64 * 1024
"""Longest line, in UTF-8 bytes, emitted as one record (SPEC §1)."""

_MIN_MAX_LINE = 4
"""A piece must have room for the longest UTF-8 character."""

# JSONEncoder.encode has a fast path for a lone str. The text has no lone
# surrogates (it comes from a UTF-8 decoder), so ensure_ascii=False is exact.
_json_str = json.JSONEncoder(ensure_ascii=False).encode


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


# -- splitting ----------------------------------------------------------------

_LINE_END_RE = re.compile(r"(\r\n|\r|\n)")


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on CPython's str, so the common case costs nothing.
    return len(text) if text.isascii() else len(text.encode())


class LineSplitter:
    """Split one output stream into :class:`OutputLine` records (sans I/O).

    The caller must call :meth:`feed` with each chunk in order, may call
    :meth:`flush` at any time (typically from a timer), and must call
    :meth:`close` once at end of file to get the last line; after
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
        self._collapsible = None
        out: list[OutputLine] = []
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
        out: list[OutputLine] = []
        self._process(self._decoder.decode(b"", True), out)
        if self._held_cr:
            self._held_cr = False
            self._segment(out, self._take_buf(), cr=True)
        elif self._buf or self._started:
            self._segment(out, self._take_buf(), cr=False)
        self._decoder.reset()
        return out

    # -- internals -------------------------------------------------------------

    def _take_buf(self) -> str:
        text = "".join(self._buf)
        self._buf.clear()
        self._buf_bytes = 0
        return text

    def _process(self, text: str, out: list[OutputLine]) -> None:
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
                # Fast path: whole lines that surely fit, the bulk of any real output.
                stream, quarter = self.stream, self.max_line // 4
                append, level_chars = out.append, _LEVEL_FIRST_CHARS
                for line in lines[1:]:
                    if len(line) <= quarter:
                        level = parse_level(line) if line[:1] in level_chars else None
                        append(OutputLine(stream, line, False, False, level))
                    else:
                        self._segment(out, line, cr=False)
        if tail:
            self._buf.append(tail)
            self._buf_bytes += _utf8_len(tail)
            if self._buf_bytes > self.max_line:
                self._emit_overflow(out)

    def _segment(self, out: list[OutputLine], text: str, *, cr: bool) -> None:
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
            if out and out[-1] is self._collapsible:
                out[-1] = item  # a terminal would overwrite the previous one anyway
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

    def _emit_overflow(self, out: list[OutputLine]) -> None:
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
