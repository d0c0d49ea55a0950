"""When to try again after a failure, without I/O.

:class:`BackoffState` is fed what happened (an attempt failed, and when; an
attempt succeeded) and answers what to do next: wait this long and retry, or
give up. It never sleeps, so every rule is tested with a fake clock; the
caller does the waiting (usually interruptibly, on its stop event)::

    state = BackoffState(RECONNECT)
    while not stop.is_set():
        try:
            await connect()
        except BackendUnavailable as exc:
            decision = state.on_failure(str(exc), time.monotonic())
            if isinstance(decision, GiveUp):
                raise
            await wait(stop, decision.delay)
        else:
            state.on_success()

The rules (the same as the SDK's reconnect policy):

* **Full jitter, capped.** The n-th consecutive failure waits a uniform random
  time in ``[0, min(max_delay, base_delay * multiplier ** (n - 1))]``.
* **Reset only on success**, which the caller reports when the thing it
  retries really worked (a subscription confirmed, a delivered item), not
  when a connection was merely opened.
* **A budget per outage**: after ``max_attempts`` failures, or when the next
  wait would end more than ``max_elapsed`` seconds after the outage's first
  failure, the answer is :class:`GiveUp`. ``None`` removes a bound.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = ["RECONNECT", "Backoff", "BackoffState", "Decision", "GiveUp", "Retry"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait between attempts, and for how long to keep trying.

    ``max_attempts`` is the number of retries per outage (the failure after
    the last retry gives up); ``max_elapsed`` bounds an outage in seconds.
    """

    base_delay: float = 0.05
    max_delay: float = 2.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    max_elapsed: float | None = None

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 or None")
        if self.max_elapsed is not None and self.max_elapsed <= 0:
            raise ValueError("max_elapsed must be > 0 or None")

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the jittered wait after failure number ``attempt`` (1-based)."""
        if attempt < 1:
            return 0.0
        exp = min(attempt - 1, 64)  # huge attempt counts must not overflow a float
        return float(min(self.max_delay, self.base_delay * self.multiplier**exp))


RECONNECT = Backoff()
"""Retry a Redis connection (or a command while Redis is away) forever: waits of at
most 0.05 s, 0.1 s, 0.2 s, ... up to 2 s."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Wait ``delay`` seconds, then make attempt ``attempt + 1`` of this outage."""

    delay: float
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The outage's budget is spent; ``bound`` and ``message`` say which bound was hit.

    ``attempts`` counts the failures of the outage, the last one included.
    """

    reason: str
    attempts: int
    elapsed: float
    message: str
    bound: Literal["attempts", "elapsed"] = "attempts"


Decision: TypeAlias = Retry | GiveUp


class BackoffState:
    """The failures of the current outage, and what they mean for the next attempt.

    ``rand`` is injectable for tests (a ``random.uniform``-like function).
    """

    def __init__(
        self,
        policy: Backoff = RECONNECT,
        *,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.policy = policy
        self._rand = rand
        self.attempt = 0
        """Failures in the current outage (0 = healthy)."""
        self.outage_started: float | None = None

    def on_success(self) -> None:
        """What was retried worked: the outage, if any, is over."""
        self.attempt = 0
        self.outage_started = None

    def on_failure(self, reason: str, now: float, *, floor: float = 0.0) -> Decision:
        """An attempt failed at monotonic time ``now``: retry after a delay, or give up.

        ``floor`` is the shortest wait the other side asked for (an SSE ``retry:``,
        a ``Retry-After``); the jittered wait is raised to it.
        """
        if self.outage_started is None:
            self.outage_started = now
        self.attempt += 1
        elapsed = now - self.outage_started
        p = self.policy
        if p.max_attempts is not None and self.attempt > p.max_attempts:
            return GiveUp(
                reason,
                self.attempt,
                elapsed,
                f"gave up after {self.attempt} failed attempts in {elapsed:.1f}s "
                f"(last failure: {reason})",
            )
        delay = max(floor, self._rand(0.0, p.ceiling(self.attempt)))
        if p.max_elapsed is not None and elapsed + delay > p.max_elapsed:
            return GiveUp(
                reason,
                self.attempt,
                elapsed,
                f"gave up: an outage of {elapsed:.1f}s would exceed the {p.max_elapsed:g}s "
                f"budget (last failure: {reason})",
                bound="elapsed",
            )
        return Retry(delay, self.attempt, reason)

    def retry_after(self, reason: str, now: float) -> float:
        """:meth:`on_failure` for a loop that retries forever: the seconds to wait.

        Only for a policy without a budget (like :data:`RECONNECT`); raises
        ValueError if the policy has one and it is spent.
        """
        decision = self.on_failure(reason, now)
        if isinstance(decision, GiveUp):
            raise ValueError(f"retry_after() needs a policy without a budget: {decision.message}")
        return decision.delay
