"""What subscribers are sent: a :class:`Frame` per event or reset, encoded once per transport.

A frame is shared by every subscriber of a stream in a process; its SSE and
WebSocket encodings are computed on first use and cached, so an event is
serialised once per stream and transport, not once per client.
"""

from __future__ import annotations

import json
from typing import Final

from runstream.backends.base import event_size
from runstream.core.model import Event, Reset, encode_data, rfc3339
from runstream.protocol.cursor import format_sse_id
from runstream.protocol.sse import encode_event

__all__ = ["Frame"]

# One encoder for every frame: json.dumps with options builds a new encoder per call,
# which is most of the cost of encoding a page of history. Same output as encode_data().
_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encode(value: object) -> str:
    try:
        return _JSON.encode(value)
    except (TypeError, ValueError):
        return encode_data(value)  # raises the usual ValidationError with a message


class Frame:
    """One item for clients: an event or a reset, in an epoch. Encodings are cached."""

    __slots__ = ("_chunk", "_sse", "_ws", "epoch", "event", "reset", "size")

    def __init__(self, epoch: str, event: Event | None = None, reset: Reset | None = None) -> None:
        self.epoch = epoch
        self.event = event
        self.reset = reset
        self._sse: bytes | None = None
        self._chunk: bytes | None = None
        self._ws: str | None = None
        self.size = 0
        """What the frame weighs against byte limits: its event's :func:`event_size` (resets: 0;
        an event read without its data text, which no backend does, counts its type only)."""
        if event is not None:
            self.size = event_size(event.type, event.data_json or "")

    @property
    def id(self) -> int:
        """The position a client has reached after this frame."""
        if self.event is not None:
            return self.event.id
        assert self.reset is not None
        return self.reset.after

    @property
    def is_end(self) -> bool:
        return self.event is not None and self.event.is_end

    def sse(self) -> bytes:
        """The SSE encoding: ``id: <epoch>:<id>``, ``event: <type>``, ``time: <RFC 3339>``,
        ``data: <json>``.

        ``time`` is the server timestamp. Standard parsers (``EventSource``,
        npm ``eventsource``) ignore a field they do not know, so only clients
        that look for it (the SDK) see it.
        """
        if self._sse is None:
            if self.event is not None:
                event = self.event
                self._sse = encode_event(
                    _encode(event.data) if event.data_json is None else event.data_json,
                    event=event.type,
                    id=format_sse_id(self.epoch, event.id),
                    time=rfc3339(event.time),
                )
            else:
                assert self.reset is not None
                self._sse = encode_event(
                    _encode(self.reset.to_json()),
                    event="reset",
                    id=format_sse_id(self.epoch, self.reset.after),
                )
        return self._sse

    def sse_chunk(self) -> bytes:
        """:meth:`sse` as one HTTP/1.1 chunk (``<hex size>\\r\\n<sse>\\r\\n``), for a
        response written straight to its socket. Cached like the encoding."""
        if self._chunk is None:
            data = self.sse()
            self._chunk = b"%x\r\n%b\r\n" % (len(data), data)
        return self._chunk

    def ws(self) -> str:
        """The WebSocket message: the event's JSON with its ``"epoch"`` (``{"id", "type",
        "data", "time", "epoch"}``: the epoch travels with each event, as in SSE ids), or
        ``{"type": "reset", "data": ...}``."""
        if self._ws is None:
            event = self.event
            if event is not None:
                # Epochs are hex (new_epoch) or come from the log: nothing to escape, but
                # encode anyway, it is once per event and stream.
                self._ws = f'{event.to_json_text()[:-1]},"epoch":{_encode(self.epoch)}}}'

            else:
                assert self.reset is not None
                self._ws = _encode({"type": "reset", "data": self.reset.to_json()})
        return self._ws

    def __repr__(self) -> str:
        what = self.event or self.reset
        return f"Frame({self.epoch!r}, {what!r})"
