"""Fan-out: every subscriber of a stream in this process shares one backend reader.

A :class:`Hub` keeps one *feed* per followed stream: a single task running the
backend's gap-free ``follow`` and handing each event to the live subscribers'
bounded buffers. Encodings are cached on the shared :class:`Frame`, so an event
is serialised once per stream and transport, not once per client.

A :class:`Subscription` starts in *catch-up*: it reads the log itself, page by
page, from its own position. When a read comes back empty (it is at the tail of
the log) it joins the feed's live set, but only if the feed has not delivered
anything past that position (``feed.pos <= sub.pos``, same epoch). That check
and the join happen without an ``await`` in between, so no event can slip
between the last page and the first live frame; frames the feed delivers that
the subscriber already read from the log (``id <= sub.pos``) are dropped. No
gap, no duplicate.

Catch-up reads are bounded in events and in bytes (``HubLimits.page_bytes``,
at least one event per read). A live subscriber whose buffer exceeds its limit
(events or bytes) is ended with reason ``"slow_consumer"`` and its buffer
dropped: the producer is never slowed and memory stays bounded, and the client
resumes from the last id it received. Transports cut a client that stops taking
writes the same way (:meth:`Subscription.cut_slow`).

Lifecycle is reconciled from state: besides what the log says (end entry,
deletion), a periodic pass compares each feed with ``info()`` and with any
registered :data:`EndCheck` (e.g. "the run is terminal"), ending responses that
missed the moment. A stream first seen less than ``create_grace`` ago is not
ended for being absent.

No sockets here: transports (SSE, WebSocket, long-poll) drive a subscription
through :meth:`Subscription.get` and encode frames with :meth:`Frame.sse` /
:meth:`Frame.ws`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, cast

from runstream.backends.base import EventLog, event_size
from runstream.config import LimitSettings, ServerSettings, Settings
from runstream.core.model import Event, Reset, ResetReason, StreamInfo, encode_data, rfc3339
from runstream.errors import (
    HistoryLost,
    RunstreamError,
    StreamDeleted,
    StreamNotFound,
    TooManySubscribers,
)
from runstream.protocol.cursor import Position, format_sse_id
from runstream.protocol.sse import encode_event

log = logging.getLogger("runstream.server.hub")

_LIMITS, _SERVER = LimitSettings(), ServerSettings()

# One encoder for every frame: json.dumps with options builds a new encoder per call,
# which is most of the cost of encoding a page of history. Same output as encode_data().
_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

EndCheck = Callable[[str, StreamInfo | None], Awaitable[str | None]]
"""Extra lifecycle check run by the reconciler: given a stream and its state
(``None`` if absent), return a reason to end every response on it, or ``None``."""

EndReason = Literal[
    "end",  # the end entry was delivered
    "closed",  # the stream is closed and nothing more can come
    "deleted",
    "slow_consumer",
    "shutdown",
    "backend_error",
    "cancelled",  # the transport went away
]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _encode(value: object) -> str:
    try:
        return _JSON.encode(value)
    except (TypeError, ValueError):
        return encode_data(value)  # raises the usual ValidationError with a message


class Frame:
    """One item for clients: an event or a reset, in an epoch. Encodings are cached."""

    __slots__ = ("_sse", "_ws", "epoch", "event", "reset", "size")

    def __init__(self, epoch: str, event: Event | None = None, reset: Reset | None = None) -> None:
        self.epoch = epoch
        self.event = event
        self.reset = reset
        self._sse: bytes | None = None
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

    def ws(self) -> str:
        """The WebSocket message: the event's JSON, or ``{"type": "reset", "data": ...}``."""
        if self._ws is None:
            event = self.event
            if event is not None:
                self._ws = event.to_json_text()
            else:
                assert self.reset is not None
                self._ws = _encode({"type": "reset", "data": self.reset.to_json()})
        return self._ws

    def __repr__(self) -> str:
        what = self.event or self.reset
        return f"Frame({self.epoch!r}, {what!r})"


