"""The SQLite engine (``sqlite:///path``, the default): one file, shared by processes on one host.

The event log (:mod:`.log`) and the run store (:mod:`.runstore`) keep their
tables in the same database file; runs execute in the server's local pool.
"""

from __future__ import annotations

from pathlib import Path

from runstream.backends.engine import Engine
from runstream.backends.sqlite.durable import SQLiteDurableStore
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.backends.sqlite.runstore import SQLiteRunStore

__all__ = ["ENGINE", "SQLiteDurableStore", "SQLiteEventLog", "SQLiteRunStore"]


def _local_file(url: str) -> Path:
    return Path(SQLiteEventLog.from_url(url).path)


ENGINE = Engine(
    name="sqlite",
    open_log=SQLiteEventLog.from_url,
    open_run_store=SQLiteRunStore.from_url,
    local_file=_local_file,
    open_durable=SQLiteDurableStore.for_log,
)
