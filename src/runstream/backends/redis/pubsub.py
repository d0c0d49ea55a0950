"""One Redis pub/sub connection per process and Redis server, shared by everyone who listens.

The event log's wake-ups (``P:wake``) and the workers' cancel notices
(``P:cancel``) are channels of one subscription: :meth:`RedisListener.shared`
returns the listener of a connection target (created on first use, in the
running event loop) and :meth:`RedisListener.subscribe` registers a channel
with its handlers. The listener reconnects with the shared backoff policy
(:data:`runstream.core.backoff.RECONNECT`), re-subscribes every channel and
calls every ``on_ready`` again; it stops and closes its connection when the
last subscription is closed.

Pub/sub is only a wake-up; the stream or the run record is the truth. Messages
sent while a channel was not subscribed are lost, so ``on_ready`` (after every
(re)subscription) is where a subscriber looks at the truth again, and
``on_lost`` is where it learns that nothing arrives for a while.

Handlers run on the listener's read loop, synchronously: they must not block
(set an event, queue the work for a task of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.maint_notifications import MaintNotificationsConfig

from runstream.core.backoff import RECONNECT, BackoffState

__all__ = [
    "LISTEN_HEALTH_SECONDS",
    "LISTEN_POLL_SECONDS",
    "RedisListener",
    "Subscription",
    "listen_client_like",
    "target",
]

log = logging.getLogger("runstream.backends.redis")

LISTEN_POLL_SECONDS = 1.0
"""How long the reader waits for a message before checking its state again."""
LISTEN_HEALTH_SECONDS = 10
"""Idle time after which the pub/sub connection is checked with a PING."""

Client: TypeAlias = "aioredis.Redis | RedisCluster"
Connect: TypeAlias = Callable[[], Client]

_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, RedisListener]] = (
    weakref.WeakKeyDictionary()
)


def target(url: str, *, cluster: bool = False) -> Hashable:
    """The key under which clients of ``url`` (as given to redis-py) share a listener."""
    return (url, cluster)


def listen_client_like(redis: aioredis.Redis) -> aioredis.Redis:
    """A one-connection client with the settings of ``redis``, for a listener's ``connect``."""
    pool = redis.connection_pool
    return aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool(
            connection_class=pool.connection_class,
            max_connections=1,
            # See runstream.backends.redis.runstore.NO_MAINT_NOTIFICATIONS: a connection the
            # server closed must be noticed.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            # redis-py PINGs a quiet subscription this often (replies filtered out), so a
            # dead link surfaces as an error instead of silence.
            **{**pool.connection_kwargs, "health_check_interval": LISTEN_HEALTH_SECONDS},
        )
    )


def _nothing() -> None:
    return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


@dataclass(eq=False)
class Subscription:
    """One subscriber's registration for ``channel``; close it with :meth:`aclose`."""

    listener: RedisListener
    channel: str
    on_message: Callable[[str], None]
    on_ready: Callable[[], None] = _nothing
    on_lost: Callable[[], None] = _nothing
    closed: bool = field(default=False, init=False)

    @property
    def ready(self) -> bool:
        """Whether the channel is subscribed now (messages published from now on arrive)."""
        return not self.closed and self.channel in self.listener.confirmed

    async def aclose(self) -> None:
        """Stop receiving; the last subscription of a listener stops it. Idempotent."""
        if not self.closed:
            self.closed = True
            await self.listener.remove(self)


