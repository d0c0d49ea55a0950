"""The reconnect state machine, driven with a fake clock and no sockets."""

from __future__ import annotations

import random

import pytest

from runstream.client.policy import GiveUp, ReconnectState, Retry, RetryPolicy


def upper(_lo: float, hi: float) -> float:
    """A 'random' source that always picks the ceiling: makes the bounds visible."""
    return hi


def test_backoff_ceiling_grows_exponentially_then_caps() -> None:
    p = RetryPolicy(base_delay=0.5, max_delay=4.0, multiplier=2.0)
    assert [p.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert p.ceiling(10_000) == 4.0


def test_full_jitter_delays_stay_within_zero_and_the_ceiling() -> None:
    p = RetryPolicy(base_delay=0.1, max_delay=2.0, max_attempts=None, max_elapsed=None)
    rng = random.Random(7)
    state = ReconnectState(p, allow_fallback=False, rand=rng.uniform)
    delays = []
    for n in range(1, 40):
        d = state.on_failure("network", float(n))
        assert isinstance(d, Retry)
        assert 0.0 <= d.delay <= p.ceiling(n)
        delays.append(d.delay)
    # Jitter really is spread out, not a constant.
    assert len({round(d, 6) for d in delays}) > 30
    assert max(delays) <= 2.0


def test_server_retry_is_a_floor_not_a_ceiling() -> None:
    state = ReconnectState(
        RetryPolicy(base_delay=0.01, max_delay=0.05), allow_fallback=False, rand=upper
    )
    state.on_server_retry(3000)
    d = state.on_failure("eof", 0.0)
    assert isinstance(d, Retry) and d.delay == 3.0


def test_retry_after_of_429_raises_the_floor_of_that_wait() -> None:
    state = ReconnectState(RetryPolicy(base_delay=0.01), allow_fallback=False, rand=upper)
    d = state.on_failure("http_429", 0.0, retry_after=7.0)
    assert isinstance(d, Retry) and d.delay == 7.0
    d = state.on_failure("http_503", 1.0)
    assert isinstance(d, Retry) and d.delay < 1.0


def test_attempts_do_not_reset_on_connect_only_on_a_real_event() -> None:
    p = RetryPolicy(base_delay=1.0, max_delay=100.0, max_attempts=None, max_elapsed=None)
    state = ReconnectState(p, allow_fallback=False, rand=upper)
    # Accept-then-close loop: connects succeed, nothing arrives.
    for n in range(1, 6):
        state.on_open()
        d = state.on_failure("eof", float(n))
        assert isinstance(d, Retry) and d.attempt == n and d.delay == p.ceiling(n)
    state.on_event()
    d = state.on_failure("eof", 10.0)
    assert isinstance(d, Retry) and d.attempt == 1 and d.delay == 1.0


def test_attempt_budget_per_outage_gives_up() -> None:
    state = ReconnectState(
        RetryPolicy(max_attempts=3, max_elapsed=None), allow_fallback=False, rand=upper
    )
    for n in range(3):
        assert isinstance(state.on_failure("network", float(n)), Retry)
    d = state.on_failure("network", 3.0)
    assert isinstance(d, GiveUp)
    assert d.attempts == 3 and "3 failed attempts" in d.message and "network" in d.message


def test_time_budget_per_outage_gives_up_and_a_new_outage_starts_fresh() -> None:
    p = RetryPolicy(base_delay=1.0, max_delay=1.0, max_attempts=None, max_elapsed=10.0)
    state = ReconnectState(p, allow_fallback=False, rand=upper)
    assert isinstance(state.on_failure("network", 100.0), Retry)
    assert isinstance(state.on_failure("network", 105.0), Retry)
    d = state.on_failure("network", 109.5)  # 9.5 s in, +1 s wait > 10 s budget
    assert isinstance(d, GiveUp) and "10s budget" in d.message
    state.on_event()
    assert isinstance(state.on_failure("network", 500.0), Retry)


def test_falls_back_to_polling_after_n_streaming_failures() -> None:
    p = RetryPolicy(fallback_after=3, probe_interval=30.0, max_attempts=None, max_elapsed=None)
    state = ReconnectState(p, rand=upper)
    modes = [state.on_failure("network", float(n)) for n in range(3)]
    assert [d.mode for d in modes if isinstance(d, Retry)] == ["stream", "stream", "poll"]
    assert state.mode == "poll"


def test_polling_probes_streaming_again_and_a_failed_probe_costs_no_budget() -> None:
    p = RetryPolicy(fallback_after=2, probe_interval=10.0, max_attempts=3, max_elapsed=None)
    state = ReconnectState(p, rand=upper)
    state.on_failure("network", 0.0)
    state.on_failure("network", 1.0)
    assert state.mode == "poll"
    assert state.on_poll_ok(2.0) == "poll"
    assert state.on_poll_ok(50.0) == "stream"  # probe time
    d = state.on_failure("eof", 50.5)  # the probe failed
    assert isinstance(d, Retry) and d.mode == "poll" and d.delay == 0.0
    assert state.attempt == 0
    # Probe again later; this time it delivers an event: streaming is back.
    assert state.on_poll_ok(61.0) == "stream"
    state.on_open()
    state.on_event()
    assert state.stream_failures == 0
    assert str(state.mode) == "stream"


def test_sse_unavailable_switches_to_polling_for_good() -> None:
    state = ReconnectState(RetryPolicy(probe_interval=1.0))
    d = state.on_sse_unavailable(0.0)
    assert isinstance(d, Retry) and d.mode == "poll"
    assert state.on_poll_ok(100.0) == "poll"


def test_a_poll_only_follower_never_probes_streaming() -> None:
    state = ReconnectState(RetryPolicy(probe_interval=1.0), mode="poll", allow_fallback=False)
    assert state.on_poll_ok(0.0) == "poll"
    assert state.on_poll_ok(100.0) == "poll"


def test_no_fallback_when_disabled() -> None:
    state = ReconnectState(
        RetryPolicy(fallback_after=1, max_attempts=None, max_elapsed=None), allow_fallback=False
    )
    for n in range(5):
        d = state.on_failure("network", float(n))
        assert isinstance(d, Retry) and d.mode == "stream"


@pytest.mark.parametrize(
    "kwargs",
    [{"base_delay": -1}, {"multiplier": 0.5}, {"max_attempts": 0}, {"max_elapsed": 0}],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
