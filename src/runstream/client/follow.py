"""Following a stream exactly once across reconnects, watchdogs and a polling fallback.

A :class:`Follower` runs one *reader task* that owns the connection: it
connects (SSE, or the JSON long-poll when streaming keeps failing), feeds the
body to :class:`~runstream.protocol.sse.SSEDecoder` (our own WHATWG-conformant
decoder: it never raises, is bounded, and exposes the comment/byte counters
the idle watchdog needs, which httpx-sse does not), checks every event against
the position, and hands the survivors to the consumer through a small bounded
buffer. When the buffer is full the reader stops reading (backpressure) and its
watchdog timers are paused, so a slow consumer never looks like a dead server.

Exactly-once rests on three rules:

* the position ``(epoch, last id)`` advances only for events handed over;
  reconnects send it as ``Last-Event-ID: <epoch>:<id>``;
* ids at or below the position are dropped (a server replaying history);
* ids in one epoch are contiguous, so an event that skips ahead means the
  connection lost or mangled something: the connection is dropped (reason
  ``"gap"``) and the follower resumes from the position.

A ``reset`` (history lost) is handed over as a :class:`~runstream.core.model.Reset`
item (default) or raised as :class:`~runstream.errors.HistoryLost`
(``reset="raise"``). The end entry is handed over as the last item.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import httpx

from runstream.client._http import (
    RETRYABLE_STATUS,
    error_from_response,
    event_from_json,
    excerpt,
    expect_json,
    retry_after,
)
from runstream.client.metrics import Metrics
from runstream.client.policy import GiveUp, ReconnectState, RetryPolicy
from runstream.client.watchdog import WatchdogConfig, WatchdogTimers
from runstream.core.model import END_TYPE, RESET_TYPE, Event, Reset
from runstream.errors import (
    HistoryLost,
    ProtocolError,
    RetriesExhausted,
    ValidationError,
)
from runstream.protocol.cursor import NOW, parse_position
from runstream.protocol.sse import SSEDecoder, check_response

log = logging.getLogger("runstream.client")

T = TypeVar("T")
Item: TypeAlias = Event | Reset

DEFAULT_FIRST_EVENT = 30.0
DEFAULT_IDLE = 45.0
"""Three times the server's default keepalive interval (15 s)."""
DEFAULT_POLL_WAIT = 20.0
DEFAULT_POLL_LIMIT = 1000
DEFAULT_BUFFER = 64
CONNECT_TIMEOUT = 10.0
POLL_MIN_INTERVAL = 0.25
"""Floor between two empty long-polls, in case a server answers without waiting."""
MAX_ERROR_BODY = 4096


@dataclass(frozen=True, slots=True)
class FollowOptions:
    """How a follower behaves; every field has a sensible default.

    Watchdogs (seconds, 0 = off): ``first_event`` until the first byte of an
    attempt, ``idle`` between any bytes (keepalives count), ``stale`` between
    real events. ``reset``: ``"yield"`` a :class:`Reset` item or ``"raise"``
    :class:`HistoryLost`. ``transport``: ``"auto"`` (SSE, long-poll fallback),
    ``"sse"`` (never poll) or ``"poll"`` (only long-poll). ``buffer`` is how
    many received items may wait for the consumer before reading pauses.
    """

    first_event: float = DEFAULT_FIRST_EVENT
    idle: float = DEFAULT_IDLE
    stale: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reset: Literal["yield", "raise"] = "yield"
    transport: Literal["auto", "sse", "poll"] = "auto"
    poll_wait: float = DEFAULT_POLL_WAIT
    poll_limit: int = DEFAULT_POLL_LIMIT
    buffer: int = DEFAULT_BUFFER
    max_line: int = 1 << 20
    max_event: int = 8 << 20

    def __post_init__(self) -> None:
        if self.reset not in ("yield", "raise"):
            raise ValidationError("reset must be 'yield' or 'raise'", field="reset")
        if self.transport not in ("auto", "sse", "poll"):
            raise ValidationError("transport must be 'auto', 'sse' or 'poll'", field="transport")
        if self.buffer < 1 or self.poll_limit < 1 or self.poll_wait < 0:
            raise ValidationError("buffer and poll_limit must be >= 1, poll_wait >= 0")
        WatchdogConfig(self.first_event, self.idle, self.stale)  # validates


