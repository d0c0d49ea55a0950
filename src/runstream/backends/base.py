"""The EventLog contract every backend implements, and the follow loop they share.

A backend stores streams (append-only logs of :class:`Event`) and wakes local
followers when something changes. It implements a handful of primitives; the
gap-free ``follow`` is written once here on top of them:

1. register interest in the stream (:meth:`Notifier.watch`) *before* reading;
2. read everything after the current position by offset (never "latest");
3. if nothing new, wait for the registered wake-up (or a safety timeout).

Because the position only ever advances from ids actually received and the
wake-up is armed before the read, an event appended at any moment, including
exactly during the hand-over from history to live, is read by the next
iteration. There is no "``$``" to re-resolve.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Self

from runstream.backends.space import SpaceGuard
from runstream.core.jsonbody import check_text, is_utf8
from runstream.core.model import (
    END_TYPE,
    JSON,
    MAX_TYPE_LENGTH,
    UNREADABLE_TYPE,
    AppendResult,
    EncodedEvents,
    Event,
    NewEvent,
    Page,
    Producer,
    Reset,
    StreamInfo,
    encode_data,
    validate_event_type,
    validate_stream_name,
)
from runstream.errors import (
    HistoryLost,
    RunstreamError,
    StreamDeleted,
    StreamNotFound,
    ValidationError,
)
from runstream.protocol.cursor import NOW, Position, check_position

_log = logging.getLogger("runstream.backends")

DEFAULT_PAGE_LIMIT = 1000
MAX_PAGE_LIMIT = 10_000
FOLLOW_BATCH = 1000
FOLLOW_MAX_BYTES = 4 * 1024 * 1024
"""Byte budget (see :func:`event_size`) of each read a follower makes: with large
events, a follower that fell behind reads a few at a time, not a thousand."""
SAFETY_POLL_SECONDS = 10.0
"""Followers re-read state at least this often even without a wake-up, so a
close or delete that no notification reported is still noticed.

Wake-ups are not expected to go missing: appends in this process notify
directly, the SQLite backend's probe notices commits of other processes, and
the Redis backend wakes every follower whenever its pub/sub subscription is
(re)established. This is the backstop behind those, so it is long: each
waiting follower costs one read per period, which for a server following
thousands of quiet streams is the whole of its idle load."""


def _decode_all(texts: Sequence[str]) -> list[JSON]:
    """Decode JSON texts, raising :class:`ValidationError` for one that is not a JSON value.

    One parse of the texts joined into an array is several times faster than
    one parse each; each is parsed alone only to tell which one is wrong.
    """
    try:
        values = json.loads("[" + ",".join(texts) + "]")
    except (TypeError, ValueError):
        values = None
    if isinstance(values, list) and len(values) == len(texts):
        return values
    for text in texts:
        try:
            json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"encoded event data is not JSON: {exc}", field="data") from exc
    raise ValidationError("encoded event data must be one JSON value each", field="data")


StoredRow = tuple[int, str, str, float]
"""An entry as a backend stores it: ``(id, type, data JSON text, time)``."""


def events_from_rows(stream: str, rows: Sequence[StoredRow], log: EventLog) -> list[Event]:
    """The events of stored rows, each one servable on every transport.

    A row that could not be served (its type is not a valid event type, its data
    is not one JSON value, or either holds text UTF-8 cannot encode) comes out as
    an :data:`~runstream.core.model.UNREADABLE_TYPE` item with the same id, so a
    reader passes over it knowingly instead of failing on it forever. Each one is
    counted in ``log.unreadable_events`` and logged.

    One parse of the texts joined into an array, and one encode check of the
    joined texts and types, settle a page of good rows; rows are looked at one by
    one only when that fails.
    """
    if not rows:
        return []
    texts = [r[2] for r in rows]
    joined = "[" + ",".join(texts) + "]"
    try:
        values = json.loads(joined)
    except (ValueError, RecursionError):
        values = None
    if (
        isinstance(values, list)
        and len(values) == len(rows)
        and is_utf8(joined)
        and _valid_types("".join([r[1] for r in rows]), rows)
    ):
        return [Event(i, t, v, tm, d) for (i, t, d, tm), v in zip(rows, values, strict=True)]
    return [_row_event(stream, row, log) for row in rows]


def _valid_types(joined: str, rows: Sequence[StoredRow]) -> bool:
    return (
        is_utf8(joined)
        and "\n" not in joined
        and "\r" not in joined
        and "\0" not in joined
        and all(0 < len(r[1]) <= MAX_TYPE_LENGTH for r in rows)
    )


def _row_event(stream: str, row: StoredRow, log: EventLog) -> Event:
    id_, type_, text, time = row
    try:
        validate_event_type(type_, allow_reserved=True)
        if not is_utf8(text):
            raise ValueError("data holds text UTF-8 cannot encode")
        value = json.loads(text)
    except (ValidationError, ValueError, RecursionError) as exc:
        return log.unreadable(stream, id_, time, f"{type(exc).__name__}: {exc}")
    return Event(id_, type_, value, time, text)


def utf8_len(text: str) -> int:
    """Length of ``text`` encoded as UTF-8 (a lone surrogate counts 3 bytes, never raises)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def event_size(type_: str, data_json: str) -> int:
    """What an event weighs against a page's byte budget: UTF-8 bytes of its type and data JSON.

    The same on every backend, so a byte-bounded read cuts pages at the same events
    everywhere (see :meth:`EventLog.read`).
    """
    return utf8_len(type_) + utf8_len(data_json)


