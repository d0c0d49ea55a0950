"""Every exception runstream raises derives from :class:`RunstreamError`.

The tree separates "the caller misused the API" from "the other side
misbehaved", so callers can decide what is worth retrying::

    RunstreamError
    ├── UsageError                  the caller asked for something invalid (not retryable)
    │   ├── ValidationError         bad name, type, data, param or size   (HTTP 400/413/422)
    │   │   ├── PayloadTooLarge     a body, batch or event over a limit    (HTTP 413)
    │   │   └── InvalidParams       run params/timeout not matching the task (HTTP 422)
    │   ├── StreamNotFound          no such stream                        (HTTP 404)
    │   │   └── StreamDeleted       the stream was deleted while followed
    │   ├── StreamClosed            append to a closed stream             (HTTP 409)
    │   ├── StaleProducerSeq        producer seq older than the last one  (HTTP 409)
    │   ├── HistoryLost             position trimmed or from another epoch (HTTP 410)
    │   ├── RunNotFound / TaskNotFound                                     (HTTP 404)
    │   ├── IllegalTransition       a run status change the lifecycle forbids
    │   └── ConfigError             invalid configuration or URL
    └── RemoteError                 the remote side misbehaved (often retryable)
        ├── BackendError            the storage backend failed or is unreachable
        │   ├── BackendUnavailable  could not reach the backend at all     (HTTP 503)
        │   └── InsufficientStorage free disk below [storage] min_free_disk (HTTP 507)
        ├── ProtocolError           a peer sent something we cannot accept
        ├── HTTPStatusError         the server answered with an error status
        ├── StreamTimeout           a watchdog timer fired (first event, idle, stale)
        ├── RetriesExhausted        reconnect budget used up for one outage
        └── TooManySubscribers      a server's subscriber limit is reached (HTTP 429)
    HandlerFailed                   a listener's handler kept failing and its dead-letter
                                    hook failed too: the listener stopped (its checkpoint
                                    stays before that event)

Backend libraries' exceptions (``sqlite3``, ``redis``) never escape: backends
translate them into :class:`BackendError` and keep the original as
``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "HTTPStatusError",
    "HandlerFailed",
    "HistoryLost",
    "IllegalTransition",
    "InsufficientStorage",
    "InvalidParams",
    "PayloadTooLarge",
    "ProtocolError",
    "RemoteError",
    "RetriesExhausted",
    "RunNotFound",
    "RunstreamError",
    "StaleProducerSeq",
    "StreamClosed",
    "StreamDeleted",
    "StreamNotFound",
    "StreamTimeout",
    "TaskNotFound",
    "TooManySubscribers",
    "UsageError",
    "ValidationError",
]


class RunstreamError(Exception):
    """Root of every runstream exception.

    ``code`` is the stable, machine-readable error code used in HTTP error
    bodies (``{"error": {"code": ..., "message": ...}}``).
    """

    code: str = "error"
    http_status: int = 500


class UsageError(RunstreamError):
    """The caller asked for something invalid; retrying the same call fails again."""

    code = "bad_request"
    http_status = 400


class ValidationError(UsageError):
    """A name, event type, data value, parameter or size failed validation.

    ``field`` names the offending input when there is one.
    """

    code = "invalid"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLarge(ValidationError):
    code = "too_large"
    http_status = 413


class InvalidParams(ValidationError):
    """A run's params (or timeout) do not match its task's declaration; ``field`` names it."""

    code = "invalid_params"
    http_status = 422


class StreamNotFound(UsageError):
    code = "stream_not_found"
    http_status = 404

    def __init__(self, stream: str, message: str | None = None) -> None:
        super().__init__(message or f"stream {stream!r} does not exist")
        self.stream = stream


class StreamDeleted(StreamNotFound):
    """The stream was deleted while it was being followed."""

    code = "stream_deleted"

    def __init__(self, stream: str) -> None:
        super().__init__(stream, f"stream {stream!r} was deleted")


class StreamClosed(UsageError):
    code = "stream_closed"
    http_status = 409

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream!r} is closed; nothing more can be appended")
        self.stream = stream


class StaleProducerSeq(UsageError):
    """A producer sent a seq lower than the last one accepted for it.

    A retry of the *last* accepted seq is not an error (it returns the original
    ids); an older seq means the producer went backwards.
    """

    code = "stale_producer_seq"
    http_status = 409

    def __init__(self, stream: str, producer: str, seq: int, last_seq: int) -> None:
        super().__init__(
            f"producer {producer!r} sent seq {seq} to stream {stream!r}, "
            f"but seq {last_seq} was already accepted; seqs must not go backwards"
        )
        self.stream = stream
        self.producer = producer
        self.seq = seq
        self.last_seq = last_seq


class HistoryLost(UsageError):
    """The requested position cannot be served exactly.

    Either the stream's epoch changed (deleted and re-created, or the backend
    lost its data) or the position is older than the retained history. The
    caller must treat its state as stale and restart from ``first_id - 1`` of
    ``epoch``.
    """

    code = "history_lost"
    http_status = 410

    def __init__(
        self, stream: str, *, epoch: str, first_id: int, reason: str, message: str | None = None
    ) -> None:
        super().__init__(
            message
            or f"history of stream {stream!r} before the requested position is gone ({reason})"
        )
        self.stream = stream
        self.epoch = epoch
        self.first_id = first_id
        self.reason = reason


class RunNotFound(UsageError):
    code = "run_not_found"
    http_status = 404


class TaskNotFound(UsageError):
    code = "task_not_found"
    http_status = 404


class IllegalTransition(UsageError):
    code = "illegal_transition"
    http_status = 409


class ConfigError(UsageError):
    code = "config_error"
    http_status = 500


class RemoteError(RunstreamError):
    """The other side (backend, server, peer) misbehaved; retrying may help."""

    code = "remote_error"
    http_status = 502


class BackendError(RemoteError):
    code = "backend_error"
    http_status = 503


class BackendUnavailable(BackendError):
    code = "backend_unavailable"
    http_status = 503


class InsufficientStorage(BackendError):
    """Free disk space is below ``[storage] min_free_disk``: nothing was written.

    Appends and new runs are refused until space returns; retry later.
    """

    code = "insufficient_storage"
    http_status = 507


class ProtocolError(RemoteError):
    code = "protocol_error"
    http_status = 502


class HTTPStatusError(RemoteError):
    """The server answered with an error status; ``body`` holds what it sent."""

    code = "http_status"

    def __init__(self, message: str, *, status: int, body: str = "", error_code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.error_code = error_code


class StreamTimeout(RemoteError):
    """A watchdog timer fired: ``kind`` is ``"first_event"``, ``"idle"`` or ``"stale"``."""

    code = "stream_timeout"

    def __init__(self, kind: str, seconds: float) -> None:
        super().__init__(f"{kind} timeout: nothing for {seconds:g}s")
        self.kind = kind
        self.seconds = seconds


class RetriesExhausted(RemoteError):
    code = "retries_exhausted"


class TooManySubscribers(RemoteError):
    """The server is at its subscriber limit (per stream or overall); retry later."""

    code = "too_many_subscribers"
    http_status = 429


class HandlerFailed(RunstreamError):
    """A handler kept failing on an item and the dead-letter hook raised too.

    ``run_forever`` stops: the item is not settled, so a checkpoint stays
    before it and a restarted listener handles it again. ``__cause__`` is
    the dead-letter hook's exception; ``handler_error`` the handler's.
    """

    code = "handler_failed"

    def __init__(self, message: str, *, handler_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.handler_error = handler_error
