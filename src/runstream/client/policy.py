"""The follower's reconnect decisions, without I/O.

:class:`ReconnectState` is fed what happened (a connection opened, a real
event arrived, an attempt failed and why, a poll answered) and answers what to
do next: wait this long, then stream or poll; or give up. It never sleeps and
never touches a socket, so every rule below is tested with a fake clock:

* **Full jitter, capped.** The n-th retry of an outage waits a uniform random
  time in ``[0, min(max_delay, base_delay * multiplier ** (n - 1))]``.
* **The server's ``retry:`` is the floor.** No wait is shorter than the last
  ``retry:`` the server sent (nor a 429's ``Retry-After``).
* **Attempts reset only after a real event**, never on connect: a server that
  accepts and immediately closes would otherwise be hammered with zero-delay
  reconnects forever.
* **A budget per outage.** An outage starts with the first failure after the
  last real event; after ``max_attempts`` failures or ``max_elapsed`` seconds
  the answer is :class:`GiveUp`, which the follower raises as
  :class:`~runstream.errors.RetriesExhausted`.
* **Polling fallback.** After ``fallback_after`` consecutive streaming failures
  (or when the server says it cannot stream), the next attempts use the JSON
  long-poll endpoint from the same position. Every ``probe_interval`` seconds
  one streaming attempt is made again; streaming is considered recovered once
  it delivers a real event.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from runstream.core.backoff import Backoff, BackoffState
from runstream.core.backoff import GiveUp as CoreGiveUp

Mode: TypeAlias = Literal["stream", "poll"]

DEFAULT_BASE_DELAY = 0.5
DEFAULT_MAX_DELAY = 30.0
DEFAULT_MAX_ATTEMPTS = 12
DEFAULT_MAX_ELAPSED = 300.0
DEFAULT_FALLBACK_AFTER = 3
DEFAULT_PROBE_INTERVAL = 30.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a follower (and a retried request) waits between attempts.

    ``max_attempts`` / ``max_elapsed`` bound one outage; ``None`` removes that
    bound (set at least one unless retrying forever is really intended).
    ``fallback_after`` consecutive streaming failures switch to long-polling
    (``0`` never falls back); ``probe_interval`` is how often a polling
    follower tries streaming again.
    """

    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    multiplier: float = 2.0
    max_attempts: int | None = DEFAULT_MAX_ATTEMPTS
    max_elapsed: float | None = DEFAULT_MAX_ELAPSED
    fallback_after: int = DEFAULT_FALLBACK_AFTER
    probe_interval: float = DEFAULT_PROBE_INTERVAL

    def __post_init__(self) -> None:
        self.backoff  # noqa: B018  (Backoff checks the delays and the budget)
        if self.fallback_after < 0 or self.probe_interval <= 0:
            raise ValueError("fallback_after must be >= 0 and probe_interval > 0")

    @property
    def backoff(self) -> Backoff:
        """The waits and the budget, as the shared :class:`~runstream.core.backoff.Backoff`."""
        return Backoff(
            self.base_delay, self.max_delay, self.multiplier, self.max_attempts, self.max_elapsed
        )

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the jittered wait before retry number ``attempt`` (1-based)."""
        return self.backoff.ceiling(attempt)


@dataclass(frozen=True, slots=True)
class Retry:
    """Wait ``delay`` seconds, then make attempt ``attempt`` of this outage in ``mode``."""

    delay: float
    mode: Mode
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The outage budget is spent; ``message`` says which bound was hit."""

    reason: str
    attempts: int
    elapsed: float
    message: str


Decision: TypeAlias = Retry | GiveUp


