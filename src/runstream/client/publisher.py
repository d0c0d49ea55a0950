"""Batching publishers: many small events (LLM tokens, log lines) in few appends.

``client.publisher(stream, linger=0.005, max_events=100)`` returns a publisher
whose :meth:`~AsyncPublisher.publish` only queues the event. A batch is sent
``linger`` seconds after its first event, or at once when it holds
``max_events``; while one batch is in flight the next one fills, and is sent
as soon as the first is answered (one append at a time per publisher, so
events keep their order). :meth:`~AsyncPublisher.flush` waits until
everything queued is stored; closing the publisher flushes.

Every batch is one :meth:`AsyncClient.publish_many` call: it takes the
client's next producer seq for the stream and every retry of it resends that
seq, so a batch whose answer was lost is stored once. A batch that still
fails (the server stayed unreachable, the stream is closed, the batch is too
large) fails the publisher: the error is raised by the next ``publish``,
``flush`` or close, and events queued after that batch are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any

from runstream.core.model import JSON, AppendResult, NewEvent
from runstream.errors import RunstreamError, UsageError, ValidationError

if TYPE_CHECKING:
    from runstream.client._async import AsyncClient
    from runstream.client._sync import Client

__all__ = ["AsyncPublisher", "SyncPublisher"]

DEFAULT_LINGER = 0.005
DEFAULT_MAX_EVENTS = 100
BACKLOG_BATCHES = 10
"""A publisher whose queue holds this many full batches makes ``publish`` wait for the
sender (backpressure: memory stays bounded when events come faster than appends)."""


def _check(linger: float, max_events: int) -> None:
    if not linger >= 0:
        raise ValidationError("linger must be >= 0 seconds", field="linger")
    if max_events < 1:
        raise ValidationError("max_events must be >= 1", field="max_events")


class AsyncPublisher:
    """Batches appends to one stream; use ``async with client.publisher(stream) as pub:``."""

    def __init__(
        self,
        client: AsyncClient,
        stream: str,
        *,
        linger: float = DEFAULT_LINGER,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        _check(linger, max_events)
        self.client = client
        self.stream = stream
        self.linger = linger
        self.max_events = max_events
        self.last_result: AppendResult | None = None
        """The answer to the last batch stored (its ``last_id`` is the newest event's id)."""
        self.batches = 0
        """Batches sent so far."""
        self._pending: list[NewEvent] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def backlog(self) -> int:
        """Events queued and not yet sent."""
        return len(self._pending)

    def publish_nowait(self, type: str, data: JSON = None) -> None:
        """Queue one event (validated now); must be called on the client's event loop."""
        self.queue(NewEvent(type, data))

    def queue(self, event: NewEvent) -> None:
        """Queue a validated event (the publisher's loop only)."""
        self._raise_if_failed()
        if self._closed:
            raise UsageError("this publisher is closed")
        self._pending.append(event)
        if len(self._pending) >= self.max_events:
            self._kick()
        elif self._timer is None and (self._sender is None or self._sender.done()):
            self._timer = asyncio.get_running_loop().call_later(self.linger, self._kick)

    async def publish(self, type: str, data: JSON = None) -> None:
        """Queue one event; waits only when the queue is :data:`BACKLOG_BATCHES` batches long."""
        self.publish_nowait(type, data)
        if len(self._pending) >= self.max_events * BACKLOG_BATCHES:
            await self._wait_sender()

    async def flush(self) -> AppendResult | None:
        """Send what is queued now and wait until all of it is stored; the last answer."""
        self._kick()
        await self._wait_sender()
        return self.last_result

    async def aclose(self) -> None:
        """Flush, then refuse further events. Idempotent."""
        if self._closed:
            self._raise_if_failed()
            return
        try:
            await self.flush()
        finally:
            self._closed = True

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sending --------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending and (self._sender is None or self._sender.done()):
            self._sender = asyncio.get_running_loop().create_task(
                self._send_all(), name=f"runstream-publisher:{self.stream}"
            )

    async def _wait_sender(self) -> None:
        sender = self._sender
        while sender is not None and not sender.done():
            await asyncio.shield(sender)
            sender = self._sender
        self._raise_if_failed()

    async def _send_all(self) -> None:
        # What queued while a batch was in flight has waited at least as long as the
        # linger: it goes at once, in batches of at most max_events.
        while self._pending and self._error is None:
            batch = self._pending[: self.max_events]
            del self._pending[: self.max_events]
            try:
                self.last_result = await self.client.publish_many(self.stream, batch)
            except BaseException as exc:
                self._error = exc
                self._pending.clear()
                if not isinstance(exc, Exception):
                    raise
                return
            self.batches += 1


class SyncPublisher:
    """The batching publisher of the sync :class:`~runstream.client.Client`.

    ``publish`` validates the event in the calling thread and hands it to the
    client's loop thread without waiting for it (a few microseconds), so a
    thread can publish tokens as fast as it makes them; ``flush`` and
    ``close`` (or leaving ``with``) wait until everything is stored.
    """

    def __init__(
        self,
        client: Client,
        stream: str,
        *,
        linger: float = DEFAULT_LINGER,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        _check(linger, max_events)
        self._client = client
        self._loop = client._runner.loop
        self._lock = threading.Lock()
        self._publisher = AsyncPublisher(
            client._async, stream, linger=linger, max_events=max_events
        )

    @property
    def stream(self) -> str:
        return self._publisher.stream

    @property
    def last_result(self) -> AppendResult | None:
        return self._publisher.last_result

    @property
    def batches(self) -> int:
        return self._publisher.batches

    def publish(self, type: str, data: JSON = None) -> None:
        """Queue one event (raises a validation error at once, a send error later)."""
        event = NewEvent(type, data)
        publisher = self._publisher
        publisher._raise_if_failed()
        if publisher._closed:
            raise UsageError("this publisher is closed")
        if publisher.backlog >= publisher.max_events * BACKLOG_BATCHES:
            self.flush()  # backpressure: the loop thread is behind
        with self._lock:  # keeps call order = queue order across threads
            self._loop.call_soon_threadsafe(self._queue, event)

    def _queue(self, event: NewEvent) -> None:
        # A failed publisher keeps its error: the next publish, flush or close raises it.
        with contextlib.suppress(RunstreamError):
            self._publisher.queue(event)

    def flush(self) -> AppendResult | None:
        """Wait until everything published so far is stored; the last answer."""
        result: AppendResult | None = self._client._call(self._publisher.flush())
        return result

    def close(self) -> None:
        """Flush, then refuse further events. Idempotent."""
        self._client._call(self._publisher.aclose())

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
