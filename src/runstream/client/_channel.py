"""The bounded hand-over buffer between a follower's reader task and its consumer."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TypeAlias

from runstream.core.model import Event, Reset

Item: TypeAlias = Event | Reset


class Channel:
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

    async def put(self, item: Item, received: float) -> bool:
        """Queue ``item``; False if the channel was closed instead (nothing handed over)."""
        while self.full and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            return False
        self._items.append((item, received))
        self._readable.set()
        return True

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
