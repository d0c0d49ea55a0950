"""One log, two dialects: a native runstream stream read through the Durable Streams endpoint.

``GET``/``HEAD /v1/stream/{name}`` of a name that is not a DS stream but is an
event stream (a run's events, the runs feed ``runstream:runs``, anything appended
through ``/v1/streams``) serves it read-only as an ``application/json`` DS stream:

* each event is one JSON message ``{"id", "type", "data", "time"}`` (the stored
  data text, not re-encoded), the ``end`` entry included;
* position ``p`` is "after event id ``p``", so offset ``0000000000000000_<id>``
  resumes exactly after event ``id`` (and ``Stream-Next-Offset`` is the last id sent);
* the stream is closed (``Stream-Closed``) once it is closed natively and read to its end;
* history trimmed away answers 410; writes answer 405 (the native API writes it).

Live reads wait on the event log's own notifier (the engine's wake-ups: the
SQLite commit probe, Redis pub/sub), exactly as native followers do.
"""

from __future__ import annotations

import json
from typing import Final

from runstream.backends.base import EventLog, Notifier
from runstream.backends.durable import READ_MAX_BYTES, DsRead
from runstream.core.durable import JSON_TYPE, DsGone, DsNotFound, DsState
from runstream.core.model import Event, encode_data
from runstream.errors import HistoryLost, StreamNotFound, ValidationError
from runstream.protocol.durable import check_position

PAGE: Final = 1000


def event_message(event: Event) -> bytes:
    """One event as a DS JSON message (compact; the data text as stored)."""
    data = event.data_json if event.data_json is not None else encode_data(event.data)
    return (
        f'{{"id":{event.id},"type":{json.dumps(event.type)},"data":{data},'
        f'"time":{json.dumps(event.time)}}}'
    ).encode("utf-8", "surrogatepass")


class NativeView:
    """Reads of :class:`EventLog` streams in the shape :mod:`.durable_live` serves."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.notifier: Notifier = log.notifier

    async def head(self, name: str, now: float) -> DsState:
        try:
            info = await self.log.info(name)
        except (StreamNotFound, ValidationError):
            raise DsNotFound(f"stream {name!r} does not exist") from None
        return DsState(
            name=name,
            uid=f"n{info.epoch}",
            content_type=JSON_TYPE,
            created=info.created_at,
            touched=now,
            base=0,
            tail=info.last_id,
            closed=info.closed,
        )

    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead:
        state = await self.head(name, now)
        start = state.tail if position is None else position
        check_position(start, state.tail)
        if start >= state.tail:
            return DsRead(state, start, start, [])
        try:
            page = await self.log.read(name, start, PAGE, epoch=None, max_bytes=max_bytes)
        except HistoryLost as exc:
            raise DsGone(
                f"history before event {exc.first_id} of {name!r} was trimmed; "
                f"read from offset {exc.first_id - 1}"
            ) from None
        except StreamNotFound:
            raise DsNotFound(f"stream {name!r} does not exist") from None
        events = page.events
        end = events[-1].id if events else start
        if events and events[0].id != start + 1:
            raise DsGone(f"events after {start} of {name!r} were trimmed")
        # The state of the page's own snapshot: the tail may have moved since the head.
        tail = max(state.tail, end)
        closed = page.closed and end >= tail
        state = DsState(
            name=name,
            uid=state.uid,
            content_type=JSON_TYPE,
            created=state.created,
            touched=now,
            tail=tail,
            closed=closed or (state.closed and end >= state.tail),
        )
        return DsRead(state, start, end, [event_message(e) for e in events])
