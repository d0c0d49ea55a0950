"""The shared contract suite, unchanged, against a three-node Redis Cluster (``?cluster=1``).

The suite's tests are imported from test_contract.py, and its ``log`` /
``backend_url`` fixtures are overridden here to point at a private cluster
this module starts (three primaries on free ports, AOF on, fsync always).
A few cluster-only checks follow: streams really land on different nodes,
and a follower is woken across nodes.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry

from runstream.backends import EventLog, open_backend
from runstream.backends.redis.log import RedisEventLog
from runstream.core.model import Event, NewEvent
from tests.backends.test_contract import *  # noqa: F403  (the contract tests, collected again here)

pytestmark = pytest.mark.redis

NODES = 3


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20_000, 45_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _cluster_ok(cli: str, port: int) -> bool:
    out = subprocess.run(
        [cli, "-p", str(port), "CLUSTER", "INFO"], capture_output=True, text=True, check=False
    ).stdout
    return "cluster_state:ok" in out


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a private three-primary cluster, torn down after the module."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server / redis-cli not installed")
    ports = [_free_port() for _ in range(NODES)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            directory = tmp_path_factory.mktemp(f"cluster{port}")
            # fmt: off
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "yes",
                 "--appendfsync", "always", "--logfile", str(directory / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            # fmt: on
        deadline = time.monotonic() + 15
        # Polling child processes for readiness: there is no event to await.
        while not all(_ping(p) for p in ports):
            assert time.monotonic() < deadline, "cluster nodes did not start"
            time.sleep(0.02)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        while not all(_cluster_ok(cli, p) for p in ports):
            assert time.monotonic() < deadline + 30, "cluster did not converge"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=1"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def backend_url(redis_cluster: str) -> str:  # overrides the parametrised one for this module
    return f"{redis_cluster}&prefix=c{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def log(backend_url: str) -> AsyncIterator[EventLog]:
    async with open_backend(backend_url) as backend:
        yield backend


async def test_cluster_url_selects_the_cluster_client(backend_url: str) -> None:
    backend = RedisEventLog.from_url(backend_url)
    assert backend.options.cluster
    assert backend.connection_pool is None
    await backend.aclose()


async def test_cluster_client_never_resends_a_command(backend_url: str) -> None:
    # A timed-out append script may have run: the client must not retry it by itself,
    # and the policy must be the asyncio one (a sync Retry is silently replaced).
    backend = RedisEventLog.from_url(backend_url)
    client = backend._redis
    assert isinstance(client, RedisCluster)
    assert isinstance(client.retry, AsyncRetry)
    assert client.retry.get_retries() == 0
    await backend.aclose()


async def test_streams_spread_over_nodes_and_keep_their_keys_together(log: EventLog) -> None:
    assert isinstance(log, RedisEventLog)
    names = [f"run-{i}" for i in range(12)]
    for name in names:
        await log.append(name, NewEvent("n", {"name": name}), producer=None)
        await log.close(name, "succeeded")
    client = log._redis
    assert isinstance(client, RedisCluster)
    owners: set[str] = set()
    for name in names:
        nodes = set()
        for key in log.keys(name):
            node = client.get_node_from_key(key)
            assert node is not None
            nodes.add(node.name)
        assert len(nodes) == 1
        owners |= nodes
    assert len(owners) > 1, "all test streams hashed to one node; pick other names"
    listed = await log.list_streams(prefix="run-")
    assert [i.name for i in listed] == sorted(names)


async def test_follower_is_woken_by_a_write_on_another_node(
    backend_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        RedisEventLog.from_url(backend_url) as reader,
        RedisEventLog.from_url(backend_url) as writer,
    ):
        reader.safety_poll = 60  # only the wake-up can deliver in time
        waiting = asyncio.Event()
        real_read = reader._shared_read

        async def spy_read(
            stream: str, after: int, limit: int, max_bytes: int | None = None
        ) -> Any:
            result = await real_read(stream, after, limit, max_bytes)
            if limit and not result[1]:
                waiting.set()
            return result

        monkeypatch.setattr(reader, "_shared_read", spy_read)
        for i in range(8):  # several streams, so the writes hit nodes other than the reader's
            name = f"s{i}"
            await writer.append(name, NewEvent("n", 0))
            waiting.clear()
            follower = reader.follow(name, after=1)
            pending = asyncio.ensure_future(anext(follower))
            # Write only once the follower has read, found nothing and gone to wait.
            await asyncio.wait_for(waiting.wait(), 10)
            await writer.append(name, NewEvent("n", 1))
            item = await asyncio.wait_for(pending, 10)
            assert isinstance(item, Event)
            assert item.id == 2
            await follower.aclose()  # type: ignore[attr-defined]
