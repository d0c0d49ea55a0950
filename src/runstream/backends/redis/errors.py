"""One map from redis-py (and socket) exceptions to runstream errors, for every Redis caller.

The event log, the run store, the queue, the janitor and the workers wrap
each Redis call in :func:`translated`; nothing else catches redis-py's
exceptions, so a failure means the same thing wherever it happens::

    redis.ConnectionError, redis.TimeoutError, OSError  → BackendUnavailable (unreachable)
    redis.ReadOnlyError (a replica, mid-failover)       → BackendUnavailable (retry: the
                                                          new primary will take it)
    any other redis.RedisError                          → BackendError

The first row that matches wins; the original exception is kept as
``__cause__``. Runstream's own errors raised inside pass through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.exceptions as redis_errors

from runstream.errors import BackendError, BackendUnavailable

__all__ = ["REDIS_ERRORS", "translate", "translated"]

REDIS_ERRORS: tuple[tuple[type[BaseException], type[BackendError], str], ...] = (
    (redis_errors.ConnectionError, BackendUnavailable, "redis unreachable during {what}"),
    (redis_errors.TimeoutError, BackendUnavailable, "redis unreachable during {what}"),
    (OSError, BackendUnavailable, "redis unreachable during {what}"),
    (redis_errors.ReadOnlyError, BackendUnavailable, "redis is read-only during {what}"),
    (redis_errors.RedisError, BackendError, "redis failed during {what}"),
)
"""(redis-py or socket exception, runstream error, message) rows, tried in order."""


def translate(exc: BaseException, what: str) -> BackendError | None:
    """The runstream error for ``exc`` raised during ``what``, or None if it is not Redis's."""
    for raised, error, message in REDIS_ERRORS:
        if isinstance(exc, raised):
            return error(f"{message.format(what=what)}: {exc}")
    return None


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise what :func:`translate` maps a Redis failure inside the block to, from it."""
    try:
        yield
    except Exception as exc:
        error = translate(exc, what)
        if error is None:
            raise
        raise error from exc
