"""``memory://`` — an in-process backend for tests and embedding. Nothing survives the process."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from runstream.backends.base import EventLog, within_budget
from runstream.core.model import (
    END_TYPE,
    JSON,
    AppendResult,
    Event,
    NewEvent,
    Producer,
    StreamInfo,
    encode_data,
    new_epoch,
    now,
)
from runstream.errors import StaleProducerSeq, StreamClosed, StreamNotFound


@dataclass(slots=True)
class _Stream:
    info: StreamInfo
    events: list[Event] = field(default_factory=list)
    # producer id -> (last seq, first_id, last_id)
    producers: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class MemoryEventLog(EventLog):
    scheme = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._streams: dict[str, _Stream] = {}

    def _get(self, stream: str) -> _Stream:
        try:
            return self._streams[stream]
        except KeyError:
            raise StreamNotFound(stream) from None

    def _create(self, stream: str) -> _Stream:
        st = self._streams.get(stream)
        if st is None:
            info = StreamInfo(stream, new_epoch(), "open", 1, 0, now())
            st = self._streams[stream] = _Stream(info)
        return st

    async def _append(
        self, stream: str, events: Sequence[NewEvent], producer: Producer | None
    ) -> AppendResult:
        st = self._streams.get(stream)
        if st is not None and st.info.closed:
            raise StreamClosed(stream)
        if producer is not None and st is not None and producer.id in st.producers:
            last_seq, first, last = st.producers[producer.id]
            if producer.seq == last_seq:
                return AppendResult(stream, st.info.epoch, first, last, duplicate=True)
            if producer.seq < last_seq:
                raise StaleProducerSeq(stream, producer.id, producer.seq, last_seq)
        st = self._create(stream)
        t = now()
        first_id = st.info.last_id + 1
        st.events.extend(
            Event(first_id + i, e.type, e.data, t, e.data_json) for i, e in enumerate(events)
        )
        last_id = first_id + len(events) - 1
        st.info = replace(st.info, last_id=last_id)
        if producer is not None:
            st.producers[producer.id] = (producer.seq, first_id, last_id)
        self.notifier.notify(stream)
        return AppendResult(stream, st.info.epoch, first_id, last_id)

    async def _read(
        self, stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> tuple[StreamInfo, list[Event]]:
        st = self._get(stream)
        # ids are contiguous from the first retained one, so the offset is arithmetic.
        start = max(0, after - (st.info.first_id - 1))
        if max_bytes is None:
            return st.info, st.events[start : start + limit]
        events = st.events
        end = min(len(events), start + limit)
        return st.info, within_budget((events[i] for i in range(start, end)), max_bytes)

    async def info(self, stream: str) -> StreamInfo:
        return self._get(stream).info

    async def _close(self, stream: str, status: str | None, reason: str | None) -> StreamInfo:
        st = self._create(stream)
        if st.info.closed:
            return st.info
        t = now()
        end_id = st.info.last_id + 1
        data: dict[str, JSON] = {"status": status, "reason": reason}
        st.events.append(Event(end_id, END_TYPE, data, t, encode_data(data)))
        st.info = replace(
            st.info,
            status="closed",
            last_id=end_id,
            closed_at=t,
            close_status=status,
            close_reason=reason,
        )
        self.notifier.notify(stream)
        return st.info

    async def delete(self, stream: str) -> None:
        self._get(stream)
        del self._streams[stream]
        self.notifier.notify(stream)

    async def storage_stats(self) -> dict[str, float]:
        """``streams`` and ``events`` (retained, end entries included)."""
        return {
            "streams": float(len(self._streams)),
            "events": float(sum(len(st.events) for st in self._streams.values())),
        }

    async def list_streams(
        self, *, prefix: str = "", start_after: str = "", limit: int = 100, end_before: str = ""
    ) -> list[StreamInfo]:
        names = sorted(
            n
            for n in self._streams
            if n.startswith(prefix) and n > start_after and (not end_before or n < end_before)
        )
        return [self._streams[n].info for n in names[:limit]]

    async def trim(
        self, stream: str, *, max_len: int | None = None, max_age: float | None = None
    ) -> int:
        st = self._get(stream)
        events = st.events
        keep_from = 0
        if max_len is not None:
            keep_from = max(keep_from, len(events) - max_len)
        if max_age is not None:
            cutoff = now() - max_age
            keep_from = max(keep_from, bisect.bisect_left([e.time for e in events], cutoff))
        if events and events[-1].type == END_TYPE:
            keep_from = min(keep_from, len(events) - 1)
        if keep_from <= 0:
            return 0
        del events[:keep_from]
        first_id = events[0].id if events else st.info.last_id + 1
        st.info = replace(st.info, first_id=first_id)
        self.notifier.notify(stream)
        return keep_from
