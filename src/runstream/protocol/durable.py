"""The Durable Streams wire codec without I/O: offsets, read bodies, SSE frames.

Offsets are ``"<16 digits>_<16 digits>"``: a reserved zero part, then the position
(entries before it). They sort lexicographically in stream order, are never ``-1``
or ``now`` (the protocol's sentinels) and carry nothing but the position, so an
offset of one stream is a valid offset of its forks. The all-zero offset is the
start of every stream.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from runstream.core.durable import DsError

START: Final = "-1"
NOW: Final = "now"
MAX_POSITION: Final = 10**16 - 1
_OFFSET: Final = re.compile(r"^(\d{16})_(\d{16})$")


def format_offset(position: int) -> str:
    return f"{0:016d}_{position:016d}"


def parse_offset(value: str) -> int:
    """A position from an offset this server issued; 400 for anything else."""
    match = _OFFSET.match(value)
    if match is None or int(match.group(1)) != 0:
        raise DsError(f"malformed offset {value[:80]!r}")
    return int(match.group(2))


@dataclass(frozen=True, slots=True)
class ReadFrom:
    """Where a read starts: a position, or the tail (``now``)."""

    position: int = 0
    now: bool = False


def parse_read_offset(values: Sequence[str]) -> ReadFrom | None:
    """The ``offset`` query parameter(s): ``None`` when absent; 400 if empty or repeated."""
    if not values:
        return None
    if len(values) > 1:
        raise DsError("give one offset parameter")
    value = values[0]
    if value == START:
        return ReadFrom(0)
    if value == NOW:
        return ReadFrom(now=True)
    if not value:
        raise DsError("the offset parameter is empty")
    return ReadFrom(parse_offset(value))


LiveMode = Literal["", "long-poll", "sse"]


def parse_live(values: Sequence[str]) -> LiveMode:
    if not values:
        return ""
    if len(values) > 1:
        raise DsError("give one live parameter")
    value = values[0]
    if value == "long-poll":
        return "long-poll"
    if value == "sse":
        return "sse"
    raise DsError(f"live must be long-poll or sse (got {value[:20]!r})")


def render_body(entries: Sequence[bytes], json_mode: bool) -> bytes:
    """The body of a read: the entries' bytes, or for JSON one array of their messages."""
    if json_mode:
        return b"[" + b",".join(e for e in entries if e) + b"]"
    return b"".join(entries)


def etag(uid: str, start: int, end: int, closed: bool) -> str:
    return f'"{uid}:{start}:{end}{":c" if closed else ""}"'


# -- SSE --------------------------------------------------------------------------------

_LINES: Final = re.compile(r"\r\n|\r|\n")


def _data_lines(text: str) -> bytes:
    out = []
    for line in _LINES.split(text):
        # A line starting with a space keeps it: the reader strips one after "data:".
        out.append(("data: " if line.startswith(" ") else "data:") + line)
    return ("\n".join(out) + "\n").encode("utf-8")


def sse_data(entries: Sequence[bytes], mode: Literal["json", "text", "base64"]) -> bytes:
    """One ``event: data`` frame holding ``entries``.

    JSON: one array of the messages; text: the bytes decoded as UTF-8 (invalid
    sequences replaced), every line break a new ``data:`` line, so no payload can
    end the event or start another; base64: the bytes encoded, one line.
    """
    if mode == "json":
        payload = render_body(entries, True).decode("utf-8")
    elif mode == "text":
        payload = b"".join(entries).decode("utf-8", "replace")
    else:
        payload = base64.b64encode(b"".join(entries)).decode("ascii")
    return b"event: data\n" + _data_lines(payload) + b"\n"


def sse_control(next_offset: str, cursor: str | None, *, up_to_date: bool, closed: bool) -> bytes:
    """The ``event: control`` frame after data (or alone): where to resume, and the state.

    A closed stream's last control has ``streamClosed`` and no cursor.
    """
    body: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        body["streamClosed"] = True
    elif cursor is not None:
        body["streamCursor"] = cursor
    if up_to_date:
        body["upToDate"] = True
    return b"event: control\ndata:" + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


SSE_KEEPALIVE: Final = b":\n\n"


def check_position(position: int, tail: int) -> None:
    if position > tail:
        raise DsError("the offset is beyond the end of the stream")
    if position > MAX_POSITION:
        raise DsError("the offset is out of range")