@dataclass(frozen=True, slots=True)
class HubLimits:
    """The hub's share of the settings (defaults: the settings' defaults)."""

    buffer: int = _LIMITS.subscriber_buffer
    buffer_bytes: int = _LIMITS.subscriber_buffer_bytes
    page: int = _LIMITS.max_page_limit
    """Events per log read while a subscriber catches up."""
    page_bytes: int = _LIMITS.max_page_bytes
    per_stream: int = _LIMITS.max_subscribers_per_stream
    total: int = _LIMITS.max_subscribers
    reconcile_interval: float = _SERVER.reconcile_interval
    create_grace: float = _SERVER.create_grace

    @classmethod
    def from_settings(cls, settings: Settings) -> HubLimits:
        lim, server = settings.limits, settings.server
        return cls(
            buffer=lim.subscriber_buffer,
            buffer_bytes=lim.subscriber_buffer_bytes,
            page=lim.max_page_limit,
            page_bytes=lim.max_page_bytes,
            per_stream=lim.max_subscribers_per_stream,
            total=lim.max_subscribers,
            reconcile_interval=server.reconcile_interval,
            create_grace=server.create_grace,
        )


class _Feed:
    """The one backend reader of a stream in this process."""

    def __init__(self, hub: Hub, stream: str) -> None:
        self.hub = hub
        self.stream = stream
        self.epoch: str | None = None
        self.pos = -1
        self.live: set[Subscription] = set()
        self.subs: set[Subscription] = set()
        self.created = time.monotonic()
        self.seen = False
        self.done = False
        self.error = False
        self.closed_since: int | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._run(), name=f"runstream-feed:{stream}"
        )

    # -- waiting for the feed to move -----------------------------------------

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_change(self, at_most: float) -> None:
        """Return when the feed delivered, changed epoch, became ready or ended (or timeout)."""
        if self.done:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait((fut,), timeout=at_most)
        finally:
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    @property
    def ready(self) -> bool:
        return self.epoch is not None or self.done

    # -- the reader -----------------------------------------------------------

    async def _run(self) -> None:
        backend = self.hub.backend
        reason: EndReason = "closed"
        try:
            info = await self._first_info()
            if info is None:
                reason = "deleted"
                return
            epoch = self.epoch = info.epoch
            self.pos = info.last_id
            self.seen = True
            self._wake()
            if info.closed:
                return
            async for item in backend.follow(self.stream, Position(info.last_id, info.epoch)):
                if isinstance(item, Reset):
                    epoch = item.epoch
                    self._deliver(Frame(epoch, reset=item))
                else:
                    self._deliver(Frame(epoch, item))
                    if item.is_end:
                        reason = "end"
                        return
        except StreamDeleted:
            reason = "deleted"
        except asyncio.CancelledError:
            reason = "shutdown"
            raise
        except Exception as exc:  # a feed must never die silently: end its clients, log why
            reason = "backend_error"
            self.error = True
            if not isinstance(exc, RunstreamError):
                log.exception("feed for stream %r failed", self.stream)
            else:
                log.warning("feed for stream %r failed: %s", self.stream, exc)
        finally:
            self._finish(reason)

    async def _first_info(self) -> StreamInfo | None:
        """The stream's state; waits up to ``create_grace`` for a stream not created yet."""
        backend = self.hub.backend
        while True:
            fut = backend.notifier.watch(self.stream)
            try:
                try:
                    return await backend.info(self.stream)
                except StreamNotFound:
                    left = self.created + self.hub.limits.create_grace - time.monotonic()
                    if left <= 0:
                        return None
                    await asyncio.wait((fut,), timeout=min(left, backend.safety_poll))
            finally:
                backend.notifier.unwatch(self.stream, fut)

    def _deliver(self, frame: Frame) -> None:
        if frame.reset is not None:
            self.epoch = frame.reset.epoch
        self.pos = frame.id
        for sub in tuple(self.live):
            sub._offer(frame)
        self._wake()

    def _finish(self, reason: EndReason) -> None:
        self.done = True
        self.hub._feed_done(self)
        for sub in tuple(self.live):
            sub._end(reason)
        self._wake()

    def terminate(self, reason: EndReason | str, *, catching_up: bool = True) -> None:
        """End subscribers now (all, or only live ones) and stop reading if none remain."""
        for sub in tuple(self.subs if catching_up else self.live):
            sub._end(reason)
        if not self.subs and not self.task.done():
            self.task.cancel()


