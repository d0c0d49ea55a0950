"""Configuration from the environment: argument > environment > default, 0 turns a timer off."""

from __future__ import annotations

import pytest

from runstream.client._async import DEFAULT_URL, AsyncClient
from runstream.client._sync import Client
from runstream.client.follow import FollowOptions
from runstream.client.policy import RetryPolicy
from runstream.core.model import Event
from runstream.errors import ConfigError

from .conftest import LiveServer
from .faultproxy import Fault, FaultProxy

ALL = {
    "RUNSTREAM_FIRST_EVENT_TIMEOUT": "0",
    "RUNSTREAM_IDLE_TIMEOUT": "12.5",
    "RUNSTREAM_STALE_TIMEOUT": "90",
    "RUNSTREAM_TRANSPORT": "WS",
    "RUNSTREAM_RECONNECT_BASE_DELAY": "0.1",
    "RUNSTREAM_RECONNECT_MAX_DELAY": "3",
    "RUNSTREAM_RECONNECT_MAX_ATTEMPTS": "0",
    "RUNSTREAM_RECONNECT_MAX_ELAPSED": "60",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*ALL, "RUNSTREAM_URL", "RUNSTREAM_SERVER", "RUNSTREAM_TOKEN"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_follow_setting_comes_from_its_variable() -> None:
    options = FollowOptions.from_env(ALL)
    assert (options.first_event, options.idle, options.stale) == (0.0, 12.5, 90.0)
    assert options.transport == "ws"
    assert options.retry == RetryPolicy(
        base_delay=0.1, max_delay=3.0, max_attempts=None, max_elapsed=60.0
    )


def test_unset_or_empty_variables_leave_the_defaults() -> None:
    assert FollowOptions.from_env({}) == FollowOptions()
    assert FollowOptions.from_env(dict.fromkeys(ALL, " ")) == FollowOptions()


def test_zero_removes_a_reconnect_bound() -> None:
    env = {"RUNSTREAM_RECONNECT_MAX_ATTEMPTS": "0", "RUNSTREAM_RECONNECT_MAX_ELAPSED": "0"}
    retry = FollowOptions.from_env(env).retry
    assert retry.max_attempts is None and retry.max_elapsed is None


def test_arguments_win_over_the_environment() -> None:
    options = FollowOptions.from_env(ALL, idle=5.0, retry=RetryPolicy(max_attempts=2))
    assert options.idle == 5.0 and options.stale == 90.0
    assert options.retry == RetryPolicy(max_attempts=2)  # given whole: the variables are ignored


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RUNSTREAM_IDLE_TIMEOUT", "-1"),
        ("RUNSTREAM_IDLE_TIMEOUT", "soon"),
        ("RUNSTREAM_FIRST_EVENT_TIMEOUT", "inf"),
        ("RUNSTREAM_STALE_TIMEOUT", "nan"),
        ("RUNSTREAM_TRANSPORT", "carrier-pigeon"),
        ("RUNSTREAM_RECONNECT_MAX_ATTEMPTS", "2.5"),
        ("RUNSTREAM_RECONNECT_MAX_ATTEMPTS", "-3"),
        ("RUNSTREAM_RECONNECT_BASE_DELAY", "1e400"),
    ],
)
def test_an_invalid_value_is_a_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        FollowOptions.from_env({name: value})


async def test_the_client_reads_url_token_and_follow_options_from_the_environment(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("RUNSTREAM_URL", "http://example.invalid:9/")
    clean_env.setenv("RUNSTREAM_SERVER", "http://other.invalid:9")
    clean_env.setenv("RUNSTREAM_TOKEN", "s3cret")
    clean_env.setenv("RUNSTREAM_STALE_TIMEOUT", "7")
    async with AsyncClient() as client:
        assert client.url == "http://example.invalid:9"
        assert client.auth_headers() == {"Authorization": "Bearer s3cret"}
        assert client.follow_options.stale == 7.0
        # Per call, an argument still wins.
        follower = client.follow("s", stale=0)
        assert follower.options.stale == 0.0
        await follower.aclose()
    async with AsyncClient(
        "http://arg.invalid", token="mine", follow_options=FollowOptions()
    ) as client:
        assert client.url == "http://arg.invalid" and client.token == "mine"
        assert client.follow_options.stale == 0.0


async def test_runstream_server_is_read_when_runstream_url_is_unset(
    clean_env: pytest.MonkeyPatch,
) -> None:
    async with AsyncClient() as client:
        assert client.url == DEFAULT_URL and client.token is None
    clean_env.setenv("RUNSTREAM_SERVER", "http://older.invalid:1")
    async with AsyncClient() as client:
        assert client.url == "http://older.invalid:1"


async def test_an_invalid_variable_fails_at_construction(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RUNSTREAM_IDLE_TIMEOUT", "-5")
    with pytest.raises(ConfigError, match="RUNSTREAM_IDLE_TIMEOUT"):
        AsyncClient("http://x.invalid")


async def test_the_first_event_timeout_from_the_environment_applies_and_zero_turns_it_off(
    live_server: LiveServer, proxy: FaultProxy, clean_env: pytest.MonkeyPatch
) -> None:
    async with AsyncClient(live_server.url) as producer:
        await producer.publish_many("ttfb", [("tick", 1), ("tick", 2)])
        await producer.close_stream("ttfb")
    stalls = 0

    def plan(head: bytes) -> Fault:
        nonlocal stalls
        if b"text/event-stream" in head.lower() and stalls < 1:
            stalls += 1
            return Fault("stall_first")
        return Fault()

    proxy.plan = plan
    clean_env.setenv("RUNSTREAM_URL", proxy.url)
    clean_env.setenv("RUNSTREAM_FIRST_EVENT_TIMEOUT", "0.3")
    clean_env.setenv("RUNSTREAM_IDLE_TIMEOUT", "0")
    async with AsyncClient() as client:
        follower = client.follow("ttfb", transport="sse")
        items = [i async for i in follower]
    assert [i.id for i in items if isinstance(i, Event)] == [1, 2, 3]
    assert follower.metrics.watchdog_kills == {"first_event": 1}
    clean_env.setenv("RUNSTREAM_FIRST_EVENT_TIMEOUT", "0")
    async with AsyncClient() as client:
        assert client.follow_options.first_event == 0.0 and client.follow_options.idle == 0.0


def test_the_sync_client_reads_the_same_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RUNSTREAM_URL", "http://sync.invalid:5")
    clean_env.setenv("RUNSTREAM_TRANSPORT", "poll")
    with Client() as client:
        assert client.aio.url == "http://sync.invalid:5"
        assert client.aio.follow_options.transport == "poll"
