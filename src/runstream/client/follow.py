"""Following a stream exactly once across reconnects, watchdogs, transports and a polling fallback.

A :class:`Follower` runs one *reader task* that owns the connection. Each
connection attempt uses one transport:

* ``sse`` — ``GET …/events`` as ``text/event-stream``, fed to our own
  WHATWG-conformant :class:`~runstream.protocol.sse.SSEDecoder` (it never
  raises, is bounded, and exposes the comment/byte counters the idle watchdog
  needs, which httpx-sse does not); the server time comes in the ``time:``
  field that standard parsers ignore;
* ``ws`` — the WebSocket endpoint ``…/ws?after=`` (the ``websockets``
  library): one JSON message per event (with its ``epoch``), ``{"type":
  "ping"}`` heartbeats while idle, close code 1000 once the stream is over;
* ``poll`` — the JSON long-poll ``?after=&wait=``; also what ``auto`` (SSE
  first) falls back to while streaming keeps failing.

Whatever the transport, every received event goes through one
:class:`~runstream.protocol.position.ReaderPosition`, which is where
exactly-once lives:

* the position ``(epoch, last id)`` advances only for items handed over;
  reconnects resume from it (``Last-Event-ID`` on SSE, ``after=`` otherwise);
* ids at or below the position are dropped (a server replaying history);
* ids in one epoch are contiguous, so an event that skips ahead means the
  connection lost or mangled something: the connection is dropped (reason
  ``"gap"``) and the follower resumes from the position. That is also why a
  message that cannot be parsed at all may simply be skipped: if it was an
  event, the next one reveals the gap.

Survivors go to the consumer through a small bounded buffer. When it is full
the reader stops reading (backpressure) and its watchdog timers are paused,
so a slow consumer never looks like a dead server. A ``reset`` (history
lost) is handed over as a :class:`~runstream.core.model.Reset` item (default)
or raised as :class:`~runstream.errors.HistoryLost` (``reset="raise"``). The
end entry is handed over as the last item.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any, Literal, Protocol, TypeVar, cast

import httpx

from runstream.client._channel import Channel, Item
from runstream.client._http import (
    RETRYABLE_STATUS,
    error_from_response,
    event_from_json,
    excerpt,
    expect_json,
    parse_time,
    retry_after,
)
from runstream.client._options import TRANSPORTS, FollowOptions, Transport
from runstream.client.metrics import Metrics
from runstream.client.policy import GiveUp, ReconnectState
from runstream.client.watchdog import WatchdogConfig, WatchdogTimers
from runstream.core.model import HEARTBEAT_TYPE, RESET_TYPE, Event, Reset
from runstream.errors import (
    HistoryLost,
    ProtocolError,
    RetriesExhausted,
    ValidationError,
)
from runstream.protocol.cursor import NOW, WAIT_FOR_CREATE, parse_position
from runstream.protocol.position import ReaderPosition
from runstream.protocol.sse import SSEDecoder, SSEMessage, check_response

__all__ = ["TRANSPORTS", "FollowOptions", "Follower", "Item", "Session", "Transport"]

log = logging.getLogger("runstream.client")

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
POLL_MIN_INTERVAL = 0.25
"""Floor between two empty long-polls, in case a server answers without waiting."""
MAX_ERROR_BODY = 4096


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


class Follower:
    """An async iterator of :class:`Event` and :class:`Reset` items from one stream.

    Obtain it from ``AsyncClient.follow()``. Iterate it with ``async for``;
    close it with :meth:`aclose` (or ``async with``) if you stop before the end
    — that cancels the read and the backoff sleep and closes the connection.
    Every event it yields carries its ``epoch``.

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
        ws_path: str | None = None,
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
        self._ws_path = ws_path or self._path.removesuffix("/events") + "/ws"
        opts = self.options
        self._state = state or ReconnectState(
            opts.retry,
            mode="poll" if opts.transport == "poll" else "stream",
            allow_fallback=opts.transport == "auto",
        )
        self._timers = WatchdogTimers(WatchdogConfig(opts.first_event, opts.idle, opts.stale))
        self._channel = Channel(opts.buffer)
        self._stop_event = stop_event
        self._reader: asyncio.Task[None] | None = None
        self._stop_watch: asyncio.Task[None] | None = None
        self._closed = False
        self._resolve_now = isinstance(after, str) and after.strip() == NOW
        self._pos = ReaderPosition() if self._resolve_now else ReaderPosition.parse(after)
        self._strikes: dict[int, int] = {}
        self._ws_clean_closes = 0
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
        """Where this follower would resume: ``"<epoch>:<id>"`` or ``"<id>"``.

        It counts only items handed over (taken from the buffer or not), so it
        is a safe resume point for a new follower after this one is closed.
        """
        return self._pos.token

    @property
    def epoch(self) -> str | None:
        """The epoch of the stream's history being followed (``None`` until known)."""
        return self._pos.epoch

    @property
    def offset(self) -> int:
        """The id of the last event handed over (0: none yet)."""
        return self._pos.offset

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
                    if mode == "poll":
                        await self._poll_once()
                    elif self.options.transport == "ws":
                        await self._ws_once()
                    else:
                        await self._sse_once()
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

    # -- what every transport does with what it received ------------------------

    async def _on_event(
        self,
        id: int,
        type: str,
        data: Any,
        server_time: float,
        epoch: str | None,
        received: float,
        *,
        raw: str | None = None,
    ) -> None:
        """One received event: decide with the position, then hand it over or not.

        ``data`` is the decoded data, or ``None`` with ``raw`` holding text
        still to decode (SSE: decoded only for events that are not dropped).
        Raises :class:`_Retry` (gap, epoch mismatch, mangled data) or
        :class:`_End` once the end entry is handed over.
        """
        verdict = self._pos.on_event(id, type, epoch)
        if verdict == "duplicate":
            self.metrics.duplicates_dropped += 1
            return
        if verdict == "after_end":
            return
        if verdict == "epoch_mismatch":
            # The server owes a reset first; a fresh request gets one.
            raise _Retry("epoch_mismatch")
        if verdict == "gap":
            log.warning(
                "runstream follow %s: got id %d after %d; resuming from %d",
                self.stream,
                id,
                self._pos.offset,
                self._pos.offset,
            )
            raise _Retry("gap")
        if raw is not None:
            try:
                data = json.loads(raw)
            except ValueError:
                self._bad_data(id, epoch, raw)
                return
        event = Event(id, type, data, server_time, epoch=epoch or self._pos.epoch)
        self._timers.on_event(received)
        if not await self._hand_over(event, received):
            return
        self._pos.delivered(id, type, event.epoch)
        self._strikes.clear()
        m = self.metrics
        m.events += 1
        m.last_id = id
        m.epoch = self._pos.epoch
        self._state.on_event()
        if verdict == "end":
            self.end = event
            raise _End

    async def _on_reset(self, reset: Reset, received: float) -> None:
        """History was lost: hand over (or raise) the reset and move the position."""
        log.warning(
            "runstream follow %s: history lost (%s); continuing after %d in epoch %s",
            self.stream,
            reset.reason,
            reset.after,
            reset.epoch,
        )
        self.metrics.resets += 1
        if self.options.reset == "raise":
            self._pos.reset(reset)
            raise HistoryLost(
                self.stream, epoch=reset.epoch, first_id=reset.after + 1, reason=reset.reason
            )
        item = Reset(reset.epoch, reset.after, reset.reason, self._pos.offset)
        if await self._hand_over(item, received):
            self._pos.reset(item)
            self.metrics.epoch = reset.epoch

    async def _hand_over(self, item: Item, received: float) -> bool:
        loop = asyncio.get_running_loop()
        if not self._channel.full:
            return await self._channel.put(item, received)
        self._timers.pause(loop.time())
        try:
            return await self._channel.put(item, received)
        finally:
            self._timers.resume(loop.time())

    def _bad_data(self, offset: int, epoch: str | None, data: str) -> None:
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
        self._pos.skip(offset, epoch)

    def _malformed(self, what: str) -> None:
        self.metrics.malformed += 1
        log.warning("runstream follow %s: skipped malformed message: %s", self.stream, what)

    def _reset_from(self, obj: Any) -> Reset:
        """A :class:`Reset` from a reset message's data; a malformed one drops the connection."""
        try:
            return Reset(
                str(obj["epoch"]),
                int(obj["after"]),
                obj.get("reason", "trimmed"),
                int(obj.get("requested", self._pos.offset)),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            self._malformed(f"reset with unusable data {excerpt(json.dumps(obj))!r}")
            raise _Retry("malformed") from None

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
            self._pos = ReaderPosition.at_tail(None)
        elif resp.status_code == 200:
            info = expect_json(resp.text, what=f"info of {self.stream!r}")
            last = int(info.get("last_id", 0))
            closed = info.get("status") == "closed"
            # A closed stream still hands over its end entry, like the server does.
            self._pos = ReaderPosition(max(0, last - 1) if closed else last, str(info["epoch"]))
        else:
            await self._raise_for_status(resp.status_code, resp.text, resp.headers)
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

    def _opened(self) -> None:
        self._state.on_open()
        self.refreshed_auth = False
        self.metrics.connections += 1

    # -- SSE ---------------------------------------------------------------------

    def _request_headers(self) -> tuple[dict[str, str], dict[str, str]]:
        # identity: a compressing intermediary would otherwise buffer the stream.
        headers = {
            "Accept": "text/event-stream",
            "Accept-Encoding": "identity",
            "Cache-Control": "no-cache",
        }
        headers.update(self._session.auth_headers())
        params = self._create_param()
        pos = self._pos
        if pos.epoch is not None:
            headers["Last-Event-ID"] = pos.token
        elif pos.offset > 0:
            params["after"] = str(pos.offset)
        return headers, params

    def _create_param(self) -> dict[str, str]:
        """``wait_for_create=1|0`` when the options say, else nothing (the server decides)."""
        wait = self.options.wait_for_create
        return {} if wait is None else {WAIT_FOR_CREATE: "1" if wait else "0"}

    async def _sse_once(self) -> None:
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
                self._opened()
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
                        await self._on_sse(msg, received)
            except httpx.TransportError as exc:
                log.info("runstream follow %s: connection failed: %r", self.stream, exc)
                raise _Retry("network") from exc
        finally:
            if response is not None:
                await response.aclose()

    async def _on_sse(self, msg: SSEMessage, received: float) -> None:
        if msg.event == RESET_TYPE:
            try:
                obj = json.loads(msg.data)
            except ValueError:
                obj = msg.data
            await self._on_reset(self._reset_from(obj), received)
            return
        if not msg.id:
            self._malformed("event without an id")
            return
        try:
            pos = parse_position(msg.id, allow_now=False)
        except ValidationError:
            self._malformed(f"event with an unusable id {msg.id!r}")
            return
        # Servers before the time field: the receive time is the best there is.
        server_time = parse_time(msg.time) if msg.time else 0.0
        await self._on_event(
            pos.offset,
            msg.event,
            None,
            server_time or time.time(),
            pos.epoch,
            received,
            raw=msg.data,
        )

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

    # -- WebSocket -----------------------------------------------------------------

    def _ws_url(self) -> str:
        base = self._session.http.base_url
        scheme = "wss" if base.scheme == "https" else "ws"
        url = base.copy_with(scheme=scheme).join(self._ws_path.lstrip("/"))
        params = self._create_param()
        pos = self._pos
        if pos.epoch is not None or pos.pinned:
            # "<epoch>:0" too: the server then checks the epoch from the first connection.
            params["after"] = pos.token
        if params:
            url = url.copy_merge_params(params)
        return str(url)

    async def _ws_once(self) -> None:
        from runstream.client import _ws

        loop = asyncio.get_running_loop()
        self._timers.start(loop.time())
        delivered_before = self.metrics.events
        async with _ws.Connection(
            self._ws_url(),
            self._session.auth_headers(),
            max_size=self.options.max_event + MAX_ERROR_BODY,
        ) as conn:
            try:
                await self._guard(conn.open())
                # The handshake answer is the first sign of life, as SSE's response head is.
                self._timers.on_bytes(loop.time())
                self._opened()
                while True:
                    message = await self._guard(conn.recv())
                    received = loop.time()
                    self._timers.on_bytes(received)
                    self.metrics.bytes_received += len(message)
                    await self._on_ws(message, received)
            except _ws.Rejected as exc:
                await self._raise_for_status(exc.status, exc.body, exc.headers)
            except _ws.Closed as exc:
                await self._ws_closed(exc.code, exc.reason, self.metrics.events > delivered_before)
            except _ws.Broken as exc:
                log.info("runstream follow %s: connection failed: %s", self.stream, exc)
                raise _Retry("network") from exc

    async def _ws_closed(self, code: int, reason: str, delivered: bool) -> None:
        """The server closed the WebSocket (before the end entry, or we would be done)."""
        if code == 1000:
            # "The stream is over" (closed, or already read to its end). Before
            # believing it without the end entry, ask once more: a connection
            # that closes again without delivering anything confirms it.
            self._ws_clean_closes = 0 if delivered else self._ws_clean_closes + 1
            if self._ws_clean_closes >= 2:
                raise _End
            raise _Retry("eof", 0.0)
        if 4400 <= code < 4600 and code != 4404:
            # A refusal sent as a close code (servers without HTTP denials): 4000 + status.
            await self._raise_for_status(code - 4000, reason, None)
        reasons = {1013: "slow_consumer", 1011: "server_error", 4404: "deleted"}
        raise _Retry(reasons.get(code, "eof"))

    async def _on_ws(self, message: str | bytes, received: float) -> None:
        try:
            obj = json.loads(message)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            # If it was an event, the next one reveals the gap.
            self._malformed(f"message that is not a JSON object: {excerpt(str(message))!r}")
            return
        kind = obj.get("type")
        if "id" not in obj:
            if kind == HEARTBEAT_TYPE:
                return  # a sign of life only: the idle timer already saw it
            if kind == RESET_TYPE:
                await self._on_reset(self._reset_from(obj.get("data")), received)
                return
        try:
            event = event_from_json(obj)
        except ProtocolError as exc:
            self._malformed(str(exc))
            return
        # Each event carries its epoch (servers before that: none; then the position
        # simply does not learn it).
        epoch = obj.get("epoch")
        epoch = epoch if isinstance(epoch, str) and epoch else None
        await self._on_event(
            event.id, event.type, event.data, event.time or time.time(), epoch, received
        )

    # -- long-poll ---------------------------------------------------------------

    async def _poll_once(self) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        headers = {"Accept": "application/json", **self._session.auth_headers()}
        params = {
            "after": self.position,
            "limit": str(opts.poll_limit),
            "wait": f"{opts.poll_wait:g}",
            **self._create_param(),
        }
        # The server may legitimately hold the request for ``poll_wait``; beyond that,
        # the idle (else first-event) watchdog's allowance applies. (``stale`` has
        # nothing to catch here: every poll is a new request to the server.)
        kind: Literal["idle", "first_event"] | None = (
            "idle" if opts.idle else "first_event" if opts.first_event else None
        )
        allowance = opts.idle or opts.first_event or CONNECT_TIMEOUT
        started = loop.time()
        try:
            resp = await self._session.http.get(
                self._path,
                headers=headers,
                params=params,
                timeout=httpx.Timeout(CONNECT_TIMEOUT, read=opts.poll_wait + allowance),
            )
        except httpx.ReadTimeout as exc:
            if kind is not None:
                self.metrics.watchdog_kills[kind] += 1
            raise _Retry("poll_timeout") from exc
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
                self._pos.offset,
            )
            await self._on_reset(reset, received)
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
        epoch = epoch if isinstance(epoch, str) else None
        if epoch is not None and self._pos.epoch is not None and epoch != self._pos.epoch:
            raise _Retry("epoch_mismatch")
        events = cast(list[Any], page["events"])
        for obj in events:
            try:
                event = event_from_json(obj)
            except ProtocolError as exc:
                self._malformed(str(exc))
                raise _Retry("malformed") from None
            await self._on_event(event.id, event.type, event.data, event.time, epoch, received)
        if page.get("closed") is True:
            raise _End
        self._state.on_poll_ok(received)
        if not events and received - started < POLL_MIN_INTERVAL:
            await asyncio.sleep(POLL_MIN_INTERVAL)