class Session(Protocol):
    """What a follower needs from its client: an HTTP client, auth headers, a refresh hook."""

    @property
    def http(self) -> httpx.AsyncClient: ...

    def auth_headers(self) -> dict[str, str]: ...

    async def refresh_auth(self) -> bool: ...


class _Retry(Exception):
    """An attempt ended in a way worth retrying (internal)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _SSEUnavailable(Exception):
    pass


class _End(Exception):
    pass


_STOP = object()


class _Channel:
    """A bounded hand-over buffer between the reader task and the consumer."""

    def __init__(self, size: int) -> None:
        self._items: deque[tuple[Item, float]] = deque()
        self._size = size
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._exc: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self._size

    async def put(self, item: Item, received: float) -> None:
        while self.full and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            return
        self._items.append((item, received))
        self._readable.set()

    async def get(self) -> tuple[Item, float]:
        while not self._items:
            if self._closed:
                if self._exc is not None:
                    raise self._exc
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def close(self, exc: BaseException | None = None, *, discard: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._exc = exc
        if discard:
            self._items.clear()
        self._readable.set()
        self._writable.set()


class Follower:
    """An async iterator of :class:`Event` and :class:`Reset` items from one stream.

    Obtain it from ``AsyncClient.follow()``. Iterate it with ``async for``;
    close it with :meth:`aclose` (or ``async with``) if you stop before the end
    — that cancels the read and the backoff sleep and closes the connection.

    Raises (from iteration): :class:`RetriesExhausted` when an outage outlasts
    the retry budget; :class:`HTTPStatusError` / :class:`StreamNotFound` /
    :class:`ProtocolError` for answers that retrying cannot fix (other 4xx,
    wrong content type; the message includes the body); :class:`HistoryLost`
    in ``reset="raise"`` mode.
    """

    def __init__(
        self,
        session: Session,
        stream: str,
        *,
        path: str | None = None,
        after: int | str | None = None,
        options: FollowOptions | None = None,
        metrics: Metrics | None = None,
        stop_event: asyncio.Event | None = None,
        state: ReconnectState | None = None,
    ) -> None:
        self.stream = stream
        self.options = options or FollowOptions()
        self.metrics = metrics or Metrics()
        self._session = session
        self._path = path or f"/v1/streams/{stream}/events"
        opts = self.options
        self._state = state or ReconnectState(
            opts.retry,
            mode="poll" if opts.transport == "poll" else "stream",
            allow_fallback=opts.transport == "auto",
        )
        self._timers = WatchdogTimers(WatchdogConfig(opts.first_event, opts.idle, opts.stale))
        self._channel = _Channel(opts.buffer)
        self._stop_event = stop_event
        self._reader: asyncio.Task[None] | None = None
        self._stop_watch: asyncio.Task[None] | None = None
        self._closed = False
        # Position: last id handed over, its epoch, and whether the next id is known.
        self._resolve_now = False
        self.epoch: str | None = None
        self.offset = 0
        self._pinned = False
        self._strikes: dict[int, int] = {}
        if isinstance(after, str) and after.strip() == NOW:
            self._resolve_now = True
        elif after is not None and after != "":
            pos = parse_position(after, allow_now=False)
            self.epoch, self.offset = pos.epoch, pos.offset
            self._pinned = pos.offset > 0 or pos.epoch is not None
        self.end: Event | None = None
        self.refreshed_auth = False

    # -- consumer side -------------------------------------------------------

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> Item:
        item, _ = await self.next_with_receipt()
        return item

    async def next_with_receipt(self) -> tuple[Item, float]:
        """The next item and the monotonic time it was received (for latency metrics)."""
        if self._reader is None and not self._closed:
            self._start()
        return await self._channel.get()

    def _start(self) -> None:
        self._reader = asyncio.create_task(
            self._read_loop(), name=f"runstream-follow-{self.stream}"
        )
        if self._stop_event is not None:
            self._stop_watch = asyncio.create_task(self._watch_stop(self._stop_event))

    async def _watch_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        await self.aclose()

    @property
    def position(self) -> str:
        """Where this follower would resume: ``"<epoch>:<id>"`` or ``"<id>"``."""
        return f"{self.epoch}:{self.offset}" if self.epoch is not None else str(self.offset)

    @property
    def buffered(self) -> int:
        return len(self._channel)

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop: cancel the read in progress and any backoff sleep, close the connection.

        Items not yet consumed are discarded; further iteration ends at once.
        """
        if self._closed:
            return
        self._closed = True
        self._channel.close(discard=True)
        tasks = [t for t in (self._reader, self._stop_watch) if t is not None]
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        waiting = [t for t in tasks if t is not current]
        if waiting:
            await asyncio.wait(waiting, timeout=grace)

    async def __aenter__(self) -> Follower:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- reader task -----------------------------------------------------------

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                mode = self._state.mode
                self.metrics.mode = mode
                try:
                    if self._resolve_now:
                        await self._resolve_tail()
                    if mode == "stream":
                        await self._stream_once()
                    else:
                        await self._poll_once()
                    continue
                except _End:
                    self._channel.close()
                    return
                except _SSEUnavailable:
                    decision = self._state.on_sse_unavailable(loop.time())
                except _Retry as exc:
                    decision = self._state.on_failure(
                        exc.reason, loop.time(), retry_after=exc.retry_after
                    )
                if isinstance(decision, GiveUp):
                    raise RetriesExhausted(
                        f"following {self.stream!r} from {self.position}: {decision.message}"
                    )
                self.metrics.reconnects[decision.reason] += 1
                log.info(
                    "runstream follow %s: reconnecting in %.2fs (%s, attempt %d, mode %s)",
                    self.stream,
                    decision.delay,
                    decision.reason,
                    decision.attempt,
                    decision.mode,
                )
                if decision.delay > 0:
                    await asyncio.sleep(decision.delay)
        except asyncio.CancelledError:
            self._channel.close(discard=True)
            raise
        except BaseException as exc:
            self._channel.close(exc)

    async def _deliver(self, item: Item, received: float) -> None:
        loop = asyncio.get_running_loop()
        if self._channel.full:
            self._timers.pause(loop.time())
            try:
                await self._channel.put(item, received)
            finally:
                self._timers.resume(loop.time())
        else:
            await self._channel.put(item, received)
        if isinstance(item, Event):
            self.offset = item.id
            self._pinned = True
            self._strikes.clear()
            self.metrics.events += 1
            self.metrics.last_id = item.id
            self.metrics.epoch = self.epoch
            self._state.on_event()
            if item.type == END_TYPE:
                self.end = item
                raise _End
        else:
            self.metrics.resets += 1

    async def _guard(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` under the watchdog timers; a trip becomes a retry."""
        deadline = self._timers.deadline()
        if deadline is None:
            return await aw
        scope = asyncio.timeout_at(deadline[0])
        try:
            async with scope:
                return await aw
        except TimeoutError:
            if not scope.expired():
                raise
            kind = deadline[1]
            self.metrics.watchdog_kills[kind] += 1
            log.warning(
                "runstream follow %s: %s watchdog fired after %gs; dropping the connection",
                self.stream,
                kind,
                self._timers.seconds(kind),
            )
            raise _Retry(kind) from None

    async def _resolve_tail(self) -> None:
        """Fix ``after="now"`` once, so reconnects before the first event miss nothing."""
        try:
            resp = await self._session.http.get(
                f"/v1/streams/{self.stream}", headers=self._session.auth_headers()
            )
        except httpx.TransportError as exc:
            raise _Retry("network") from exc
        if resp.status_code == 404:
            self.epoch, self.offset = None, 0
        elif resp.status_code == 200:
            info = expect_json(resp.text, what=f"info of {self.stream!r}")
            last = int(info.get("last_id", 0))
            closed = info.get("status") == "closed"
            self.epoch = str(info["epoch"])
            # A closed stream still hands over its end entry, like the server does.
            self.offset = max(0, last - 1) if closed else last
        else:
            await self._raise_for_status(resp.status_code, resp.text, resp.headers)
        self._pinned = True
        self._resolve_now = False

    async def _raise_for_status(self, status: int, text: str, headers: Any) -> None:
        """Classify a non-success answer: retry, refresh auth, fall back, or raise."""
        if status == 401 and not self.refreshed_auth and await self._session.refresh_auth():
            self.refreshed_auth = True
            raise _Retry("auth_refresh", 0.0)
        if status in RETRYABLE_STATUS:
            raise _Retry(f"http_{status}", retry_after(headers))
        raise error_from_response(
            status, text, what=f"following {self.stream!r}", stream=self.stream
        )

    # -- SSE ---------------------------------------------------------------------

    def _request_headers(self) -> tuple[dict[str, str], dict[str, str]]:
        # identity: a compressing intermediary would otherwise buffer the stream.
        headers = {
            "Accept": "text/event-stream",
            "Accept-Encoding": "identity",
            "Cache-Control": "no-cache",
        }
        headers.update(self._session.auth_headers())
        params: dict[str, str] = {}
        if self.epoch is not None:
            headers["Last-Event-ID"] = f"{self.epoch}:{self.offset}"
        elif self.offset > 0:
            params["after"] = str(self.offset)
        return headers, params

    async def _stream_once(self) -> None:
        loop = asyncio.get_running_loop()
        http = self._session.http
        headers, params = self._request_headers()
        request = http.build_request(
            "GET",
            self._path,
            headers=headers,
            params=params,
            timeout=httpx.Timeout(CONNECT_TIMEOUT, read=None),
        )
        decoder = SSEDecoder(max_line=self.options.max_line, max_event=self.options.max_event)
        self._timers.start(loop.time())
        response: httpx.Response | None = None
        try:
            try:
                response = await self._guard(http.send(request, stream=True))
                kind = check_response(response.status_code, response.headers.get("content-type"))
                if kind == "stop":
                    raise _End
                if kind == "fail":
                    body = await self._guard(self._read_limited(response))
                    await self._fail_stream(response, body)
                self._state.on_open()
                self.refreshed_auth = False
                self.metrics.connections += 1
                # aiter_bytes undoes a Content-Encoding the server applied anyway.
                chunks = response.aiter_bytes()
                while True:
                    try:
                        chunk = await self._guard(anext(chunks))
                    except StopAsyncIteration:
                        decoder.close()
                        raise _Retry("eof") from None
                    received = loop.time()
                    self._timers.on_bytes(received)
                    self.metrics.bytes_received += len(chunk)
                    malformed = decoder.malformed
                    messages = decoder.feed(chunk)
                    self.metrics.malformed += decoder.malformed - malformed
                    if decoder.retry is not None:
                        self._state.on_server_retry(decoder.retry)
                    for msg in messages:
                        item = self._check_sse(msg.event, msg.data, msg.id)
                        if item is not None:
                            self._timers.on_event(received)
                            await self._deliver(item, received)
            except httpx.TransportError as exc:
                log.info("runstream follow %s: connection failed: %r", self.stream, exc)
                raise _Retry("network") from exc
        finally:
            if response is not None:
                await response.aclose()

    async def _read_limited(self, response: httpx.Response) -> str:
        data = bytearray()
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) >= MAX_ERROR_BODY:
                break
        return data.decode("utf-8", "replace")

    async def _fail_stream(self, response: httpx.Response, body: str) -> None:
        status = response.status_code
        if status == 406 and self.options.transport == "auto":
            raise _SSEUnavailable
        if status == 200:
            raise ProtocolError(
                f"following {self.stream!r}: expected text/event-stream, got "
                f"{response.headers.get('content-type')!r}: {excerpt(body)!r}"
            )
        await self._raise_for_status(status, body, response.headers)

    def _check_sse(self, event_type: str, data: str, sse_id: str) -> Item | None:
        """Decide what one SSE message means for the position; raise to reconnect."""
        if event_type == RESET_TYPE:
            return self._reset_from(data)
        try:
            pos = parse_position(sse_id, allow_now=False)
        except ValidationError:
            self._malformed(f"event with an unusable id {sse_id!r}")
            return None
        if not sse_id:
            self._malformed("event without an id")
            return None
        if pos.epoch is not None and self.epoch is not None and pos.epoch != self.epoch:
            # The server should have sent a reset first; a fresh request will.
            raise _Retry("epoch_mismatch")
        if not self._accept_id(pos.offset):
            return None
        try:
            value = json.loads(data)
        except ValueError:
            self._bad_data(pos.offset, data)
            return None
        if pos.epoch is not None:
            self.epoch = pos.epoch
        return Event(pos.offset, event_type, value, time.time())

    def _accept_id(self, offset: int) -> bool:
        """False for a duplicate; raises a retry for a gap."""
        if offset <= self.offset:
            self.metrics.duplicates_dropped += 1
            return False
        if self._pinned and offset != self.offset + 1:
            log.warning(
                "runstream follow %s: got id %d after %d; resuming from %d",
                self.stream,
                offset,
                self.offset,
                self.offset,
            )
            raise _Retry("gap")
        return True

    def _bad_data(self, offset: int, data: str) -> None:
        """Event ``offset`` has data that is not JSON.

        The first time, the connection is dropped and the event asked for again
        (it may have been mangled in transit). If it comes back bad, it is
        skipped for good: logged, counted, and the position moves past it.
        """
        self._malformed(f"event {offset} has data that is not JSON: {excerpt(data)!r}")
        strikes = self._strikes.get(offset, 0) + 1
        self._strikes[offset] = strikes
        if strikes < 2:
            raise _Retry("malformed")
        log.error(
            "runstream follow %s: skipping event %d: its data is not JSON", self.stream, offset
        )
        self.offset = offset
        self._pinned = True

    def _malformed(self, what: str) -> None:
        self.metrics.malformed += 1
        log.warning("runstream follow %s: skipped malformed message: %s", self.stream, what)

    def _reset_from(self, data: str) -> Reset | None:
        try:
            obj = json.loads(data)
            reset = Reset(
                str(obj["epoch"]),
                int(obj["after"]),
                obj.get("reason", "trimmed"),
                int(obj.get("requested", self.offset)),
            )
        except (ValueError, KeyError, TypeError):
            self._malformed(f"reset with unusable data {excerpt(data)!r}")
            raise _Retry("malformed") from None
        return self._apply_reset(reset)

    def _apply_reset(self, reset: Reset) -> Reset:
        self.epoch = reset.epoch
        self.offset = reset.after
        self._pinned = True
        log.warning(
            "runstream follow %s: history lost (%s); continuing after %d in epoch %s",
            self.stream,
            reset.reason,
            reset.after,
            reset.epoch,
        )
        if self.options.reset == "raise":
            self.metrics.resets += 1
            raise HistoryLost(
                self.stream, epoch=reset.epoch, first_id=reset.after + 1, reason=reset.reason
            )
        return reset

    # -- long-poll ---------------------------------------------------------------

    async def _poll_once(self) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        headers = {"Accept": "application/json", **self._session.auth_headers()}
        params = {
            "after": self.position,
            "limit": str(opts.poll_limit),
            "wait": f"{opts.poll_wait:g}",
        }
        # The server may legitimately hold the request for ``poll_wait``; beyond that,
        # the idle (else first-event) watchdog's allowance applies.
        read_timeout = opts.poll_wait + (opts.idle or opts.first_event or CONNECT_TIMEOUT)
        started = loop.time()
        try:
            resp = await self._session.http.get(
                self._path,
                headers=headers,
                params=params,
                timeout=httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout),
            )
        except httpx.TimeoutException as exc:
            raise _Retry("poll_timeout") from exc
        except httpx.TransportError as exc:
            raise _Retry("network") from exc
        received = loop.time()
        self.metrics.bytes_received += len(resp.content)
        if resp.status_code == 204:
            raise _End
        if resp.status_code == 410:
            err = expect_json(resp.text, what="history_lost answer").get("error", {})
            first_id = int(err.get("first_id", 1))
            reset = Reset(
                str(err.get("epoch", "")),
                max(0, first_id - 1),
                err.get("reason", "trimmed"),
                self.offset,
            )
            await self._deliver(self._apply_reset(reset), received)
            return
        if resp.status_code != 200:
            await self._raise_for_status(resp.status_code, resp.text, resp.headers)
        self.refreshed_auth = False
        page = expect_json(resp.text, what=f"reading {self.stream!r}")
        if not isinstance(page, dict) or not isinstance(page.get("events"), list):
            raise ProtocolError(
                f"reading {self.stream!r}: unexpected answer {excerpt(resp.text)!r}"
            )
        epoch = page.get("epoch")
        if isinstance(epoch, str) and self.epoch is not None and epoch != self.epoch:
            raise _Retry("epoch_mismatch")
        if isinstance(epoch, str):
            self.epoch = epoch
        events = page["events"]
        for obj in events:
            try:
                event = event_from_json(obj)
            except ProtocolError as exc:
                self._malformed(str(exc))
                raise _Retry("malformed") from None
            if self._accept_id(event.id):
                await self._deliver(event, received)
        if page.get("closed") is True:
            raise _End
        self._state.on_poll_ok(received)
        if not events and received - started < POLL_MIN_INTERVAL:
            await asyncio.sleep(POLL_MIN_INTERVAL)
