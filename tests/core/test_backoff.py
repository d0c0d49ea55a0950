"""The shared retry decisions, with a fake clock and a fake random source."""

from __future__ import annotations

import pytest

from runstream.core.backoff import RECONNECT, Backoff, BackoffState, GiveUp, Retry


def highest(low: float, high: float) -> float:
    """A 'random' source that always picks the top of the jitter range."""
    return high


def test_waits_grow_exponentially_up_to_the_cap() -> None:
    state = BackoffState(Backoff(base_delay=0.05, max_delay=0.4), rand=highest)
    delays = [state.retry_after("down", now=float(i)) for i in range(6)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]


def test_every_wait_is_drawn_from_zero_to_the_ceiling() -> None:
    ranges: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        ranges.append((low, high))
        return low

    state = BackoffState(RECONNECT, rand=record)
    decisions = [state.on_failure("down", now=0.0) for _ in range(3)]
    assert ranges == [(0.0, 0.05), (0.0, 0.1), (0.0, 0.2)]
    assert decisions == [Retry(0.0, 1, "down"), Retry(0.0, 2, "down"), Retry(0.0, 3, "down")]


def test_real_randomness_stays_within_the_ceiling() -> None:
    state = BackoffState(Backoff(base_delay=1.0, max_delay=8.0))
    for attempt in range(1, 50):
        delay = state.retry_after("down", now=0.0)
        assert 0.0 <= delay <= min(8.0, 2 ** (attempt - 1))


def test_a_success_starts_the_next_outage_from_the_shortest_wait() -> None:
    state = BackoffState(RECONNECT, rand=highest)
    for _ in range(5):
        state.on_failure("down", now=0.0)
    state.on_success()
    assert state.attempt == 0
    assert state.on_failure("down again", now=10.0) == Retry(0.05, 1, "down again")


def test_max_attempts_gives_up_on_the_failure_after_the_last_retry() -> None:
    state = BackoffState(Backoff(max_attempts=2), rand=highest)
    assert isinstance(state.on_failure("a", now=0.0), Retry)
    assert isinstance(state.on_failure("b", now=1.0), Retry)
    decision = state.on_failure("c", now=2.0)
    assert isinstance(decision, GiveUp)
    assert (decision.attempts, decision.elapsed, decision.reason) == (3, 2.0, "c")
    assert "last failure: c" in decision.message


def test_max_elapsed_gives_up_when_the_next_wait_would_end_past_the_budget() -> None:
    state = BackoffState(Backoff(base_delay=1.0, max_delay=1.0, max_elapsed=5.0), rand=highest)
    assert state.on_failure("down", now=100.0) == Retry(1.0, 1, "down")  # the outage starts
    assert isinstance(state.on_failure("down", now=103.5), Retry)  # 3.5 + 1 <= 5
    decision = state.on_failure("down", now=104.5)  # 4.5 + 1 > 5
    assert isinstance(decision, GiveUp)
    assert decision.elapsed == 4.5
    assert "5s budget" in decision.message


def test_retry_after_refuses_a_policy_whose_budget_is_spent() -> None:
    state = BackoffState(Backoff(max_attempts=1))
    state.retry_after("down", now=0.0)
    with pytest.raises(ValueError, match="without a budget"):
        state.retry_after("down", now=0.0)


def test_the_reconnect_policy_never_gives_up() -> None:
    state = BackoffState(RECONNECT)
    for second in range(10_000):
        assert isinstance(state.on_failure("down", now=float(second)), Retry)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_delay": -1.0},
        {"max_delay": -1.0},
        {"multiplier": 0.5},
        {"max_attempts": 0},
        {"max_elapsed": 0.0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]
