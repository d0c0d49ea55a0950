"""Helpers for tests that need a follower to be waiting before they act."""

from __future__ import annotations

import asyncio

from runstream.backends import EventLog


def watching(log: EventLog, streams: set[str]) -> asyncio.Event:
    """An event set once a follower of each of ``streams`` registered for wake-ups."""
    seen: set[str] = set()
    done = asyncio.Event()
    real = log.notifier.watch

    def watch(stream: str) -> asyncio.Future[None]:
        seen.add(stream)
        if streams <= seen:
            done.set()
        return real(stream)

    log.notifier.watch = watch  # type: ignore[method-assign]
    return done
