"""The in-process engine (``memory://``): tests and embedding; nothing outlives the process.

Runs execute in the server's local pool.
"""

from __future__ import annotations

from runstream.backends.base import EventLog
from runstream.backends.engine import Engine
from runstream.backends.memory.durable import MemoryDurableStore
from runstream.backends.memory.log import MemoryEventLog
from runstream.backends.memory.runstore import MemoryRunStore

__all__ = ["ENGINE", "MemoryDurableStore", "MemoryEventLog", "MemoryRunStore"]


def _open_log(url: str) -> MemoryEventLog:
    return MemoryEventLog()


def _open_run_store(url: str) -> MemoryRunStore:
    return MemoryRunStore()


def _open_durable(url: str, log: EventLog) -> MemoryDurableStore:
    return MemoryDurableStore()


ENGINE = Engine(
    name="memory",
    open_log=_open_log,
    open_run_store=_open_run_store,
    open_durable=_open_durable,
)
