"""Server-sent events without I/O: a streaming decoder and the frame encoders.

The decoder follows the WHATWG HTML "server-sent events" parsing rules (§9.2):
bytes go in through :meth:`SSEDecoder.feed` in whatever chunks the transport
delivers, complete events come out as :class:`SSEMessage` values. It never
raises on input and holds a bounded amount of memory whatever the peer sends.
The connection-level rules (status and content type, ``Last-Event-ID`` on
reconnect) are the pure helpers :func:`check_response` and
:func:`reconnect_headers`; the sockets, timers and backoff belong to the caller.

The encoders build the frames the server writes. They are on the hot path (one
call per event and subscriber batch), so the common case (one line of compact
JSON) is a couple of string concatenations and one ``encode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from runstream.errors import ValidationError

__all__ = [
    "DEFAULT_MAX_EVENT",
    "DEFAULT_MAX_LINE",
    "SSEDecoder",
    "SSEMessage",
    "check_response",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "reconnect_headers",
]

DEFAULT_MAX_LINE: Final = 1 << 20
"""Longest line (bytes, without its line ending) the decoder keeps."""
DEFAULT_MAX_EVENT: Final = 8 << 20
"""Largest event (bytes of data lines plus event type) the decoder assembles."""

MEDIA_TYPE: Final = "text/event-stream"

_BOM: Final = b"\xef\xbb\xbf"
_CR: Final = 0x0D
_COLON: Final = 0x3A
_LF: Final = 0x0A
# A line longer than max_line is only ever looked at through this many leading
# bytes: enough to tell which field it would have set ("event:" is the longest).
_FIELD_PREFIX: Final = 8
_EVENT_FIELDS: Final = (b"data", b"event", b"id")
# Retry values with more significant digits than this are not a plausible delay
# (10**15 ms is ~31,000 years) and would cost a big-int parse; they are ignored.
_RETRY_MAX_DIGITS: Final = 15


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """One dispatched event.

    ``event`` is ``"message"`` when the stream gave no (or an empty) type;
    ``data`` is the event's data lines joined with ``"\\n"``; ``id`` is the
    decoder's last event id when the event was dispatched (``""`` when none);
    ``retry`` is the last valid reconnection delay seen so far, in ms;
    ``time`` is the value of the event's ``time`` field (``""`` when it had
    none): runstream servers put the event's server timestamp (RFC 3339)
    there. It is an extension field: the standard tells every other parser
    (a browser's ``EventSource``) to ignore a field it does not know.
    """

    event: str
    data: str
    id: str
    retry: int | None
    time: str = ""


class SSEDecoder:
    """Incremental ``text/event-stream`` parser (sans I/O).

    Feed it the response body with :meth:`feed` as bytes arrive and handle the
    messages it returns; call :meth:`close` at the end of the body. The same
    decoder may then be fed the body of the next connection:
    :attr:`last_event_id`, :attr:`retry` and the counters carry over, which is
    exactly the state a reconnecting client needs (send
    :func:`reconnect_headers` ``(decoder.last_event_id)`` and wait at least
    ``decoder.retry`` ms).

    Bounds: a line longer than ``max_line`` bytes is dropped while reading
    continues (``overflows`` counts it). If that line would have set ``data``,
    ``event`` or ``id``, the event it belongs to is dropped too, rather than
    delivered truncated or under the wrong id; the same happens to an event
    whose data plus type exceed ``max_event`` bytes. A dropped event still
    commits its id at the blank line that ends it (as an event with no data
    would), so a reconnect does not ask for it again and loop on it. Callers
    that must not lose events watch ``overflows``.

    Counters: ``comments`` (comment lines: keepalives prove the connection is
    alive), ``bytes_received``, ``overflows`` and ``malformed`` (a ``retry``
    that is not ASCII digits, an ``id`` containing NUL; unknown fields are not
    malformed, the standard says to ignore them).
    """

    __slots__ = (
        "_buf",
        "_data",
        "_discarding",
        "_dropped",
        "_event",
        "_head",
        "_id_buffer",
        "_last_event_id",
        "_skip_lf",
        "_time",
        "bytes_received",
        "comments",
        "malformed",
        "max_event",
        "max_line",
        "overflows",
        "retry",
    )

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_event: int = DEFAULT_MAX_EVENT,
        last_event_id: str = "",
    ) -> None:
        """Create a decoder; ``last_event_id`` seeds the resume id (a stored position).

        Raises :class:`ValidationError` if a bound is not a positive integer.
        """
        for name, bound in (("max_line", max_line), ("max_event", max_event)):
            if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
                raise ValidationError(f"{name} must be a positive integer", field=name)
        self.max_line = max_line
        self.max_event = max_event
        self.retry: int | None = None
        self.comments = 0
        self.bytes_received = 0
        self.overflows = 0
        self.malformed = 0
        self._last_event_id = last_event_id
        # Bytes of a possible BOM at the start of a body; None once decided.
        self._head: bytes | None = b""
        self._buf = bytearray()  # the incomplete line at the end of the last chunk
        self._discarding = False  # inside a line that overflowed; drop to its end
        self._skip_lf = False  # the last chunk ended with CR; a leading LF is its pair
        # The event being assembled: data lines each followed by LF (as the
        # standard describes the data buffer), its type, and whether an
        # overflow condemned it.
        self._data = bytearray()
        self._event = b""
        self._time = b""
        self._dropped = False
        self._id_buffer = last_event_id

    # -- public state ------------------------------------------------------

    @property
    def last_event_id(self) -> str:
        """The id to send as ``Last-Event-ID`` on reconnect (``""``: send nothing).

        It changes only when an event ends (a blank line), so an event cut off
        by the end of the body never moves it. Assigning to it replaces the
        resume position, e.g. with one restored from storage.
        """
        return self._last_event_id

    @last_event_id.setter
    def last_event_id(self, value: str) -> None:
        self._last_event_id = value
        self._id_buffer = value

    @property
    def buffered(self) -> int:
        """Bytes held for input not yet dispatched (partial line, event being built).

        At most ``max_line + max_event + 2`` whatever was fed; the committed
        and pending ids and the pending ``time`` (each at most ``max_line``)
        come on top.
        """
        head = len(self._head) if self._head is not None else 0
        return head + len(self._buf) + len(self._data) + len(self._event)

    # -- feeding -----------------------------------------------------------

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[SSEMessage]:
        """Parse the next piece of the body; return the events it completed.

        Never raises: invalid UTF-8 becomes U+FFFD, malformed and oversized
        lines are counted and skipped. A line ended by a CR at the very end of
        ``chunk`` is processed at once; an LF at the start of the next chunk is
        then taken as the rest of that CRLF.
        """
        if not chunk:
            return []
        data = chunk if type(chunk) is bytes else bytes(chunk)
        self.bytes_received += len(data)
        if self._head is not None:
            # The standard's UTF-8 decode drops one BOM at the very start of
            # the body; it may arrive a byte at a time.
            head = self._head + data
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head
                return []
            self._head = None
            data = head[len(_BOM) :] if head.startswith(_BOM) else head
            if not data:
                return []
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
                if not data:
                    return []
        if b"\r" in data:
            # CR and LF are single bytes that never occur inside a multi-byte
            # UTF-8 sequence, so lines can be split before decoding.
            self._skip_lf = data[-1] == _CR
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        tail = lines.pop()
        out: list[SSEMessage] = []
        if lines:
            first = lines[0]
            if self._discarding:
                self._discarding = False
                start = 1  # the end of an overflowed line, already counted
            else:
                start = 0
                if self._buf:
                    self._buf += first
                    lines[0] = bytes(self._buf)
                    self._buf.clear()
            max_line = self.max_line
            process = self._process
            dispatch = self._dispatch
            for line in lines[start:] if start else lines:
                if not line:
                    dispatch(out)
                elif len(line) <= max_line:
                    process(line)
                else:
                    self._overflow(line[:_FIELD_PREFIX])
        if tail and not self._discarding:
            if len(self._buf) + len(tail) > self.max_line:
                prefix = bytes(self._buf[:_FIELD_PREFIX]) + tail[:_FIELD_PREFIX]
                self._buf.clear()
                self._discarding = True
                self._overflow(prefix[:_FIELD_PREFIX])
            else:
                self._buf += tail
        return out

    def close(self) -> list[SSEMessage]:
        """End of the body: drop the incomplete line and event; return ``[]``.

        The standard discards an event that the body did not finish with a
        blank line; its ``id`` is not committed. Afterwards the decoder expects
        the start of a new body (a BOM is stripped again).
        """
        self._head = b""
        self._buf.clear()
        self._discarding = False
        self._skip_lf = False
        self._reset_event()
        self._id_buffer = self._last_event_id
        return []

    # -- internals ---------------------------------------------------------

    def _reset_event(self) -> None:
        self._data.clear()
        self._event = b""
        self._time = b""
        self._dropped = False

    def _drop_event(self) -> None:
        self._reset_event()
        self._dropped = True

    def _dispatch(self, out: list[SSEMessage]) -> None:
        self._last_event_id = self._id_buffer
        if self._data and not self._dropped:
            del self._data[-1]  # the LF after the last data line
            out.append(
                SSEMessage(
                    self._event.decode("utf-8", "replace") if self._event else "message",
                    self._data.decode("utf-8", "replace"),
                    self._last_event_id,
                    self.retry,
                    self._time.decode("utf-8", "replace") if self._time else "",
                )
            )
            self._data.clear()
            self._event = b""
            self._time = b""
        elif self._data or self._event or self._time or self._dropped:
            self._reset_event()

    def _overflow(self, prefix: bytes) -> None:
        self.overflows += 1
        if prefix[:1] == b":":
            self.comments += 1
            return
        name, colon, _ = prefix.partition(b":")
        if name in _EVENT_FIELDS or (not colon and any(f.startswith(name) for f in _EVENT_FIELDS)):
            self._drop_event()

    def _process(self, line: bytes) -> None:
        # Field names are ASCII and the separators are ASCII bytes, which are
        # never part of a multi-byte UTF-8 sequence: splitting before decoding
        # gives what decoding the whole line and then splitting would.
        if line[0] == _COLON:
            self.comments += 1
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            if self._dropped:
                return
            buf = self._data
            if len(buf) + len(value) + len(self._event) < self.max_event:
                buf += value
                buf += b"\n"
            else:
                self.overflows += 1
                self._drop_event()
        elif name == b"event":
            if self._dropped:
                return
            if len(self._data) + len(value) > self.max_event:
                self.overflows += 1
                self._drop_event()
            else:
                self._event = value
        elif name == b"id":
            if b"\0" in value:
                self.malformed += 1
            else:
                self._id_buffer = value.decode("utf-8", "replace")
        elif name == b"retry":
            digits = value.lstrip(b"0")
            # bytes.isdigit() is ASCII-only: "+5", "-1", "1.5", " 10" all fail.
            if value.isdigit() and len(digits) <= _RETRY_MAX_DIGITS:
                self.retry = int(digits or b"0")
            else:
                self.malformed += 1
        elif name == b"time":
            # runstream's extension field; other parsers ignore it (see SSEMessage).
            self._time = value
        # Any other field name is ignored, as the standard requires.


# -- connection-level helpers ----------------------------------------------


def check_response(status: int, content_type: str | None) -> Literal["open", "stop", "fail"]:
    """Decide what a client does with an SSE response's status and content type.

    ``"open"``: 200 with ``text/event-stream`` (parameters and case ignored) —
    read the body. ``"stop"``: 204 — the server asks the client to stop; do not
    reconnect. ``"fail"``: anything else — do not treat it as a stream and do
    not reconnect blindly; the caller reports the status and body.
    """
    if status == 204:
        return "stop"
    if status == 200 and content_type is not None:
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type == MEDIA_TYPE:
            return "open"
    return "fail"


def reconnect_headers(last_event_id: str) -> dict[str, str]:
    """Headers for a reconnect: ``Last-Event-ID`` only when there is an id."""
    return {"Last-Event-ID": last_event_id} if last_event_id else {}


# -- encoding ------------------------------------------------------------------


def _check_field(name: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValidationError(f"SSE {name} must not contain CR, LF or NUL", field=name)


def _check_retry(ms: int) -> None:
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
        raise ValidationError("SSE retry must be a non-negative integer (ms)", field="retry")


def _utf8(frame: str) -> bytes:
    try:
        return frame.encode()
    except UnicodeEncodeError as exc:  # lone surrogates cannot be sent as UTF-8
        raise ValidationError(f"SSE frame is not encodable as UTF-8: {exc}") from exc


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    time: str | None = None,
) -> bytes:
    """Encode one event as UTF-8: ``retry``, ``id``, ``event``, ``time``, ``data``, blank line.

    ``data`` may hold any text: each CRLF, LF or CR starts a new ``data:``
    line, so the decoder returns it with every line ending turned into LF.
    ``id`` and ``event`` must not contain CR, LF or NUL; ``retry`` must be a
    non-negative integer; otherwise :class:`ValidationError` is raised. An
    empty ``id`` tells the client to forget its last event id; an empty or
    absent ``event`` is received as ``"message"``. ``time`` (the same rules
    as ``id``) is an extension field that standard parsers ignore and
    :class:`SSEDecoder` returns as :attr:`SSEMessage.time`.
    """
    if "\n" in data or "\r" in data:
        if "\r" in data:
            data = data.replace("\r\n", "\n").replace("\r", "\n")
        data = data.replace("\n", "\ndata: ")
    frame = "data: " + data + "\n\n"
    if time is not None:
        _check_field("time", time)
        frame = "time: " + time + "\n" + frame
    if event is not None:
        _check_field("event", event)
        frame = "event: " + event + "\n" + frame
    if id is not None:
        _check_field("id", id)
        frame = "id: " + id + "\n" + frame
    if retry is not None:
        _check_retry(retry)
        frame = "retry: " + str(retry) + "\n" + frame
    return _utf8(frame)


def encode_comment(text: str = "") -> bytes:
    """Encode a comment (a keepalive) followed by a blank line.

    Each line of ``text`` becomes its own comment line, so the text cannot
    inject fields. Send it only between events, never inside one.
    """
    if not text:
        return b":\n\n"
    if "\n" in text or "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\n: ")
    return _utf8(": " + text + "\n\n")


def encode_retry(ms: int) -> bytes:
    """Encode a lone ``retry:`` field (reconnection delay in ms) and a blank line.

    Raises :class:`ValidationError` unless ``ms`` is a non-negative integer.
    """
    _check_retry(ms)
    return b"retry: %d\n\n" % ms