class Subscription:
    """One client's view of a stream: catch-up from the log, then live frames from the feed.

    Create with :meth:`Hub.subscribe`; the caller must call :meth:`close` (or use
    ``async with``) when its client goes away. Call :meth:`get` in a loop until
    it returns ``None``; :attr:`end_reason` then says why.
    """

    def __init__(
        self,
        hub: Hub,
        stream: str,
        pos: int,
        epoch: str | None,
        transport: str,
        *,
        wait_for_create: bool = False,
    ) -> None:
        self.hub = hub
        self.stream = stream
        self.pos = pos
        self.epoch = epoch
        self.transport = transport
        self.live = False
        self.end_reason: str | None = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        """Resolved with the reason when the subscription ends (await it alongside a send)."""
        # A list, not a deque: it is only appended to and drained whole, and an
        # idle client's empty deque would cost ten times more.
        self._buf: list[Frame] = []
        self._buf_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        # A stream that does not exist yet (a run queued a moment ago) is waited for,
        # up to create_grace; once seen, its absence means it was deleted.
        self._create_deadline = (
            time.monotonic() + hub.limits.create_grace if wait_for_create else 0.0
        )
        self._feed = hub._feed_for(stream)
        self._feed.subs.add(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- called by the feed ---------------------------------------------------

    def _offer(self, frame: Frame) -> None:
        if self.end_reason is not None:
            return
        if frame.reset is not None:
            reset = frame.reset
            if reset.requested != self.pos:
                frame = Frame(
                    reset.epoch, reset=Reset(reset.epoch, reset.after, reset.reason, self.pos)
                )
            self.epoch = reset.epoch
            self.pos = reset.after
        else:
            assert frame.event is not None
            if frame.epoch == self.epoch and frame.event.id <= self.pos:
                return  # already read from the log during catch-up
            self.pos = frame.event.id
        self._buf.append(frame)
        self._buf_bytes += frame.size
        limits = self.hub.limits
        if len(self._buf) > limits.buffer:
            self.cut_slow(f"more than {limits.buffer} events buffered")
            return
        if self._buf_bytes > limits.buffer_bytes and len(self._buf) > 1:
            self.cut_slow(f"more than {limits.buffer_bytes} bytes buffered")
            return
        if frame.is_end:
            self._end("end")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take(self) -> list[Frame]:
        frames, self._buf = self._buf, []
        self._buf_bytes = 0
        return frames

    def cut_slow(self, why: str) -> None:
        """End as a slow consumer (reason ``"slow_consumer"``): logged, counted, buffer dropped.

        For the hub's own buffer limits and for transports whose client stopped
        taking writes; the client resumes from the last id it received.
        """
        if self.end_reason is not None:
            return
        self._buf.clear()
        self._buf_bytes = 0
        self.hub._slow(self, why)
        self._end("slow_consumer")

    def _end(self, reason: EndReason | str) -> None:
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self._feed.live.discard(self)
        self.live = False
        if not self.ended.done():
            self.ended.set_result(reason)
        self._wake()

    # -- called by the transport ----------------------------------------------

    async def get(self, idle: float | None = None) -> list[Frame] | None:
        """Next frames, in order: a page of history, or everything buffered live.

        Returns ``[]`` if ``idle`` seconds passed with nothing new (send a
        keepalive), ``None`` once the subscription is over (after the last
        frames were returned; see :attr:`end_reason`).
        """
        while True:
            if self._buf:
                return self._take()
            if self.end_reason is not None:
                return None
            if self.live:
                return await self._wait_live(idle)
            page = await self._catch_up()
            if page:
                return page

    async def _wait_live(self, idle: float | None) -> list[Frame] | None:
        # A bare future and one timer: this runs once per delivery per client, and
        # asyncio.wait() would add a wrapper future and callbacks each time.
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(idle, _resolve, waiter) if idle is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._buf:
            frames, self._buf = self._buf, []
            self._buf_bytes = 0
            return frames
        return None if self.end_reason is not None else []

    async def _catch_up(self) -> list[Frame] | None:
        """One step of catch-up: a page read, or the join. ``None``/``[]`` means call again."""
        backend = self.hub.backend
        try:
            page = await backend.read(
                self.stream,
                self.pos,
                self.hub.limits.page,
                epoch=self.epoch,
                max_bytes=self.hub.limits.page_bytes,
            )
        except HistoryLost as exc:
            if self.end_reason is not None:
                return None
            after = exc.first_id - 1
            reset = Reset(exc.epoch, after, cast(ResetReason, exc.reason), self.pos)
            self.epoch, self.pos = exc.epoch, after
            return [Frame(exc.epoch, reset=reset)]
        except StreamNotFound:
            left = self._create_deadline - time.monotonic()
            if left > 0 and self.end_reason is None:
                await self._feed.wait_change(min(left, backend.safety_poll))
                return None
            self._end("deleted")
            return None
        except RunstreamError as exc:
            log.warning("catch-up read of %r failed: %s", self.stream, exc)
            self._end("backend_error")
            return None
        if self.end_reason is not None:
            return None
        self._create_deadline = 0.0
        self.epoch = page.epoch
        if page.events:
            frames = [Frame(page.epoch, e) for e in page.events]
            self.pos = page.next_after
            if frames[-1].is_end:
                self._end("end")
            return frames
        if page.closed:
            self._end("closed")  # at the end already; the end entry was passed or trimmed
            return None
        # At the tail of the log: join the live fan-out if the feed is not past us.
        feed = self._feed
        if feed.done:
            if feed.error:
                self._end("backend_error")
                return None
            self._move_to(self.hub._feed_for(self.stream))
            return None
        if not feed.ready:
            await feed.wait_change(backend.safety_poll)
            return None
        if feed.epoch == self.epoch and self.pos >= feed.pos:
            # No await between the check above and this: nothing can be delivered in between.
            feed.live.add(self)
            self.live = True
            return None
        if feed.epoch != self.epoch:
            # The feed has not seen the new epoch yet (or we have not): let it move first.
            await feed.wait_change(backend.safety_poll)
        return None

    def _move_to(self, feed: _Feed) -> None:
        self._feed.subs.discard(self)
        self._feed = feed
        feed.subs.add(self)

    def close(self) -> None:
        """Leave the stream. Idempotent; the caller must call it when its client goes away."""
        if self._closed:
            return
        self._closed = True
        self._end("cancelled")
        self._buf.clear()
        self._buf_bytes = 0
        self.hub._release(self)


class Hub:
    """All feeds and subscriptions of one server process.

    ``on_slow(sub)`` is called when a subscriber is cut for falling behind.
    Call :meth:`start` inside the running loop and :meth:`close` on shutdown.
    """

    def __init__(
        self,
        backend: EventLog,
        limits: HubLimits | None = None,
        *,
        on_slow: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.backend = backend
        self.limits = limits or HubLimits()
        self.on_slow = on_slow
        self.end_checks: list[EndCheck] = []
        self._feeds: dict[str, _Feed] = {}
        self._counts: dict[str, int] = {}
        self._total = 0
        self._closing = False
        self._reconciler: asyncio.Task[None] | None = None

    @property
    def subscriber_count(self) -> int:
        return self._total

    @property
    def closing(self) -> bool:
        return self._closing

    def add_end_check(self, check: EndCheck) -> None:
        """Register another reason to end responses (checked every reconcile interval)."""
        self.end_checks.append(check)

    def subscribe(
        self,
        stream: str,
        position: Position,
        *,
        transport: str,
        info: StreamInfo | None = None,
        wait_for_create: bool = False,
    ) -> Subscription:
        """Start following ``stream`` from ``position``; the caller must close the result.

        ``info`` is required for ``Position(now=True)`` (the tail is fixed from
        it). With ``wait_for_create``, a stream that does not exist yet is
        waited for up to ``create_grace`` seconds instead of ending the
        subscription as deleted. Raises :class:`TooManySubscribers` at a limit, or
        :class:`~runstream.errors.RunstreamError` if the hub is shutting down.
        """
        if self._closing:
            raise TooManySubscribers("the server is shutting down")
        if self._total >= self.limits.total:
            raise TooManySubscribers(
                f"this server already has {self._total} subscribers (limit {self.limits.total})"
            )
        count = self._counts.get(stream, 0)
        if count >= self.limits.per_stream:
            raise TooManySubscribers(
                f"stream {stream!r} already has {count} subscribers on this server "
                f"(limit {self.limits.per_stream})"
            )
        if position.now:
            if info is None:
                raise ValueError("subscribing at 'now' needs the stream's info")
            pos = info.tail
            epoch: str | None = info.epoch
        else:
            pos, epoch = position.offset, position.epoch
        self._counts[stream] = count + 1
        self._total += 1
        return Subscription(self, stream, pos, epoch, transport, wait_for_create=wait_for_create)

    def _feed_for(self, stream: str) -> _Feed:
        feed = self._feeds.get(stream)
        if feed is None or feed.done:
            feed = self._feeds[stream] = _Feed(self, stream)
        return feed

    def _feed_done(self, feed: _Feed) -> None:
        if self._feeds.get(feed.stream) is feed:
            del self._feeds[feed.stream]

    def _release(self, sub: Subscription) -> None:
        self._total -= 1
        left = self._counts[sub.stream] - 1
        if left:
            self._counts[sub.stream] = left
        else:
            del self._counts[sub.stream]
        feed = sub._feed
        feed.subs.discard(sub)
        if not feed.subs and not feed.task.done():
            # Nobody listens: stop reading. A new subscriber starts a fresh feed.
            feed.task.cancel()
            self._feed_done(feed)

    def _slow(self, sub: Subscription, why: str) -> None:
        log.warning(
            "disconnecting slow %s consumer of stream %r: %s at id %d;"
            " it resumes from the last id it received",
            sub.transport,
            sub.stream,
            why,
            sub.pos,
        )
        if self.on_slow is not None:
            self.on_slow(sub)

    # -- reconciliation -------------------------------------------------------

    def start(self) -> None:
        """Start the periodic reconciliation (inside the running loop)."""
        if self._reconciler is None:
            self._reconciler = asyncio.get_running_loop().create_task(
                self._reconcile_forever(), name="runstream-hub-reconciler"
            )

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.reconcile_interval)
            try:
                await self.reconcile()
            except Exception:  # keep reconciling; one bad pass must not stop the next
                log.exception("reconciliation pass failed")

    async def reconcile(self) -> None:
        """Compare every followed stream with its state; end what should have ended."""
        feeds = [feed for feed in self._feeds.values() if not feed.done]
        if not feeds:
            return
        try:
            # One batched read for every followed stream (thousands of quiet streams
            # must not cost thousands of round trips per pass).
            infos = await self.backend.info_many([feed.stream for feed in feeds])
        except RunstreamError as exc:
            log.warning("reconciliation could not read stream states: %s", exc)
            return
        for feed in feeds:
            if feed.done:
                continue
            info = infos.get(feed.stream)
            if info is None:
                fresh = time.monotonic() - feed.created < self.limits.create_grace
                if feed.seen or not fresh:
                    feed.terminate("deleted")
                    continue
            else:
                feed.seen = True
                if feed.ready and (info.epoch != feed.epoch or info.last_id > feed.pos):
                    # The reader is behind the state (missed wake-up): poke it.
                    self.backend.notifier.notify(feed.stream)
                if info.closed and feed.ready:
                    if feed.closed_since is not None and feed.closed_since == feed.pos:
                        # Closed on two passes and the reader did not move: end live clients.
                        feed.terminate("closed", catching_up=False)
                        continue
                    feed.closed_since = feed.pos
            for check in self.end_checks:
                reason = await check(feed.stream, info)
                if reason:
                    log.info("ending responses on %r: %s", feed.stream, reason)
                    feed.terminate(reason)
                    break

    async def close(self) -> None:
        """Shut down: end every subscription (reason ``"shutdown"``) and stop every feed."""
        self.begin_close()
        tasks = [f.task for f in self._feeds.values()]
        if self._reconciler is not None:
            tasks.append(self._reconciler)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._feeds.clear()

    def begin_close(self) -> None:
        """Synchronously end every subscription; safe to call more than once."""
        self._closing = True
        for feed in list(self._feeds.values()):
            for sub in tuple(feed.subs):
                sub._end("shutdown")
