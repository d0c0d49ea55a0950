"""The SQLite schema's versions: an ordered list of migration steps.

The database's ``PRAGMA user_version`` is the number of the last step
applied. :func:`migrate` applies every later step in order, each in its own
``BEGIN IMMEDIATE`` transaction that re-reads the version first (two
processes opening an old file at once apply each step once). A step may ask
for a ``VACUUM`` after its transaction (it cannot run inside one), e.g. to
rebuild the file with a new ``auto_vacuum`` mode.

To change the schema, append a :class:`Step` with the next number and set
:data:`~runstream.backends.sqlite.sql.SCHEMA_VERSION` to it; never edit a step
that has shipped.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from runstream.backends.sqlite.sql import _DS_SCHEMA, _SCHEMA, SCHEMA_VERSION
from runstream.errors import BackendError

__all__ = ["STEPS", "Step", "migrate"]


@dataclass(frozen=True, slots=True)
class Step:
    """One schema version: what brings a database from ``version - 1`` to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...] = ()
    vacuum: bool = False
    """Run ``VACUUM`` after the step's transaction (it needs the whole file for a while:
    once per database, on the first start of the version that adds the step)."""


STEPS: tuple[Step, ...] = (
    Step(1, "streams, events and producers", _SCHEMA),
    Step(
        2,
        "auto_vacuum = INCREMENTAL: pages freed by deletions can be returned to the file system",
        ("PRAGMA auto_vacuum = INCREMENTAL",),
        vacuum=True,
    ),
    Step(3, "Durable Streams: ds_streams and ds_entries", _DS_SCHEMA),
)

assert [s.version for s in STEPS] == list(range(1, len(STEPS) + 1)), "steps are numbered 1..n"
assert STEPS[-1].version == SCHEMA_VERSION, "SCHEMA_VERSION is the last step"


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: str) -> list[int]:
    """Bring the database on ``conn`` (autocommit mode) to :data:`SCHEMA_VERSION`.

    Returns the versions applied (empty if it was current). Raises
    :class:`BackendError` for a database newer than this runstream; sqlite3
    errors propagate (the caller translates them). Blocking.
    """
    applied: list[int] = []
    for step in STEPS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _version(conn)
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"sqlite database {path!r} has schema version {version}, newer than "
                    f"this runstream understands ({SCHEMA_VERSION}); upgrade runstream"
                )
            if version >= step.version:
                conn.execute("COMMIT")
                continue
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step.version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if step.vacuum:
            conn.execute("VACUUM")
        applied.append(step.version)
    return applied
