"""The Durable Streams store contract: what an engine provides for ``/v1/stream/{path}``.

A :class:`DurableStore` keeps DS streams (bytes of any content type, see
:mod:`runstream.core.durable`) beside the engine's event log. Each engine applies
the decisions of :mod:`runstream.core.durable` (:func:`decide_append`, ...) to
one consistent state, atomically with the write: the producer check, the
``Stream-Seq`` check, the entries and the close are one transaction.

Wake-ups reuse the engine's own notification path: every store has a
:class:`~runstream.backends.base.Notifier` (keyed by stream name) that it
notifies after a write is durable; live readers register before they read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from runstream.backends.base import Notifier
from runstream.core.durable import AppendRequest, CreateRequest, DsState, Outcome

READ_MAX_BYTES = 1024 * 1024
"""Bytes one catch-up response carries at most (always at least one entry)."""


@dataclass(frozen=True, slots=True)
class DsRead:
    """One consistent read: the state, and the entries from ``start`` to ``end``."""

    state: DsState
    start: int
    end: int
    entries: list[bytes]

    @property
    def up_to_date(self) -> bool:
        return self.end >= self.state.tail


@dataclass(frozen=True, slots=True)
class DsWrite:
    outcome: Outcome
    state: DsState


class DurableStore(ABC):
    """Durable Streams storage of one engine. Raises :class:`~runstream.core.durable.DsError`."""

    def __init__(self) -> None:
        self.notifier = Notifier()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
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

    @abstractmethod
    async def create(self, name: str, req: CreateRequest, now: float) -> tuple[DsState, bool]:
        """Create ``name`` (``True``) or confirm an identical one (``False``); 409 otherwise.

        Forks (``req.fork_source``) share the source's entries up to the fork
        position: 404 if the source does not exist, 409 if it was deleted or its
        content type differs, 400 for a position or sub-offset past its end.
        """

    @abstractmethod
    async def append(self, name: str, req: AppendRequest, now: float) -> DsWrite:
        """Apply :func:`~runstream.core.durable.decide_append` and store its plan atomically."""

    @abstractmethod
    async def head(self, name: str, now: float) -> DsState:
        """The state (404 absent or expired, 410 deleted with forks left); no TTL renewal."""

    @abstractmethod
    async def read(
        self, name: str, position: int | None, now: float, max_bytes: int = READ_MAX_BYTES
    ) -> DsRead:
        """Entries after ``position`` (``None``: the tail) up to ``max_bytes``; renews a TTL.

        400 if ``position`` is beyond the tail.
        """

    @abstractmethod
    async def delete(self, name: str, now: float) -> None:
        """Delete ``name``: gone at once, or kept for its forks' reads (410 to everyone)."""

    async def sweep(self, now: float) -> int:
        """Delete expired streams; returns how many. Engines may also expire lazily."""
        return 0