class ReconnectState:
    """Sans-I/O reconnect/backoff/fallback state of one follower.

    The caller reports every outcome through the ``on_*`` methods with the
    current monotonic time and obeys the returned :class:`Retry` /
    :class:`GiveUp`. ``mode`` is what the next attempt should use.
    ``rand`` is injectable for tests (a ``random.uniform``-like function).
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        mode: Mode = "stream",
        allow_fallback: bool = True,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.mode: Mode = mode
        self.allow_fallback = allow_fallback
        self._outage = BackoffState(self.policy.backoff, rand=rand)
        """The waits and the budget of the current outage (the shared decision object)."""
        self.stream_failures = 0
        """Consecutive streaming attempts that ended without a real event."""
        self.server_floor = 0.0
        """Seconds from the server's last ``retry:`` field."""
        self.next_probe: float | None = None
        self.sse_unavailable = False

    @property
    def attempt(self) -> int:
        """Failures in the current outage (0 = healthy)."""
        return self._outage.attempt

    # -- inputs --------------------------------------------------------------

    def on_server_retry(self, milliseconds: int) -> None:
        """The server sent ``retry: <ms>``: it becomes the floor of every wait."""
        self.server_floor = max(0, milliseconds) / 1000.0

    def on_open(self) -> None:
        """A connection was accepted. Deliberately resets nothing (see module doc)."""

    def on_event(self) -> None:
        """A real event was delivered: the outage, if any, is over."""
        self._outage.on_success()
        if self.mode == "stream":
            self.stream_failures = 0

    def on_poll_ok(self, now: float) -> Mode:
        """A long-poll answered normally (with or without events).

        The server is reachable, so the outage is over. Returns the mode for the
        next request: ``"stream"`` when it is time to probe streaming again.
        """
        self._outage.on_success()
        if self.next_probe is None:
            self.next_probe = now + self.policy.probe_interval
        # Probing is part of the fallback; a poll-only follower never streams.
        if self.allow_fallback and not self.sse_unavailable and now >= self.next_probe:
            self.mode = "stream"
            self.next_probe = now + self.policy.probe_interval
        return self.mode

    def on_sse_unavailable(self, now: float) -> Decision:
        """The server cannot stream (e.g. 406): poll from now on, without delay."""
        self.sse_unavailable = True
        self.mode = "poll"
        self.next_probe = None
        return Retry(0.0, "poll", self.attempt, "sse_unavailable")

    def on_failure(self, reason: str, now: float, *, retry_after: float | None = None) -> Decision:
        """An attempt failed (network error, 5xx/429, watchdog, EOF before the end, ...).

        ``retry_after`` (seconds, from a 429/503 ``Retry-After``) raises the
        floor of this one wait.
        """
        was_probe = self.mode == "stream" and self.stream_failures >= self._fallback_threshold()
        if self.mode == "stream":
            self.stream_failures += 1
        if was_probe and self.allow_fallback:
            # A failed probe while polling works is not part of any outage.
            self.mode = "poll"
            self.next_probe = now + self.policy.probe_interval
            return Retry(0.0, "poll", self.attempt, reason)
        floor = max(self.server_floor, retry_after or 0.0)
        decision = self._outage.on_failure(reason, now, floor=floor)
        if isinstance(decision, CoreGiveUp):
            retries = decision.attempts - 1
            if decision.bound == "attempts":
                message = (
                    f"gave up after {retries} failed attempts in {decision.elapsed:.1f}s "
                    f"(last failure: {reason})"
                )
            else:
                message = (
                    f"gave up: outage of {decision.elapsed:.1f}s would exceed the "
                    f"{self.policy.max_elapsed:g}s budget after {retries} retries "
                    f"(last failure: {reason})"
                )
            return GiveUp(reason, retries, decision.elapsed, message)
        delay = decision.delay
        p = self.policy
        if (
            self.mode == "stream"
            and self.allow_fallback
            and self._fallback_threshold() > 0
            and self.stream_failures >= self._fallback_threshold()
        ):
            self.mode = "poll"
            self.next_probe = now + delay + p.probe_interval
        return Retry(delay, self.mode, self.attempt, reason)

    def _fallback_threshold(self) -> int:
        if not self.allow_fallback or self.policy.fallback_after == 0:
            return 1 << 62
        return self.policy.fallback_after