class RedisListener:
    """The pub/sub reader of one connection target. Get it with :meth:`shared`."""

    def __init__(self, key: Hashable, connect: Connect) -> None:
        self.key = key
        self._connect: Connect | None = connect  # dropped once used: it may hold its owner
        self._client: Client | None = None
        self._subs: dict[str, list[Subscription]] = {}
        self.confirmed: set[str] = set()
        """Channels the server confirmed on the current connection."""
        self._pubsub: PubSub | None = None
        self._lock = asyncio.Lock()  # one SUBSCRIBE at a time (the read loop runs alongside)
        self._task: asyncio.Task[None] | None = None
        self._syncs: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def shared(cls, key: Hashable, connect: Connect) -> RedisListener:
        """This event loop's listener for ``key`` (see :func:`target`), created if needed.

        ``connect`` makes the listener's own client; it is called only by the
        listener that is created, so the first subscriber's settings are used.
        """
        listeners = _SHARED.setdefault(asyncio.get_running_loop(), {})
        listener = listeners.get(key)
        if listener is None:
            listener = listeners[key] = cls(key, connect)
        return listener

    def subscribe(
        self,
        channel: str,
        *,
        on_message: Callable[[str], None],
        on_ready: Callable[[], None] = _nothing,
        on_lost: Callable[[], None] = _nothing,
    ) -> Subscription:
        """Register handlers for ``channel`` and subscribe to it (in the background).

        ``on_message(data)`` for every message; ``on_ready()`` each time the
        channel is (re)subscribed, at once if it already is; ``on_lost()`` each
        time the connection fails. Must be called in the running loop.
        """
        if self._closed:
            raise RuntimeError("this listener was stopped; call RedisListener.shared() again")
        sub = Subscription(self, channel, on_message, on_ready, on_lost)
        known = channel in self._subs
        self._subs.setdefault(channel, []).append(sub)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="runstream-redis-pubsub"
            )
        elif channel in self.confirmed:
            self._call(sub.on_ready)
        elif not known and self._pubsub is not None:
            sync = asyncio.get_running_loop().create_task(self._sync(self._pubsub))
            self._syncs.add(sync)
            sync.add_done_callback(self._syncs.discard)
        return sub

    async def remove(self, sub: Subscription) -> None:
        """Unregister ``sub``; stop the listener if it was the last one."""
        subs = self._subs.get(sub.channel, [])
        if sub in subs:
            subs.remove(sub)
        # The channel stays subscribed until the listener stops: unsubscribing would race
        # with a new subscriber of the same channel, and a message nobody wants is cheap.
        if any(self._subs.values()) or self._closed:
            return
        self._closed = True
        listeners = _SHARED.get(asyncio.get_running_loop(), {})
        if listeners.get(self.key) is self:
            del listeners[self.key]
        tasks = [t for t in (self._task, *self._syncs) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
            if isinstance(client, aioredis.Redis):
                await client.connection_pool.aclose()

    # -- the reader -------------------------------------------------------------------

    async def _run(self) -> None:
        """Keep one subscription alive and hand its messages to the subscribers."""
        state = BackoffState(RECONNECT)
        me = asyncio.current_task()
        if self._connect is not None:
            self._client, self._connect = self._connect(), None
        client = self._client
        assert client is not None  # made just above, on the only start
        while not self._closed:
            pubsub: PubSub = client.pubsub()
            self._pubsub = pubsub
            try:
                if isinstance(client, RedisCluster):
                    await client.initialize()  # pub/sub needs the slot map loaded
                await self._sync(pubsub, raise_errors=True)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_POLL_SECONDS)
                    if self._closed or (me is not None and me.cancelling()):
                        # redis-py may swallow our cancellation inside its read.
                        raise asyncio.CancelledError
                    conn = pubsub.connection
                    if conn is None or not conn.is_connected:
                        # redis-py reports a closed socket as "no message" and drops it.
                        raise redis_errors.ConnectionError("pub/sub connection closed")
                    if message is not None:
                        self._dispatch(message, state)
            except Exception as exc:  # this task must outlive any failure
                if self._closed:
                    return  # redis-py can turn our cancellation into its own TimeoutError
                self._lost(exc)
                delay = state.retry_after(f"{type(exc).__name__}: {exc}", time.monotonic())
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            # Only the except clause above gets here (the read loop never ends otherwise).
            await asyncio.sleep(delay)

    async def _sync(self, pubsub: PubSub, *, raise_errors: bool = False) -> None:
        """Subscribe ``pubsub`` to every registered channel it is not subscribed to yet."""
        try:
            async with self._lock:
                have = {_text(channel) for channel in pubsub.channels}
                missing = [channel for channel in self._subs if channel not in have]
                if missing and self._pubsub is pubsub:
                    await pubsub.subscribe(*missing)
        except Exception:
            if raise_errors:
                raise
            # A broken connection: the read loop notices, reconnects and subscribes all.
            log.debug("redis pub/sub: subscribing a new channel failed", exc_info=True)

    def _dispatch(self, message: dict[str, Any], state: BackoffState) -> None:
        kind = message.get("type")
        channel = _text(message.get("channel"))
        if kind == "subscribe":
            self.confirmed.add(channel)
            state.on_success()
            for sub in list(self._subs.get(channel, ())):
                self._call(sub.on_ready)
        elif kind == "message":
            data = _text(message["data"])
            for sub in list(self._subs.get(channel, ())):
                self._call(sub.on_message, data)

    def _lost(self, exc: Exception) -> None:
        if self.confirmed:
            log.warning(
                "redis pub/sub subscription lost (%s: %s); retrying", type(exc).__name__, exc
            )
        else:
            log.debug("redis pub/sub: connecting failed (%s: %s)", type(exc).__name__, exc)
        self.confirmed.clear()
        for subs in list(self._subs.values()):
            for sub in list(subs):
                self._call(sub.on_lost)

    @staticmethod
    def _call(handler: Callable[..., None], *args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("redis pub/sub: a subscriber's handler failed")
