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

Positions are :class:`~runstream.protocol.position.ReaderPosition` objects, the
sans-I/O rules the SDK's followers use too: each frame a subscription takes is
decided and committed there (duplicates dropped, a gap or a frame from another
epoch ends the subscription so the client resumes from the log, a reset moves
the position and carries what the client had).

A stream that does not exist yet can be *waited for* (``wait_for_create``):
the subscription then waits on its feed, which waits on the backend's wake-up
for that name (one watch per stream, not per client; the reconciler's batched
state read is the backstop), and reads from the beginning once the stream
appears. While waiting, :meth:`Subscription.get` returns ``[]`` every ``idle``
seconds, so transports keep sending keepalives.

Lifecycle is reconciled from state: besides what the log says (end entry,
deletion), a periodic pass compares each feed with ``info()`` and with any
registered :data:`EndCheck` (e.g. "the run is terminal", "the run is gone":
checks see ``None`` for a stream not created yet), ending responses that
missed the moment. A stream that was seen and is gone ends the responses that
read it as ``"deleted"``; subscriptions still waiting for it to be created
keep waiting.

No sockets here: transports (SSE, WebSocket, long-poll) drive a subscription
through :meth:`Subscription.get` and encode frames with :meth:`Frame.sse` /
:meth:`Frame.ws` (:mod:`runstream.server.frames`, re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import cast

from runstream.backends.base import EventLog
from runstream.core.model import Reset, ResetReason, StreamInfo
from runstream.errors import (
    HistoryLost,
    RunstreamError,
    StreamDeleted,
    StreamNotFound,
    TooManySubscribers,
)
from runstream.protocol.cursor import Position
from runstream.protocol.position import ReaderPosition
from runstream.server.frames import Frame
from runstream.server.hubtypes import EndCheck, EndReason, HubLimits

__all__ = ["EndCheck", "EndReason", "Frame", "Hub", "HubLimits", "Subscription"]

log = logging.getLogger("runstream.server.hub")


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Feed:
    """The one backend reader of a stream in this process.

    It starts by reading the stream's state; a stream that does not exist yet is
    waited for (one wake-up watch for the name, whoever waits for it). ``seen``
    is true once the stream was found to exist; ``changes`` counts the moments
    waiters were woken (ready, a delivery, the end), so a waiter can tell
    whether anything happened since it last looked.
    """

    def __init__(self, hub: Hub, stream: str) -> None:
        self.hub = hub
        self.stream = stream
        self.position = ReaderPosition()
        self.live: set[Subscription] = set()
        self.subs: set[Subscription] = set()
        self.seen = False
        self.ready = False
        """The reader knows the stream's state (epoch and tail) or is done."""
        self.done = False
        self.error = False
        self.changes = 0
        self.closed_since: int | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._direct: list[Subscription] = []
        """Subscribers with frames to write directly at the end of this loop tick."""
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._run(), name=f"runstream-feed:{stream}"
        )

    @property
    def epoch(self) -> str | None:
        return self.position.epoch if self.ready else None

    @property
    def pos(self) -> int:
        return self.position.offset if self.ready else -1

    # -- waiting for the feed to move -----------------------------------------

    def _wake(self) -> None:
        self.changes += 1
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def add_waiter(self, fut: asyncio.Future[None]) -> None:
        """Resolve ``fut`` at the next change (at once if the feed is done)."""
        if self.done:
            _resolve(fut)
        else:
            self._waiters.append(fut)

    def remove_waiter(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

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
                self.remove_waiter(fut)

    # -- the reader -----------------------------------------------------------

    async def _run(self) -> None:
        backend = self.hub.backend
        reason: EndReason = "closed"
        try:
            info = await self._first_info()
            self.position = ReaderPosition(info.last_id, info.epoch)
            self.seen = self.ready = True
            self._wake()
            if info.closed:
                return
            async for item in backend.follow(self.stream, Position(info.last_id, info.epoch)):
                if isinstance(item, Reset):
                    self._deliver(Frame(item.epoch, reset=item))
                else:
                    epoch = self.position.epoch
                    assert epoch is not None
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

    async def _first_info(self) -> StreamInfo:
        """The stream's state, waiting (as long as the feed has subscribers) for its creation.

        The wake-up for the name is armed before each read, so a creation is never
        missed between the two. With the hub's reconciler running there is no
        timer: its batched state read pokes the name if a wake-up went missing.
        """
        backend = self.hub.backend
        while True:
            fut = backend.notifier.watch(self.stream)
            try:
                try:
                    return await backend.info(self.stream)
                except StreamNotFound:
                    await asyncio.wait((fut,), timeout=self.hub.absent_poll)
            finally:
                backend.notifier.unwatch(self.stream, fut)

    def _deliver(self, frame: Frame) -> None:
        # The backend's follow is gap-free; the position only records where it is.
        if frame.reset is not None:
            self.position.reset(frame.reset)
        else:
            assert frame.event is not None
            self.position.delivered(frame.event.id, frame.event.type, frame.epoch)
        for sub in tuple(self.live):
            sub._offer(frame)
        self._wake()

    def queue_direct(self, sub: Subscription) -> None:
        """Write ``sub``'s direct frames once this loop tick's deliveries are done.

        The frames of one read (a burst) are delivered in one tick: each idle
        subscriber then gets them in one socket write, not one write per event.
        """
        if not self._direct:
            asyncio.get_running_loop().call_soon(self._flush_direct)
        self._direct.append(sub)

    def _flush_direct(self) -> None:
        subs, self._direct = self._direct, []
        events = resets = 0
        for sub in subs:
            e, r = sub._flush_direct()
            events += e
            resets += r
        if (events or resets) and self.hub.on_written is not None:
            self.hub.on_written(events, resets)

    def _finish(self, reason: EndReason) -> None:
        self.done = self.ready = True
        self.hub._feed_done(self)
        for sub in tuple(self.live):
            sub._end(reason)
        self._wake()

    def terminate(
        self, reason: EndReason | str, *, catching_up: bool = True, waiting: bool = True
    ) -> None:
        """End subscribers now and stop reading if none remain.

        ``catching_up=False`` ends only live subscribers; ``waiting=False`` spares
        those still waiting for the stream to be created (for a stream deleted
        under them: they wait for it to come back).
        """
        for sub in tuple(self.subs if catching_up else self.live):
            if waiting or not sub.waiting:
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
        self.position = ReaderPosition(pos, epoch)
        # Bound once: _offer runs once per frame per client (the object is never replaced).
        self._advance = self.position.advance
        self.transport = transport
        self.live = False
        self.end_reason: str | None = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        """Resolved with the reason when the subscription ends (await it alongside a send)."""
        self.waiting = wait_for_create
        """Waits for the stream to be created and has not read it yet; once it has,
        the stream's absence means it was deleted."""
        # A list, not a deque: it is only appended to and drained whole, and an
        # idle client's empty deque would cost ten times more.
        self._buf: list[Frame] = []
        self._buf_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.direct: Callable[[list[Frame]], bool] | None = None
        """Set by a transport whose socket the feed may write live frames to itself:
        called only while the transport waits in :meth:`get` with nothing buffered;
        returns False (the frames are then buffered as usual) when the socket is busy."""
        self._direct_frames: list[Frame] = []
        self._closed = False
        self._absent: tuple[_Feed, int] | None = None
        """While waiting: the feed and its change count when the stream was found absent."""
        self._feed = hub._feed_for(stream)
        self._feed.subs.add(self)

    @property
    def pos(self) -> int:
        """The id of the last event handed to this subscriber's client (or its start)."""
        return self.position.offset

    @property
    def epoch(self) -> str | None:
        return self.position.epoch

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- called by the feed ---------------------------------------------------

    def _offer(self, frame: Frame) -> None:
        if self.end_reason is not None:
            return
        if frame.reset is not None:
            reset = self.position.reset(frame.reset)
            if reset is not frame.reset:
                frame = Frame(reset.epoch, reset=reset)
        else:
            event = frame.event
            assert event is not None
            verdict = self._advance(event.id, event.type, frame.epoch)
            if verdict == "duplicate":
                return  # already read from the log during catch-up
            if verdict != "deliver" and verdict != "end":
                self._lost_step(verdict, event.id)
                return
        if self.direct is not None and not self._buf:
            # The transport is idle in get() (its waiter pending, nothing buffered): the
            # frame goes to the socket at the end of this tick with the rest of the
            # burst, and no task wakes (see _flush_direct).
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                if not self._direct_frames:
                    self._feed.queue_direct(self)
                self._direct_frames.append(frame)
                return
        self._buffer(frame)

    def _buffer(self, frame: Frame) -> None:
        """Hand ``frame`` to the transport's task (it is woken), within the buffer limits."""
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

    def _flush_direct(self) -> tuple[int, int]:
        """Write this tick's frames in one socket write; (events, resets) written. Buffered
        for the transport's task instead if it left get() or the socket is busy."""
        frames, self._direct_frames = self._direct_frames, []
        if not frames or self.end_reason is not None:
            return 0, 0
        direct, waiter = self.direct, self._waiter
        idle = waiter is not None and not waiter.done() and not self._buf
        if direct is not None and idle and direct(frames):
            if frames[-1].is_end:
                self._end("end")
            resets = sum(1 for f in frames if f.reset is not None)
            return len(frames) - resets, resets
        for frame in frames:
            if self.end_reason is None:
                self._buffer(frame)
        return 0, 0

    def _lost_step(self, verdict: str, id: int) -> None:
        """A frame the position cannot take (a gap, another epoch): never expected from a
        gap-free reader. The client resumes from its last id and catches up from the log."""
        log.error(
            "%s subscriber of stream %r got event %d at position %s (%s); ending it to resume",
            self.transport,
            self.stream,
            id,
            self.position.token,
            verdict,
        )
        self._end("backend_error")

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
        if self._direct_frames:  # not written yet: the transport's task sends them last
            self._buf.extend(self._direct_frames)
            self._direct_frames = []
        self._feed.live.discard(self)
        self.live = False
        if not self.ended.done():
            self.ended.set_result(reason)
        self._wake()

    # -- called by the transport ----------------------------------------------

    async def get(self, idle: float | None = None) -> list[Frame] | None:
        """Next frames, in order: a page of history, or everything buffered live.

        Returns ``[]`` if ``idle`` seconds passed with nothing new (send a
        keepalive) — also while waiting for the stream to be created —, ``None``
        once the subscription is over (after the last frames were returned; see
        :attr:`end_reason`).
        """
        while True:
            if self._buf:
                return self._take()
            if self.end_reason is not None:
                return None
            if self.live:
                return await self._wait_live(idle)
            if self._absent is not None:
                if not await self._wait_created(idle):
                    return []
                continue
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

    async def _wait_created(self, idle: float | None) -> bool:
        """Wait (up to ``idle``) for the feed to move after the stream was found absent.

        True if it is worth reading again (the feed changed or ended, or this
        subscription ended); False when ``idle`` passed with nothing new. No
        timer but ``idle``'s and no read while nothing changes: a thousand
        clients waiting for a stream cost one wake-up watch, not a thousand polls.
        """
        assert self._absent is not None
        feed, mark = self._absent
        if feed is self._feed and not feed.done and feed.changes == mark:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            feed.add_waiter(waiter)
            timer = loop.call_later(idle, _resolve, waiter) if idle is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                feed.remove_waiter(waiter)
                if timer is not None:
                    timer.cancel()
            if self.end_reason is None and not feed.done and feed.changes == mark:
                return False
        self._absent = None
        if self._feed.done and self.end_reason is None:
            self._move_to(self.hub._feed_for(self.stream))
        return True

    async def _catch_up(self) -> list[Frame] | None:
        """One step of catch-up: a page read, or the join. ``None``/``[]`` means call again."""
        backend = self.hub.backend
        position = self.position
        feed = self._feed
        mark = feed.changes  # before the read: a creation during it must not be missed
        try:
            page = await backend.read(
                self.stream,
                position.offset,
                self.hub.limits.page,
                epoch=position.epoch,
                max_bytes=self.hub.limits.page_bytes,
            )
        except HistoryLost as exc:
            if self.end_reason is not None:
                return None
            self.waiting = False
            lost = Reset(exc.epoch, exc.first_id - 1, cast(ResetReason, exc.reason), 0)
            reset = position.reset(lost)
            return [Frame(exc.epoch, reset=reset)]
        except StreamNotFound:
            if self.end_reason is None:
                if self.waiting:
                    self._absent = (feed, mark)
                else:
                    self._end("deleted")
            return None
        except RunstreamError as exc:
            log.warning("catch-up read of %r failed: %s", self.stream, exc)
            self._end("backend_error")
            return None
        if self.end_reason is not None:
            return None
        self.waiting = False
        if page.events:
            epoch = page.epoch
            frames: list[Frame] = []
            for event in page.events:
                verdict = position.advance(event.id, event.type, epoch)
                if verdict == "deliver" or verdict == "end":
                    frames.append(Frame(epoch, event))
                elif verdict != "duplicate":
                    self._lost_step(verdict, event.id)
                    break
            if frames and frames[-1].is_end:
                self._end("end")
            return frames or None
        if page.next_after != position.offset:
            # Nothing is retained up to next_after (trimmed): the next id is the one after.
            position.skip(page.next_after, page.epoch)
        else:
            position.learn_epoch(page.epoch)
        if page.closed:
            self._end("closed")  # at the end already; the end entry was passed or trimmed
            return None
        # At the tail of the log: join the live fan-out if the feed is not past us.
        if feed.done:
            if feed.error:
                self._end("backend_error")
                return None
            self._move_to(self.hub._feed_for(self.stream))
            return None
        if not feed.ready:
            await feed.wait_change(backend.safety_poll)
            return None
        if feed.epoch == position.epoch and position.offset >= feed.pos:
            # No await between the check above and this: nothing can be delivered in between.
            feed.live.add(self)
            self.live = True
            return None
        if feed.epoch != position.epoch:
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
        self.on_written: Callable[[int, int], None] | None = None
        """Called with the events and resets feeds wrote directly to clients
        (:attr:`Subscription.direct`), once per burst: those deliveries' metrics."""
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

    @property
    def absent_poll(self) -> float | None:
        """How long a feed waits for a stream's creation between looks (``None``: until woken).

        With the reconciler running, only wake-ups wake it (the reconciler pokes
        streams that appeared unannounced); without, the backend's safety poll.
        """
        return None if self._reconciler is not None else self.backend.safety_poll

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
        waited for (``info=None`` with ``now``: everything it will hold is
        new) instead of ending the subscription as deleted. Raises
        :class:`TooManySubscribers` at a limit, or
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
            if info is None and not wait_for_create:
                raise ValueError("subscribing at 'now' needs the stream's info")
            tail = ReaderPosition.at_tail(info)
            pos, epoch = tail.offset, tail.epoch
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
                if feed.seen:
                    # Deleted under its readers; those waiting for a creation wait on (for
                    # the next one), and the reader is poked to notice and finish.
                    feed.terminate("deleted", waiting=False)
                    self.backend.notifier.notify(feed.stream)
                    continue
                # Not created yet: its subscribers wait (an end check may still end them).
            else:
                if not feed.ready or info.epoch != feed.epoch or info.last_id > feed.pos:
                    # The reader is behind the state (missed wake-up), or still waits
                    # for a stream that now exists: poke it.
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
