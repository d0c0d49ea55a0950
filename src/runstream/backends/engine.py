"""What a storage engine provides: one :class:`Engine` per package under ``backends/``.

An engine package (``runstream.backends.<name>``) defines ``ENGINE``, an
:class:`Engine` that opens its event log and its run store for a URL and, for
engines shared by many hosts, says how runs are queued and taken by
``runstream worker`` processes. The scheme table in
:mod:`runstream.backends` maps URL schemes to engine packages; nothing else
looks at a URL's scheme.

Engines without a queue (``start_dispatch is None``) execute runs in the
server's own :class:`~runstream.runs.service.LocalWorkerPool`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from runstream.backends.base import EventLog
from runstream.backends.durable import DurableStore

if TYPE_CHECKING:  # annotations only: the runs layer builds on the backends, not the reverse
    from runstream.runs.gates import Gates
    from runstream.runs.service import Dispatcher
    from runstream.runs.store import RunStore
    from runstream.runs.tasks import TaskRegistry


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Engine-neutral options of a queue worker (``runstream worker``, ``serve --workers N``)."""

    concurrency: int
    shutdown_grace: float
    name: str | None = None
    """``None``: the engine's default (host and pid)."""
    lease: float | None = None
    """Seconds; ``None``: the engine's default."""
    gates: Gates | None = None
    """Resource gates checked before each run starts; ``None``: none."""


class QueueWorker(Protocol):
    """A worker taking queued runs; ``run(stop)`` returns once every run it took is recorded."""

    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> asyncio.Event:
        """Set once the worker listens for runs."""
        ...

    async def run(self, stop: asyncio.Event) -> None: ...

    def cancel_all(self, reason: str) -> None:
        """Cancel every run this worker is running (a second stop signal)."""
        ...

    def describe(self) -> str:
        """Its settings for the ready message (``concurrency 4; lease 30s``)."""
        ...


class RunDispatch(Protocol):
    """A server's side of a queue: where new runs go, and what to stop on shutdown."""

    @property
    def dispatcher(self) -> Dispatcher: ...

    @property
    def worker(self) -> QueueWorker | None:
        """The server's own worker on the queue, if it takes runs too."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DispatchContext:
    """What an engine's :attr:`Engine.start_dispatch` gets from the server starting up."""

    store: RunStore
    log: EventLog
    registry: TaskRegistry
    workers: int | None
    """``None``: only queue (workers run elsewhere); a number: also take runs here."""
    shutdown_grace: float
    gates: Gates | None = None


def no_file(url: str) -> Path | None:
    return None


@dataclass(frozen=True, slots=True)
class Engine:
    """One storage engine: how to open its parts for a URL of one of its schemes."""

    name: str
    open_log: Callable[[str], EventLog]
    """Create (not start) the event log for a URL; raises ConfigError if it is invalid."""
    open_run_store: Callable[[str], RunStore]
    """Create (not start) the run store on the same URL."""
    start_dispatch: Callable[[DispatchContext], Awaitable[RunDispatch]] | None = None
    """Engines with a shared queue: start the server's side of it."""
    new_worker: Callable[[RunStore, EventLog, TaskRegistry, WorkerSpec], QueueWorker] | None = None
    """Engines with a shared queue: a worker taking runs from it."""
    local_file: Callable[[str], Path | None] = no_file
    """The file a URL keeps its data in, for engines that keep one (``None`` otherwise)."""
    open_durable: Callable[[str, EventLog], DurableStore] | None = None
    """Create (not start) the Durable Streams store on the same URL (beside ``log``)."""
