"""The runstream Python SDK: :class:`AsyncClient`, :class:`Client` and the reliability helpers.

Following a stream (``client.follow(stream)``, over SSE, WebSocket or
long-poll) reconnects with capped, full-jitter backoff, resumes from the last
delivered id without ever yielding an id twice, reports lost history as
:class:`~runstream.core.model.Reset`, applies first-event / idle / stale
watchdogs and falls back to long-polling when streaming keeps failing.
``client.run_forever(stream, checkpoint=store)`` runs handlers with a durable
position (at-least-once). :func:`watchdog` puts the same timers around any
async iterator. See ``docs/listening.md``.
"""

from runstream.client._async import AsyncClient
from runstream.client._sync import Client, SyncFollower
from runstream.client.checkpoint import (
    CheckpointStore,
    FileCheckpointStore,
    MemoryCheckpointStore,
    SQLiteCheckpointStore,
)
from runstream.client.follow import Follower, FollowOptions
from runstream.client.handlers import Context
from runstream.client.metrics import Metrics, export_prometheus
from runstream.client.policy import RetryPolicy
from runstream.client.publisher import AsyncPublisher, SyncPublisher
from runstream.client.watchdog import Watchdog, watchdog

__all__ = [
    "AsyncClient",
    "AsyncPublisher",
    "CheckpointStore",
    "Client",
    "Context",
    "FileCheckpointStore",
    "FollowOptions",
    "Follower",
    "MemoryCheckpointStore",
    "Metrics",
    "RetryPolicy",
    "SQLiteCheckpointStore",
    "SyncFollower",
    "SyncPublisher",
    "Watchdog",
    "export_prometheus",
    "watchdog",
]
