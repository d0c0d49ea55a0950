"""``Client``: the same surface as :class:`AsyncClient`, for code without an event loop.

Every call runs on a private event loop in a background thread owned by the
client, and the calling thread waits for the result. That is what makes the
sync client usable from plain threads *and* from code that already runs
inside an event loop (a sync library called from an ``async def``, a Jupyter
cell): nothing ever calls ``asyncio.run`` on the caller's thread. (The calling
loop is blocked while it waits, as with any blocking call.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import httpx

from runstream.client._async import DEFAULT_TIMEOUT, REQUEST_RETRY, AsyncClient
from runstream.client.follow import Follower, FollowOptions, Item
from runstream.client.handlers import EventHandler, KeyFn, ResetHandler, Where
from runstream.client.metrics import Metrics
from runstream.client.policy import RetryPolicy
from runstream.client.publisher import DEFAULT_LINGER, DEFAULT_MAX_EVENTS, SyncPublisher
from runstream.client.runs import RUNS_FEED, RUNS_FEED_PATH
from runstream.core.model import JSON, AppendResult, Event, NewEvent, Page, StreamInfo
from runstream.errors import UsageError

T = TypeVar("T")

STOP_POLL_INTERVAL = 0.05
"""How often a ``threading.Event`` passed as ``stop_event`` is checked (seconds)."""


class _LoopThread:
    """An event loop running forever in a daemon thread, until :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="runstream-client", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and wait for its result (or exception)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise UsageError(
                "the sync Client was called from its own event loop (e.g. in an async handler); "
                "use ctx.client, the AsyncClient, there"
            )
        if not self.thread.is_alive():
            coro.close()
            raise UsageError("this client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C (or any error) in the waiting thread: stop the work too.
            future.cancel()
            raise

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()


async def _bridge_stop(stop: threading.Event, target: asyncio.Event) -> None:
    # A threading.Event cannot be awaited, and a thread blocked in stop.wait() could
    # not be released if the stop never comes; checking it every 50 ms bounds the
    # stop latency without leaking anything.
    while not stop.is_set():  # noqa: ASYNC110
        await asyncio.sleep(STOP_POLL_INTERVAL)
    target.set()


class SyncFollower(Iterator[Item]):
    """A blocking iterator over a :class:`Follower`; close it (or ``with``) if you stop early."""

    def __init__(self, runner: _LoopThread, follower: Follower, bridge: Any = None) -> None:
        self._runner = runner
        self._follower = follower
        self._bridge = bridge

    @property
    def metrics(self) -> Metrics:
        return self._follower.metrics

    @property
    def position(self) -> str:
        return self._follower.position

    @property
    def end(self) -> Event | None:
        return self._follower.end

    def __iter__(self) -> SyncFollower:
        return self

    def __next__(self) -> Item:
        try:
            return self._runner.call(self._follower.__anext__())
        except StopAsyncIteration:
            self._cancel_bridge()
            raise StopIteration from None

    def _cancel_bridge(self) -> None:
        if self._bridge is not None:
            self._runner.loop.call_soon_threadsafe(self._bridge.cancel)
            self._bridge = None

    def close(self) -> None:
        self._cancel_bridge()
        if self._runner.thread.is_alive():
            self._runner.call(self._follower.aclose())

    def __enter__(self) -> SyncFollower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client:
    """Blocking client for a runstream server; see :class:`AsyncClient` for every method.

    ``token_refresh`` is a plain function returning a new token (called in a
    worker thread). Handlers registered with :meth:`on` may be plain functions
    (run in worker threads) or ``async def`` (run on the client's loop).
    ``stop_event`` arguments are :class:`threading.Event` objects. Close the
    client (``with Client(...) as client:`` or :meth:`close`) to stop its
    thread and connections. ``url``, ``token`` and the follow options come
    from the environment when not given, as for :class:`AsyncClient`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        token_refresh: Callable[[], str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = REQUEST_RETRY,
        follow_options: FollowOptions | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._runner = _LoopThread()
        refresh = None
        if token_refresh is not None:
            sync_refresh = token_refresh

            async def refresh() -> str:
                return await asyncio.to_thread(sync_refresh)

        async def make() -> AsyncClient:
            return AsyncClient(
                url,
                token=token,
                token_refresh=refresh,
                timeout=timeout,
                retry=retry,
                follow_options=follow_options,
                headers=headers,
                transport=transport,
            )

        self._async = self._runner.call(make())

    @property
    def aio(self) -> AsyncClient:
        """The underlying :class:`AsyncClient` (lives on the client's own loop thread)."""
        return self._async

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.call(coro)

    # -- streams ---------------------------------------------------------------------

    def publish(self, stream: str, type: str, data: JSON = None) -> AppendResult:
        return self._call(self._async.publish(stream, type, data))

    def publish_many(
        self, stream: str, events: Iterable[NewEvent | Mapping[str, Any] | tuple[str, Any]]
    ) -> AppendResult:
        return self._call(self._async.publish_many(stream, list(events)))

    def publisher(
        self, stream: str, *, linger: float = DEFAULT_LINGER, max_events: int = DEFAULT_MAX_EVENTS
    ) -> SyncPublisher:
        """A batching publisher for ``stream``: ``pub.publish(type, data)`` queues without
        waiting; ``with client.publisher(stream) as pub:`` flushes at the end."""
        return SyncPublisher(self, stream, linger=linger, max_events=max_events)

    def close_stream(
        self, stream: str, status: str | None = None, reason: str | None = None
    ) -> Any:
        return self._call(self._async.close_stream(stream, status, reason))

    def info(self, stream: str) -> StreamInfo:
        return self._call(self._async.info(stream))

    def read(
        self, stream: str, after: int | str = 0, *, limit: int = 1000, wait: float | None = None
    ) -> Page:
        return self._call(self._async.read(stream, after, limit=limit, wait=wait))

    def delete_stream(self, stream: str) -> None:
        self._call(self._async.delete_stream(stream))

    def list_streams(self, **params: str) -> Any:
        return self._call(self._async.list_streams(**params))

    # -- runs --------------------------------------------------------------------------

    def list_tasks(self) -> Any:
        return self._call(self._async.list_tasks())

    def create_run(
        self,
        task: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        return self._call(self._async.create_run(task, params, timeout=timeout))

    def list_runs(
        self,
        *,
        status: str | None = None,
        task: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Any:
        return self._call(
            self._async.list_runs(status=status, task=task, limit=limit, cursor=cursor)
        )

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._call(self._async.get_run(run_id))

    def cancel_run(self, run_id: str) -> Any:
        return self._call(self._async.cancel_run(run_id))

    def delete_run(self, run_id: str, *, force: bool = False) -> dict[str, Any]:
        return self._call(self._async.delete_run(run_id, force=force))

    def delete_runs(self, **filters: Any) -> dict[str, Any]:
        return self._call(self._async.delete_runs(**filters))

    def gc(self) -> dict[str, Any]:
        return self._call(self._async.gc())

    def status(self) -> dict[str, Any]:
        return self._call(self._async.status())

    # -- following ---------------------------------------------------------------------

    def _stop_bridge(self, stop_event: threading.Event | None) -> tuple[Any, Any]:
        if stop_event is None:
            return None, None

        async def make() -> tuple[asyncio.Event, asyncio.Task[None]]:
            target = asyncio.Event()
            return target, asyncio.create_task(_bridge_stop(stop_event, target))

        return self._call(make())

    def follow(
        self,
        stream: str,
        after: int | str | None = None,
        *,
        stop_event: threading.Event | None = None,
        metrics: Metrics | None = None,
        options: FollowOptions | None = None,
        run: bool = False,
        path: str | None = None,
        **overrides: Any,
    ) -> SyncFollower:
        """Blocking :meth:`AsyncClient.follow`: iterate with ``for``; close it if you stop early."""
        target, bridge = self._stop_bridge(stop_event)

        async def make() -> Follower:
            return self._async.follow(
                stream,
                after,
                stop_event=target,
                metrics=metrics,
                options=options,
                run=run,
                path=path,
                **overrides,
            )

        return SyncFollower(self._runner, self._call(make()), bridge)

    def follow_run(self, run_id: str, after: int | str | None = None, **kw: Any) -> SyncFollower:
        return self.follow(run_id, after, run=True, **kw)

    def on(
        self, *types: str, where: Where | None = None, key: KeyFn | None = None
    ) -> Callable[[EventHandler], EventHandler]:
        return self._async.on(*types, where=where, key=key)

    def on_reset(self, fn: ResetHandler) -> ResetHandler:
        return self._async.on_reset(fn)

    def run_forever(
        self,
        stream: str,
        after: int | str | None = None,
        *,
        stop_event: threading.Event | None = None,
        **kw: Any,
    ) -> Event | None:
        """Blocking :meth:`AsyncClient.run_forever`; ``stop_event`` is a ``threading.Event``."""
        target, bridge = self._stop_bridge(stop_event)
        try:
            return self._call(self._async.run_forever(stream, after, stop_event=target, **kw))
        finally:
            if bridge is not None and self._runner.thread.is_alive():
                self._runner.loop.call_soon_threadsafe(bridge.cancel)

    def follow_runs(self, after: int | str | None = None, **kw: Any) -> SyncFollower:
        """Blocking :meth:`AsyncClient.follow_runs` (the runs feed)."""
        return self.follow(RUNS_FEED, after, path=RUNS_FEED_PATH, **kw)

    def on_run(
        self, *types: str, where: Where | None = None, key: KeyFn | None = None
    ) -> Callable[[EventHandler], EventHandler]:
        """:meth:`AsyncClient.on_run`: plain functions run in worker threads."""
        return self._async.on_run(*types, where=where, key=key)

    def handle_runs(
        self,
        after: int | str | None = None,
        *,
        stop_event: threading.Event | None = None,
        **kw: Any,
    ) -> None:
        """Blocking :meth:`AsyncClient.handle_runs`; ``stop_event`` is a ``threading.Event``."""
        target, bridge = self._stop_bridge(stop_event)
        try:
            self._call(self._async.handle_runs(after, stop_event=target, **kw))
        finally:
            if bridge is not None and self._runner.thread.is_alive():
                self._runner.loop.call_soon_threadsafe(bridge.cancel)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop every follower, close connections, end the client's thread."""
        if self._runner.thread.is_alive():
            try:
                self._call(self._async.aclose())
            finally:
                self._runner.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