def within_budget(events: Iterable[Event], max_bytes: int | None) -> list[Event]:
    """The longest prefix of ``events`` whose sizes sum to at most ``max_bytes``, never empty.

    The first event is always included, whatever its size, so a reader always moves on.
    Stops consuming ``events`` as soon as the budget is reached.
    """
    if max_bytes is None:
        return list(events)
    page: list[Event] = []
    total = 0
    for event in events:
        data_json = event.data_json if event.data_json is not None else encode_data(event.data)
        total += event_size(event.type, data_json)
        if page and total > max_bytes:
            break
        page.append(event)
        if total >= max_bytes:
            break
    return page


class Notifier:
    """In-process wake-ups for followers, keyed by stream.

    A follower calls :meth:`watch` *before* it reads, then awaits the returned
    future if the read found nothing. :meth:`notify` must be called on the
    event loop's thread (use ``loop.call_soon_threadsafe`` from elsewhere).
    """

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Future[None]]] = {}

    def watch(self, stream: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.setdefault(stream, set()).add(fut)
        return fut

    def unwatch(self, stream: str, fut: asyncio.Future[None]) -> None:
        watchers = self._watchers.get(stream)
        if watchers is not None:
            watchers.discard(fut)
            if not watchers:
                del self._watchers[stream]
        if not fut.done():
            fut.cancel()

    def notify(self, stream: str) -> None:
        for fut in self._watchers.pop(stream, ()):
            if not fut.done():
                fut.set_result(None)

    def notify_all(self) -> None:
        for stream in list(self._watchers):
            self.notify(stream)

    def watched(self) -> list[str]:
        return list(self._watchers)


class EventLog(ABC):
    """An async, durable, append-only log of events per stream.

    Use as ``async with backend:`` or call :meth:`aclose` when done. All
    methods raise :class:`~runstream.errors.RunstreamError` subclasses only.
    """

    #: URL scheme(s) this backend serves, for messages.
    scheme: str = ""

    def __init__(self) -> None:
        self.notifier = Notifier()
        self.safety_poll = SAFETY_POLL_SECONDS
        self.follow_max_bytes: int = FOLLOW_MAX_BYTES
        self.unreadable_events = 0
        """Stored entries served as :data:`UNREADABLE_TYPE` items since start (a metric)."""
        self.space_guard: SpaceGuard | None = None
        """Checked before every append (see :mod:`runstream.backends.space`); None: no check."""

    def check_space(self) -> None:
        """Raise :class:`~runstream.errors.InsufficientStorage` if the space guard refuses."""
        if self.space_guard is not None:
            self.space_guard.check()

    def storage_path(self) -> str | None:
        """The local directory this backend writes to (for the free-disk check), if any."""
        return None

    async def storage_stats(self) -> dict[str, float]:
        """Size and row counts of the store, by name (e.g. ``file_bytes``, ``events``).

        Engines report what they can measure; the default is nothing.
        """
        return {}

    async def reclaim_space(self) -> int:
        """Return space freed by deletions to the system (SQLite); how many pages were."""
        return 0

    def unreadable(self, stream: str, id_: int, time: float, reason: str) -> Event:
        """The item served in place of stored entry ``id_`` that cannot be served; counted.

        Called by backends through :func:`events_from_rows` (possibly from a
        reader thread: the count is a statistic, not a synchronisation point).
        """
        self.unreadable_events += 1
        _log.warning(
            "stream %r: stored entry %d cannot be served (%s); readers get an %r item",
            stream,
            id_,
            reason[:200],
            UNREADABLE_TYPE,
        )
        return Event(id_, UNREADABLE_TYPE, {"reason": reason[:500]}, time)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open connections / threads. Idempotent. Called by ``async with``."""
        return None

    async def aclose(self) -> None:
        """Release every resource. Idempotent; followers end with an error."""
        return None

    async def ping(self) -> None:
        """Raise :class:`~runstream.errors.BackendError` if the backend is unreachable."""
        return None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- primitives backends implement ---------------------------------------

    @abstractmethod
    async def _append(
        self, stream: str, events: Sequence[NewEvent], producer: Producer | None
    ) -> AppendResult:
        """Store ``events`` atomically (all or none), creating the stream if absent.

        Must raise :class:`StreamClosed` if closed; implement the producer rule:
        ``seq == last accepted`` → return the original ids with
        ``duplicate=True``; ``seq < last`` → :class:`StaleProducerSeq`. Must
        wake local followers (``self.notifier.notify``) after the data is durable.
        """

    async def _append_encoded(self, stream: str, runs: Sequence[EncodedEvents]) -> AppendResult:
        """Store the events of ``runs`` (none empty) atomically, as :meth:`_append` would.

        The default builds the equivalent :class:`NewEvent` list (decoding
        the data JSON) and calls :meth:`_append` without a producer; a
        backend overrides it when it can store the encoded data directly.
        """
        events: list[NewEvent] = []
        for run in runs:
            type_ = run.type
            events += [
                NewEvent.trusted(type_, data, data_json)
                for data, data_json in zip(_decode_all(run.data_json), run.data_json, strict=True)
            ]
        return await self._append(stream, events, None)

    @abstractmethod
    async def _read(
        self, stream: str, after: int, limit: int, max_bytes: int | None = None
    ) -> tuple[StreamInfo, list[Event]]:
        """Return the stream's state and up to ``limit`` events with ``id > after``.

        With ``max_bytes``, only as many events as :func:`within_budget` keeps
        (at least one), and without loading more than one event past the
        budget. The state and the events must be one consistent snapshot.
        Raise :class:`StreamNotFound` if the stream does not exist.
        """

    @abstractmethod
    async def info(self, stream: str) -> StreamInfo:
        """State of ``stream``; :class:`StreamNotFound` if it does not exist."""

    async def info_many(self, streams: Sequence[str]) -> dict[str, StreamInfo | None]:
        """State of each of ``streams`` (``None`` for one that does not exist).

        For periodic checks over many streams at once; backends with a network
        round trip per call answer all of them in a few requests. Raises
        :class:`ValidationError` if any name is invalid.
        """
        for stream in streams:
            validate_stream_name(stream)
        found: dict[str, StreamInfo | None] = {}
        for stream in streams:
            try:
                found[stream] = await self.info(stream)
            except StreamNotFound:
                found[stream] = None
        return found

    @abstractmethod
    async def _close(self, stream: str, status: str | None, reason: str | None) -> StreamInfo:
        """Append the end entry and mark the stream closed; no-op if already closed.

        Creates the stream (closed, with only the end entry) if it does not exist.
        """

    @abstractmethod
    async def delete(self, stream: str) -> None:
        """Delete the stream and its history. :class:`StreamNotFound` if absent.

        Followers end with :class:`StreamDeleted`; a stream re-created later
        under the same name gets a new epoch.
        """

    async def delete_many(self, streams: Iterable[str]) -> dict[str, RunstreamError]:
        """Delete each of ``streams`` as :meth:`delete` does; return the ones that failed.

        Streams that do not exist are skipped (not failures). Engines that can delete
        several small streams in one write do (SQLite: a bounded number of events per
        transaction, whatever the streams), so a batch of deletions costs a few commits
        instead of one per stream. The default deletes them concurrently.
        """
        names = list(dict.fromkeys(streams))
        outcomes = await asyncio.gather(
            *(self.delete(name) for name in names), return_exceptions=True
        )
        failed: dict[str, RunstreamError] = {}
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, StreamNotFound) or outcome is None:
                continue
            if not isinstance(outcome, RunstreamError):
                raise outcome
            failed[name] = outcome
        return failed

    @abstractmethod
    async def list_streams(
        self, *, prefix: str = "", start_after: str = "", limit: int = 100, end_before: str = ""
    ) -> list[StreamInfo]:
        """Streams ordered by name, names > ``start_after`` starting with ``prefix``, and
        names < ``end_before`` unless it is empty."""

    @abstractmethod
    async def trim(
        self, stream: str, *, max_len: int | None = None, max_age: float | None = None
    ) -> int:
        """Drop the oldest events beyond ``max_len`` or older than ``max_age`` seconds.

        Returns how many were removed. Ids never change; ``first_id`` advances.
        The end entry of a closed stream is never removed.
        """

    # -- public API built on the primitives ----------------------------------

    async def append(
        self,
        stream: str,
        events: NewEvent | Sequence[NewEvent],
        *,
        producer: Producer | None = None,
    ) -> AppendResult:
        """Append one event or a batch atomically; returns the ids it got.

        Raises :class:`StreamClosed` (409), :class:`StaleProducerSeq` (409),
        :class:`ValidationError` (400) or :class:`BackendError`.
        """
        validate_stream_name(stream)
        self.check_space()
        batch = [events] if isinstance(events, NewEvent) else list(events)
        if not batch:
            raise ValidationError("an append needs at least one event", field="events")
        for item in batch:
            if not isinstance(item, NewEvent):
                raise ValidationError("events must be NewEvent instances", field="events")
        return await self._append(stream, batch, producer)

    async def append_encoded(self, stream: str, runs: Sequence[EncodedEvents]) -> AppendResult:
        """Append pre-encoded events atomically, in order; the fast path for bulk output.

        Stores exactly what :meth:`append` of the equivalent
        :meth:`NewEvent.trusted` events would (same ids, types, data and
        errors), but a backend can skip building one object per event: the
        runs executor appends a command's output this way. Empty runs are
        ignored; at least one event is needed. No producer: use
        :meth:`append` for idempotent retries.
        """
        validate_stream_name(stream)
        self.check_space()
        batch = list(runs)
        for item in batch:
            if not isinstance(item, EncodedEvents):
                raise ValidationError("runs must be EncodedEvents instances", field="events")
        batch = [item for item in batch if item.data_json]
        if not batch:
            raise ValidationError("an append needs at least one event", field="events")
        return await self._append_encoded(stream, batch)

    async def close(
        self, stream: str, status: str | None = None, reason: str | None = None
    ) -> StreamInfo:
        """Close ``stream`` durably: an end entry carrying ``status``/``reason`` is appended.

        Closing an already closed stream changes nothing and returns its state.
        """
        validate_stream_name(stream)
        for label, value in (("status", status), ("reason", reason)):
            if value is not None:
                if not isinstance(value, str) or len(value) > 1000:
                    raise ValidationError(
                        f"close {label} must be a string up to 1000 chars", field=label
                    )
                check_text(value, where=label)
        return await self._close(stream, status, reason)

    async def read(
        self,
        stream: str,
        after: int = 0,
        limit: int = DEFAULT_PAGE_LIMIT,
        *,
        epoch: str | None = None,
        max_bytes: int | None = None,
    ) -> Page:
        """Read up to ``limit`` events after position ``after``.

        With ``max_bytes``, the page also stops before the event that would take
        the sum of :func:`event_size` over ``max_bytes``; it always holds at
        least one event if there is one, so a reader always progresses, and
        ``next_after`` is the last id it holds. Every backend cuts at the same
        events. Raises :class:`HistoryLost` (410) if ``epoch`` is given and
        differs, or ``after`` is older than the retained history or beyond its
        end; the caller must restart from the exception's ``first_id - 1``.
        """
        validate_stream_name(stream)
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            raise ValidationError(f"limit must be 1-{MAX_PAGE_LIMIT}", field="limit")
        if after < 0:
            raise ValidationError("after must be >= 0", field="after")
        if max_bytes is not None and max_bytes < 1:
            raise ValidationError("max_bytes must be >= 1", field="max_bytes")
        info, events = await self._read(stream, after, limit, max_bytes)
        pos, reset = check_position(info, after, epoch)
        if reset is not None:
            raise HistoryLost(stream, epoch=info.epoch, first_id=info.first_id, reason=reset.reason)
        if pos != after:
            info, events = await self._read(stream, pos, limit, max_bytes)
        next_after = events[-1].id if events else pos
        closed = info.closed and next_after >= info.last_id
        return Page(stream, info.epoch, tuple(events), next_after, closed)

    def follow(
        self,
        stream: str,
        after: int | str | Position = 0,
        *,
        epoch: str | None = None,
    ) -> AsyncIterator[Event | Reset]:
        """Yield every event after ``after``, history first, then live, until the stream closes.

        ``after`` is an offset, ``"now"`` (only events appended after this call;
        the tail is fixed once, on entry) or a :class:`Position`. The last item
        of a closed stream is its end :class:`Event` (``is_end``), after which
        the iterator stops. A :class:`Reset` is yielded, never skipped, when the
        position cannot be served (see :func:`check_position`); following then
        continues from the reported ``after``.

        Raises :class:`StreamNotFound` if the stream does not exist on entry and
        :class:`StreamDeleted` if it is deleted while followed.
        """
        validate_stream_name(stream)
        if isinstance(after, Position):
            position = after
        elif after == NOW:
            position = Position(now=True)
        elif isinstance(after, int) and not isinstance(after, bool) and after >= 0:
            position = Position(after)
        else:
            raise ValidationError(f"invalid follow position {after!r}", field="after")
        if epoch is not None:
            position = Position(position.offset, epoch, position.now)
        return self._follow(stream, position)

    async def _follow(self, stream: str, position: Position) -> AsyncIterator[Event | Reset]:
        info = await self.info(stream)
        if position.now:
            # The tail is fixed here, once. A closed stream still yields its end entry.
            pos = info.tail
            cur_epoch = info.epoch
        else:
            pos, reset = check_position(info, position.offset, position.epoch)
            cur_epoch = info.epoch
            if reset is not None:
                yield reset
        while True:
            fut = self.notifier.watch(stream)
            try:
                try:
                    info, events = await self._read(
                        stream, pos, FOLLOW_BATCH, self.follow_max_bytes
                    )
                except StreamNotFound:
                    raise StreamDeleted(stream) from None
                if info.epoch != cur_epoch:
                    cur_epoch = info.epoch
                    reset = Reset(info.epoch, info.first_id - 1, "epoch_changed", pos)
                    pos = info.first_id - 1
                    yield reset
                    continue
                if events and events[0].id != pos + 1:
                    # The events we needed were trimmed between two reads.
                    yield Reset(info.epoch, events[0].id - 1, "trimmed", pos)
                elif not events and pos < info.first_id - 1:
                    yield Reset(info.epoch, info.first_id - 1, "trimmed", pos)
                    pos = info.first_id - 1
                for event in events:
                    pos = event.id
                    yield event
                    if event.type == END_TYPE:
                        return
                if events:
                    continue
                if info.closed and pos >= info.last_id:
                    # The end entry is gone (trimmed) or was passed: nothing more can come.
                    return
                await asyncio.wait((fut,), timeout=self.safety_poll)
            finally:
                self.notifier.unwatch(stream, fut)
