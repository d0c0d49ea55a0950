"""The in-process engine (``memory://``): tests and embedding; nothing outlives the process.

Runs execute in the server's local pool.
"""

from __future__ import annotations

from runstream.backends.engine import Engine
from runstream.backends.memory.log import MemoryEventLog
from runstream.backends.memory.runstore import MemoryRunStore

__all__ = ["ENGINE", "MemoryEventLog", "MemoryRunStore"]


def _open_log(url: str) -> MemoryEventLog:
    return MemoryEventLog()


def _open_run_store(url: str) -> MemoryRunStore:
    return MemoryRunStore()


ENGINE = Engine(name="memory", open_log=_open_log, open_run_store=_open_run_store)
