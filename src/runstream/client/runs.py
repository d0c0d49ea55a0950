"""Listening to every run: the runs feed, and one listener that handles each run's events.

The server announces every run's lifecycle on one stream, the *runs feed*
(``GET /v1/runs/events``, ``/v1/runs/ws``): items of type ``created``,
``status`` and ``ended`` whose data is the run object plus ``"previous"``
(the status it moved from). ``client.follow_runs()`` follows it like any
stream (resume, no duplicates, resets, every transport).

:class:`RunsListener` (``client.handle_runs()``) builds on it: every run the
feed reveals (its first item seen, whatever its type: a listener that starts
late, or a feed item that was repaired, still finds it) is followed on its own
stream with ``run_forever``, its events going to the handlers registered with
``client.on_run(...)``. With a checkpoint store, each run's position is saved
under ``"<name>:<run id>"`` and the feed's under ``"<name>"``; the feed's
checkpoint moves past a run's first item only once that run was followed to
its end (its handlers done, its checkpoint saved), so after a crash every run
that was not finished is found again and resumed from its own checkpoint:
every event of every run is handled at least once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from runstream.client.checkpoint import CheckpointStore, CheckpointWriter, Watermark
from runstream.client.handlers import HandlerRegistry, position_after
from runstream.client.metrics import Metrics
from runstream.core.model import Event, Reset
from runstream.errors import RunNotFound, StreamNotFound

if TYPE_CHECKING:
    from runstream.client._async import AsyncClient

__all__ = ["RUNS_FEED", "RUNS_FEED_PATH", "RunFilter", "RunsListener"]

log = logging.getLogger("runstream.client")

RUNS_FEED = "runstream:runs"
"""The stream the server announces run lifecycles on."""
RUNS_FEED_PATH = "/v1/runs/events"
DEFAULT_MAX_RUNS = 64
"""Runs followed at once by one :class:`RunsListener` (more wait: the feed pauses)."""
REMEMBER_DONE = 10_000

RunFilter = Callable[[Mapping[str, Any]], bool]
"""``where(run)``: whether to follow a run (its object as the feed shows it)."""


class RunsListener:
    """Follows the runs feed and, for each run, its stream; see the module docstring.

    Create it with :meth:`AsyncClient.handle_runs` (which runs it). Per-run
    options (``concurrency``, ``queue_size``, ``handler_retry``,
    ``dead_letter``, watchdogs...) go to each run's ``run_forever``.
    """

    def __init__(
        self,
        client: AsyncClient,
        registry: HandlerRegistry,
        *,
        where: RunFilter | None = None,
        max_runs: int = DEFAULT_MAX_RUNS,
        checkpoint: CheckpointStore | None = None,
        checkpoint_name: str = "runs",
        stop_event: asyncio.Event | None = None,
        metrics: Metrics | None = None,
        run_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_runs < 1:
            raise ValueError("max_runs must be >= 1")
        self.client = client
        self.registry = registry
        self.where = where
        self.checkpoint = checkpoint
        self.name = checkpoint_name
        self.stop = stop_event or asyncio.Event()
        self.metrics = metrics or Metrics()
        """The feed follower's metrics (each run's follower has its own)."""
        self.run_options = dict(run_options or {})
        self.active: dict[str, asyncio.Task[bool]] = {}
        """Runs being followed now, by id."""
        self.done: OrderedDict[str, None] = OrderedDict()
        """Runs followed to their end by this listener (the most recent ones)."""
        self.failure: BaseException | None = None
        self._slots = asyncio.Semaphore(max_runs)
        self._failed = asyncio.Event()

    async def run(self, after: int | str | None = None) -> None:
        """Until ``stop_event`` is set (or a run's listener fails: then that error is raised)."""
        writer: CheckpointWriter | None = None
        watermark: Watermark | None = None
        if self.checkpoint is not None:
            saved = await self.checkpoint.load(self.name)
            if saved is not None:
                after = saved
            writer = CheckpointWriter(self.checkpoint, self.name, self.metrics, saved=saved)
            watermark = Watermark(saved, on_advance=writer.update)
        follower = self.client.follow_runs(after, stop_event=self.stop, metrics=self.metrics)
        pump = asyncio.create_task(self._pump(follower, watermark), name="runstream-runs-feed")
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait((pump, failed), return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()
        finally:
            failed.cancel()
            self.stop.set()  # every run's listener stops too, saving its checkpoint
            if not pump.done():
                pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            await follower.aclose()
            await asyncio.gather(*self.active.values(), return_exceptions=True)
            if writer is not None:
                await writer.aclose()
        if self.failure is not None:
            raise self.failure

    async def _pump(self, follower: Any, watermark: Watermark | None) -> None:
        async for item in follower:
            seq = watermark.open(position_after(item)) if watermark is not None else None
            if isinstance(item, Reset):
                log.warning(
                    "runstream runs feed: history lost (%s); runs announced only in the lost "
                    "part are not found",
                    item.reason,
                )
            elif isinstance(item, Event):
                await self._on_item(item, watermark, seq)
            if watermark is not None and seq is not None:
                watermark.seal(seq)

    async def _on_item(self, item: Event, watermark: Watermark | None, seq: int | None) -> None:
        run = item.data if isinstance(item.data, Mapping) else None
        run_id = run.get("id") if run is not None else None
        if run is None or not isinstance(run_id, str):
            log.warning("runstream runs feed: item %d has no run; skipped", item.id)
            return
        if run_id in self.active or run_id in self.done:
            return
        if self.where is not None:
            try:
                wanted = self.where(run)
            except Exception:
                log.exception("runstream runs feed: the where() filter failed on run %s", run_id)
                wanted = False
            if not wanted:
                self._remember_done(run_id)
                return
        await self._slots.acquire()
        if watermark is not None and seq is not None:
            watermark.add_job(seq)
        task = asyncio.create_task(self._follow_run(run_id, run), name=f"runstream-run-{run_id}")
        self.active[run_id] = task

        def finished(task: asyncio.Task[bool]) -> None:
            self._slots.release()
            self.active.pop(run_id, None)
            settled = not task.cancelled() and task.exception() is None and task.result()
            # A run stopped before its end keeps the feed's checkpoint before its first
            # item: a restart finds it again and resumes it from its own checkpoint.
            if settled and watermark is not None and seq is not None:
                watermark.job_done(seq)

        task.add_done_callback(finished)

    async def _follow_run(self, run_id: str, run: Mapping[str, Any]) -> bool:
        """Follow one run to its end; True once nothing is left to handle for it."""
        options = dict(self.run_options)
        name = f"{self.name}:{run_id}"
        try:
            end = await self.client.run_forever(
                run_id,
                run=True,
                stop_event=self.stop,
                registry=self.registry,
                checkpoint=self.checkpoint,
                checkpoint_name=name,
                extra={"run": dict(run)},
                **options,
            )
        except (RunNotFound, StreamNotFound) as exc:
            # Deleted before we got to it: nothing left to handle.
            log.warning("runstream runs: run %s is gone (%s); skipped", run_id, exc)
            self._remember_done(run_id)
            return True
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # A run's listener that fails (a dead-letter hook that raised, an outage
            # beyond the retry budget) stops the whole listener, as run_forever does.
            if self.failure is None:
                self.failure = exc
            self._failed.set()
            raise
        if end is None:
            return False  # stopped before the end
        self._remember_done(run_id)
        return True

    def _remember_done(self, run_id: str) -> None:
        self.done[run_id] = None
        self.done.move_to_end(run_id)
        while len(self.done) > REMEMBER_DONE:
            self.done.popitem(last=False)
