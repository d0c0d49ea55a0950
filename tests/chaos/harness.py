"""The chaos harness: a paced publisher, six kinds of subscriber, timed resets, a verdict.

Pieces, each usable on its own:

* :class:`ChaosProxy` — :class:`tests.client.faultproxy.FaultProxy` plus a timer
  that aborts one live client connection with a TCP RST every 50-500 ms
  (uniformly random), recording when. Each subscriber gets its own proxy, so a
  fault is attributed to exactly one subscriber and its recovery time is
  measurable.
* :class:`Publisher` — appends numbered events ``{"i": k}`` in random batches
  over HTTP with ``Producer-Id``/``Producer-Seq``, through its own proxy that
  breaks some requests (dropped before the server saw them, or answered and
  then reset). An unacknowledged append is retried with the *same* seq until a
  201 arrives, so the server must deduplicate; acknowledged = got a 201.
* Subscribers: :class:`RawSSE` (``Last-Event-ID`` resume, as a browser's
  ``EventSource`` does, with the decoder's state carried over), :class:`WebSocketSub`
  (``?after=<epoch>:<id>``), :class:`LongPoll` (JSON ``?after=&wait=``) and
  :class:`SDKFollow` (``AsyncClient.follow``, once per SDK transport: ``auto``,
  ``ws``, ``poll``). Raw clients do *no* de-duplication
  of their own: what they record is exactly what the server sent after resume.
* :func:`verdict` — lost / duplicated / reordered / id mismatches of one
  subscriber's deliveries against the acknowledged events, and recovery times
  (fault → next delivered event).
* :class:`ServeProcess` — a real ``runstream serve`` subprocess that can be
  ``kill -9``-ed and restarted on the same port and backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from runstream.client import AsyncClient, FollowOptions, RetryPolicy
from runstream.core.model import END_TYPE, HEARTBEAT_TYPE, Event, Reset
from runstream.protocol.sse import SSEDecoder, SSEMessage, reconnect_headers
from tests.client.faultproxy import FaultProxy, random_plan
from tests.conftest import free_port

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "chaos"

EVENTS_ENV = "RUNSTREAM_CHAOS_EVENTS"
DEFAULT_EVENTS = 10_000
SECONDS_ENV = "RUNSTREAM_CHAOS_SECONDS"
DEFAULT_SECONDS = 8.0
"""How long the publisher spreads its appends over (the faults need time to happen)."""
APPENDS_PER_SECOND = 60
RESET_INTERVAL = (0.05, 0.5)
SERVER_RETRY_MS = 100
"""The SSE ``retry:`` the chaos servers send: how long a browser waits before reconnecting."""
DEADLINE = 90.0
"""Budget for one append to be acknowledged, or one subscriber to reach the end, under faults."""


def chaos_events() -> int:
    return int(os.environ.get(EVENTS_ENV, DEFAULT_EVENTS))


def chaos_seconds() -> float:
    return float(os.environ.get(SECONDS_ENV, DEFAULT_SECONDS))


def chaos_deadline() -> float:
    """Budget for one subscriber to reach the end: grows with the size (100,000: 200 s)."""
    return max(DEADLINE, chaos_events() / 500)


def chaos_timeout() -> int:
    """pytest timeout for one scenario at the configured size."""
    return int(max(240, 2 * chaos_deadline()))


# -- the proxy ------------------------------------------------------------------------


class ChaosProxy(FaultProxy):
    """A fault proxy that also resets a random live client connection every 50-500 ms.

    ``fault_times`` holds the ``time.monotonic()`` of every timed reset;
    ``injected["timed_reset"]`` counts them. Faults from :attr:`plan` (per
    connection, on the response bytes) are counted in ``injected`` too.
    """

    def __init__(
        self,
        port: int,
        *,
        seed: int,
        interval: tuple[float, float] = RESET_INTERVAL,
    ) -> None:
        super().__init__("127.0.0.1", port, seed=seed)
        self.interval = interval
        self.clients: set[asyncio.StreamWriter] = set()
        self.fault_times: list[float] = []
        self._chaos: asyncio.Task[None] | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.add(writer)
        try:
            await super()._accept(reader, writer)
        finally:
            self.clients.discard(writer)

    def start_chaos(self) -> None:
        self._chaos = asyncio.create_task(self._chaos_loop())

    async def stop_chaos(self) -> None:
        if self._chaos is not None:
            self._chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._chaos
            self._chaos = None

    async def aclose(self) -> None:
        await self.stop_chaos()
        await super().aclose()

    def reset_one(self) -> bool:
        """Abort one live client connection with an RST; False if none is open."""
        live = [w for w in self.clients if not w.transport.is_closing()]
        if not live:
            return False
        writer = self.rng.choice(live)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self.injected["timed_reset"] += 1
        self.fault_times.append(time.monotonic())
        return True

    async def _chaos_loop(self) -> None:
        while True:
            # The workload's fault schedule, not a stand-in for synchronisation.
            await asyncio.sleep(self.rng.uniform(*self.interval))
            self.reset_one()


# -- the publisher ---------------------------------------------------------------------


@dataclass
class Publisher:
    """Appends ``total`` numbered events to ``stream`` over about ``seconds`` seconds.

    ``acked`` maps each event number to the id its 201 answer gave. Call
    :meth:`reached` to wait until a fraction of the events is acknowledged.
    """

    url: str
    stream: str
    total: int
    seconds: float
    rng: random.Random
    producer_id: str = "chaos-publisher"
    acked: dict[int, int] = field(default_factory=dict)
    epoch: str | None = None
    appends: int = 0
    attempts: int = 0
    retries_by_reason: Counter[str] = field(default_factory=Counter)
    duplicates_answered: int = 0
    first_ack: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def mean_batch(self) -> int:
        return max(1, round(self.total / (self.seconds * APPENDS_PER_SECOND)))

    async def reached(self, fraction: float) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: len(self.acked) >= self.total * fraction)

    async def run(self) -> None:
        # No keep-alive: every append is a new connection, so the proxy's per-connection
        # fault plan can hit any of them.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.url, timeout=10, limits=limits) as http:
            interval = self.seconds * self.mean_batch / self.total
            loop = asyncio.get_running_loop()
            start = loop.time()
            seq, i = 0, 0
            while i < self.total:
                n = min(self.rng.randint(1, 2 * self.mean_batch - 1), self.total - i)
                seq += 1
                body = [{"type": "tick", "data": {"i": k}} for k in range(i, i + n)]
                answer = await self._until_acked(
                    http,
                    "POST",
                    f"/v1/streams/{self.stream}/events",
                    body,
                    {"Producer-Id": self.producer_id, "Producer-Seq": str(seq)},
                )
                self.appends += 1
                first, last = int(answer["first_id"]), int(answer["last_id"])
                assert last - first + 1 == n, answer
                if self.epoch is None:
                    self.epoch = str(answer["epoch"])
                assert answer["epoch"] == self.epoch, "the epoch changed under the publisher"
                if answer.get("duplicate"):
                    self.duplicates_answered += 1
                async with self._progress:
                    for k in range(n):
                        self.acked[i + k] = first + k
                    self._progress.notify_all()
                self.first_ack.set()
                i += n
                # Pacing: the workload's rate, so faults land throughout the stream.
                delay = start + self.appends * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self._until_acked(
                http, "POST", f"/v1/streams/{self.stream}/close", {"status": "done"}, {}
            )
            self.closed = True

    async def _until_acked(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
    ) -> dict[str, Any]:
        """Send until a 2xx answer: the same body and producer seq on every retry."""
        deadline = time.monotonic() + DEADLINE
        delay = 0.02
        while True:
            self.attempts += 1
            try:
                resp = await http.request(method, path, json=body, headers=headers)
            except httpx.TransportError as exc:
                reason = type(exc).__name__
            else:
                if resp.status_code < 300:
                    answer: dict[str, Any] = resp.json()
                    return answer
                assert resp.status_code >= 500 or resp.status_code == 429, resp.text
                reason = f"http_{resp.status_code}"
            self.retries_by_reason[reason] += 1
            assert time.monotonic() < deadline, f"{path} not acknowledged in {DEADLINE}s"
            await asyncio.sleep(delay)  # backoff between retries of one request
            delay = min(delay * 2, 0.5)

    def report(self, proxy: FaultProxy) -> dict[str, Any]:
        return {
            "appends": self.appends,
            "attempts": self.attempts,
            "retries": dict(self.retries_by_reason),
            "duplicate_answers": self.duplicates_answered,
            "faults": dict(proxy.injected),
        }


def publisher_plan(rng: random.Random) -> Callable[[bytes], Any]:
    """Break 8% of the publisher's requests: dropped unseen, or answered then cut."""
    return random_plan(rng, fault_rate=0.08, kinds=("accept_close", "reset", "truncate"), max_at=40)


# -- subscribers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    type: str
    data: Any
    at: float


class Subscriber:
    """Base: records deliveries (id, type, data, monotonic time) until the end entry."""

    kind = "base"

    def __init__(
        self, base_url: str, stream: str, *, headers: dict[str, str], run: bool = False
    ) -> None:
        self.base_url = base_url
        self.stream = stream
        self.run_stream = run
        prefix = f"/v1/runs/{stream}" if run else f"/v1/streams/{stream}"
        self.path = f"{prefix}/events"
        self.ws_path = f"{prefix}/ws"
        self.headers = headers
        self.delivered: list[Delivery] = []
        self.resets: list[Any] = []
        self.connects = 0
        self.errors: Counter[str] = Counter()
        self.end: Delivery | None = None
        self.epoch: str | None = None
        self._changed = asyncio.Condition()

    @property
    def done(self) -> bool:
        return self.end is not None

    async def record(self, id_: int, type_: str, data: Any) -> None:
        item = Delivery(id_, type_, data, time.monotonic())
        if type_ == END_TYPE:
            self.end = item
        else:
            self.delivered.append(item)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Subscriber], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def run(self) -> None:
        raise NotImplementedError

    async def run_until_end(self, within: float | None = None) -> None:
        async with asyncio.timeout(within if within is not None else chaos_deadline()):
            await self.run()
        assert self.done


def _parse_sse_id(raw: str) -> tuple[str | None, int]:
    epoch, sep, offset = raw.rpartition(":")
    return (epoch if sep else None), int(offset)


class RawSSE(Subscriber):
    """An ``EventSource``-like reader: one decoder across connections, ``Last-Event-ID`` resume.

    Unlike a browser it also reconnects after a 5xx (a page would re-create its
    EventSource); it waits the server's ``retry:`` between attempts.
    """

    kind = "sse"

    async def run(self) -> None:
        decoder = SSEDecoder()
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(10, read=30)
        ) as http:
            while not self.done:
                headers = {
                    "Accept": "text/event-stream",
                    **self.headers,
                    **reconnect_headers(decoder.last_event_id),
                }
                try:
                    async with http.stream("GET", self.path, headers=headers) as resp:
                        if resp.status_code == 204:
                            return
                        if resp.status_code != 200:
                            self.errors[f"http_{resp.status_code}"] += 1
                        else:
                            self.connects += 1
                            async for chunk in resp.aiter_raw():
                                for msg in decoder.feed(chunk):
                                    await self._on(msg)
                                if self.done:
                                    return
                            for msg in decoder.close():
                                await self._on(msg)
                except httpx.TransportError as exc:
                    self.errors[type(exc).__name__] += 1
                    decoder.close()  # an event cut off by the reset is discarded, as specified
                await asyncio.sleep((decoder.retry or SERVER_RETRY_MS) / 1000)

    async def _on(self, msg: SSEMessage) -> None:
        epoch, offset = _parse_sse_id(msg.id)
        if msg.event == "reset":
            self.resets.append(json.loads(msg.data))
            return
        self.epoch = epoch
        await self.record(offset, msg.event, json.loads(msg.data))


class WebSocketSub(Subscriber):
    """WebSocket reader resuming with ``?after=<epoch>:<last id>``."""

    kind = "ws"

    async def run(self) -> None:
        ws_base = self.base_url.replace("http://", "ws://", 1)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as http:
            while not self.done:
                try:
                    if self.epoch is None:
                        # The epoch makes the resume position exact across a re-created stream.
                        info = await http.get(f"/v1/streams/{self.stream}", headers=self.headers)
                        if info.status_code != 200:
                            self.errors[f"info_{info.status_code}"] += 1
                            await asyncio.sleep(0.1)
                            continue
                        self.epoch = str(info.json()["epoch"])
                    last = self.delivered[-1].id if self.delivered else 0
                    url = f"{ws_base}{self.ws_path}?after={self.epoch}:{last}"
                    async with ws_connect(
                        url,
                        additional_headers=self.headers,
                        open_timeout=10,
                        close_timeout=1,
                        ping_interval=None,
                    ) as ws:
                        self.connects += 1
                        async for raw in ws:
                            msg = json.loads(raw)
                            if "id" not in msg and msg["type"] == HEARTBEAT_TYPE:
                                continue
                            if msg["type"] == "reset":
                                self.resets.append(msg["data"])
                                continue
                            await self.record(int(msg["id"]), msg["type"], msg["data"])
                            if self.done:
                                return
                except (OSError, httpx.TransportError, websockets.WebSocketException) as exc:
                    self.errors[type(exc).__name__] += 1
                except TimeoutError:
                    self.errors["open_timeout"] += 1
                await asyncio.sleep(SERVER_RETRY_MS / 1000)


class LongPoll(Subscriber):
    """JSON long-poll reader: ``?after=<epoch>:<next_after>&wait=5``."""

    kind = "longpoll"

    async def run(self) -> None:
        after = "0"
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(10, read=30)
        ) as http:
            while not self.done:
                try:
                    self.connects += 1
                    resp = await http.get(
                        self.path,
                        params={"after": after, "limit": "500", "wait": "5"},
                        headers={"Accept": "application/json", **self.headers},
                    )
                except httpx.TransportError as exc:
                    self.errors[type(exc).__name__] += 1
                    await asyncio.sleep(SERVER_RETRY_MS / 1000)
                    continue
                if resp.status_code == 410:
                    self.resets.append(resp.json())
                    return
                if resp.status_code != 200:
                    self.errors[f"http_{resp.status_code}"] += 1
                    await asyncio.sleep(SERVER_RETRY_MS / 1000)
                    continue
                page = resp.json()
                self.epoch = str(page["epoch"])
                for e in page["events"]:
                    await self.record(int(e["id"]), e["type"], e["data"])
                after = f"{page['epoch']}:{page['next_after']}"


class SDKFollow(Subscriber):
    """``AsyncClient.follow`` with short backoff (so recoveries are measured, not waited out).

    ``transport`` is the follower's (``auto``: SSE with the long-poll fallback).
    """

    kind = "sdk"
    transport = "auto"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reconnects: Counter[str] = Counter()

    async def run(self) -> None:
        options = FollowOptions(
            first_event=15,
            idle=15,
            retry=RetryPolicy(
                base_delay=0.05,
                max_delay=0.5,
                max_attempts=None,
                max_elapsed=DEADLINE,
                fallback_after=3,
                probe_interval=2,
            ),
            transport=self.transport,  # type: ignore[arg-type]
        )
        async with AsyncClient(
            self.base_url, headers=self.headers, follow_options=options
        ) as client:
            follower = client.follow(self.stream, run=self.run_stream)
            async with follower:
                async for item in follower:
                    if isinstance(item, Reset):
                        self.resets.append(item)
                        continue
                    assert isinstance(item, Event)
                    self.epoch = follower.epoch
                    await self.record(item.id, item.type, item.data)
            self.reconnects = Counter(follower.metrics.reconnects)
            self.connects = sum(self.reconnects.values()) + 1


class SDKFollowWS(SDKFollow):
    kind = "sdk_ws"
    transport = "ws"


class SDKFollowPoll(SDKFollow):
    kind = "sdk_poll"
    transport = "poll"


SUBSCRIBER_KINDS: tuple[type[Subscriber], ...] = (
    RawSSE,
    WebSocketSub,
    LongPoll,
    SDKFollow,
    SDKFollowWS,
    SDKFollowPoll,
)


# -- verdict ---------------------------------------------------------------------------


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "max": None}
    return {"p50": round(statistics.median(values), 4), "max": round(max(values), 4)}


def recovery_times(fault_times: Sequence[float], deliveries: Sequence[Delivery]) -> list[float]:
    """For each fault, the time until the next delivery after it (faults after the last: none)."""
    times = [d.at for d in deliveries]
    out: list[float] = []
    j = 0
    for fault in sorted(fault_times):
        while j < len(times) and times[j] < fault:
            j += 1
        if j < len(times):
            out.append(times[j] - fault)
    return out


def verdict(
    expected: Sequence[tuple[int, Any]],
    deliveries: Sequence[Delivery],
    key: Callable[[Delivery], Any],
) -> dict[str, int]:
    """Compare deliveries with the acknowledged events ``[(id, key), ...]`` in log order.

    * ``lost`` — acknowledged keys never delivered;
    * ``duplicated`` — deliveries beyond the first of a key;
    * ``reordered`` — deliveries whose position in the acknowledged order is
      below that of an earlier delivery (a duplicate counts only as duplicated);
    * ``id_mismatch`` — deliveries whose id is not the id acknowledged for the key;
    * ``unexpected`` — deliveries of a key nobody acknowledged.
    """
    order = {k: n for n, (_, k) in enumerate(expected)}
    ids = {k: i for i, k in expected}
    counts: Counter[Any] = Counter()
    reordered = mismatch = unexpected = 0
    high = -1
    for d in deliveries:
        k = key(d)
        counts[k] += 1
        if k not in order:
            unexpected += 1
            continue
        if ids[k] != d.id:
            mismatch += 1
        if counts[k] > 1:
            continue
        if order[k] < high:
            reordered += 1
        high = max(high, order[k])
    return {
        "delivered": len(deliveries),
        "lost": sum(1 for _, k in expected if counts[k] == 0),
        "duplicated": sum(c - 1 for c in counts.values() if c > 1),
        "reordered": reordered,
        "id_mismatch": mismatch,
        "unexpected": unexpected,
    }


def subscriber_report(
    sub: Subscriber,
    proxy: ChaosProxy,
    expected: Sequence[tuple[int, Any]],
    key: Callable[[Delivery], Any],
) -> dict[str, Any]:
    report: dict[str, Any] = verdict(expected, sub.delivered, key)
    recoveries = recovery_times(proxy.fault_times, sub.delivered)
    report.update(
        faults=proxy.faults_injected,
        connections=proxy.connections,
        errors=dict(sub.errors),
        resets=len(sub.resets),
        ended=sub.done,
        recovery_s=_quantiles(recoveries),
    )
    if isinstance(sub, SDKFollow):
        report["reconnects"] = dict(sub.reconnects)
    report["_recoveries"] = recoveries  # pooled by summarize(), kept out of the JSON
    return report


def summarize(
    scenario: str,
    subscribers: dict[str, dict[str, Any]],
    *,
    events: int,
    extra: dict[str, Any],
    fault_recoveries: Sequence[float] = (),
) -> dict[str, Any]:
    """The scenario's JSON line: totals over subscribers, then the details."""
    pooled = [t for r in subscribers.values() for t in r.pop("_recoveries", [])]
    summary: dict[str, Any] = {
        "scenario": scenario,
        "events": events,
        "subscribers": len(subscribers),
        "faults_injected": sum(r["faults"] for r in subscribers.values()),
        "lost": sum(r["lost"] for r in subscribers.values()),
        "duplicated": sum(r["duplicated"] for r in subscribers.values()),
        "reordered": sum(r["reordered"] for r in subscribers.values()),
        "id_mismatch": sum(r["id_mismatch"] for r in subscribers.values()),
        "resets": sum(r["resets"] for r in subscribers.values()),
        "recovery_s": _quantiles(pooled),
    }
    if fault_recoveries:
        summary["recovery_after_crash_s"] = _quantiles(fault_recoveries)
    summary.update(extra)
    summary["by_subscriber"] = subscribers
    return summary


def emit(summary: dict[str, Any]) -> None:
    """Print the scenario's JSON line (``pytest -s`` shows it) and keep it as an artifact."""
    line = json.dumps(summary, sort_keys=False)
    print(line)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{summary['scenario']}.json").write_text(line + "\n")


def assert_clean(summary: dict[str, Any]) -> None:
    problems = {
        name: {k: r[k] for k in ("lost", "duplicated", "reordered", "id_mismatch", "unexpected")}
        for name, r in summary["by_subscriber"].items()
        if any(r[k] for k in ("lost", "duplicated", "reordered", "id_mismatch", "unexpected"))
        or r["resets"]
        or not r["ended"]
    }
    assert not problems, json.dumps(problems)
    assert summary["lost"] == summary["duplicated"] == summary["reordered"] == 0


# -- processes -------------------------------------------------------------------------


def _spawn(args: list[str], log: Any, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd
    )


@dataclass
class ServeProcess:
    """``runstream serve`` in a subprocess on a fixed port; ``kill()`` is a ``kill -9``."""

    backend: str
    directory: Path
    port: int = field(default_factory=free_port)
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> float:
        """Start and wait until ``/readyz`` answers 200; returns how long that took."""
        args = [PY, "-m", "runstream.cli.main", "serve", "--backend", self.backend]
        args += ["--port", str(self.port), "--workers", "0"]
        if self.config is not None:
            args += ["--config", str(self.config)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
        env.update(
            RUNSTREAM_RETRY_MS=str(SERVER_RETRY_MS),
            RUNSTREAM_KEEPALIVE="1",
            RUNSTREAM_LOG_LEVEL="warning",
            PYTHONUNBUFFERED="1",
        )
        self.starts += 1
        log = (self.directory / f"serve-{self.starts}.log").open("wb")
        started = time.monotonic()
        proc = await asyncio.to_thread(_spawn, args, log, env, self.directory)
        self.proc = proc
        log.close()
        deadline = started + 45
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            while True:  # a child process's readiness: nothing to await but its port
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/readyz")).status_code == 200:
                        return time.monotonic() - started
                assert proc.poll() is None, self.log_text()
                assert time.monotonic() < deadline, "server did not start in 45 s"
                await asyncio.sleep(0.05)

    def log_text(self) -> str:
        logs = sorted(self.directory.glob("serve-*.log"))
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, open connections just die."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# -- one scenario ----------------------------------------------------------------------

Disruption = Callable[[Publisher], Any]
"""``async def disrupt(publisher) -> list[float]``: crash something mid-stream, return when."""


async def drive(sub: Subscriber, proxy: ChaosProxy) -> None:
    """Follow to the end through ``proxy`` while it injects connection resets."""
    proxy.start_chaos()
    try:
        await sub.run_until_end()
    finally:
        await proxy.stop_chaos()


async def stream_scenario(
    name: str,
    server_port: int,
    *,
    stream: str,
    seed: int,
    disrupt: Disruption | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish numbered events to ``stream`` while the subscribers follow it under resets.

    ``disrupt`` runs alongside (after the first acknowledged append) and
    returns the monotonic times of the crashes it caused. Returns the summary
    (already emitted); the caller asserts on it.
    """
    rng = random.Random(seed)
    total, seconds = chaos_events(), chaos_seconds()
    pub_proxy = ChaosProxy(server_port, seed=seed)
    pub_proxy.plan = publisher_plan(random.Random(seed + 100))
    await pub_proxy.start()
    publisher = Publisher(pub_proxy.url, stream, total, seconds, rng)
    proxies: dict[str, ChaosProxy] = {}
    subs: dict[str, Subscriber] = {}
    tasks: list[asyncio.Task[Any]] = []
    started = time.monotonic()
    try:
        pub_task = asyncio.create_task(publisher.run())
        await asyncio.wait(
            [pub_task, asyncio.ensure_future(publisher.first_ack.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if pub_task.done():
            pub_task.result()
        for n, kind in enumerate(SUBSCRIBER_KINDS, start=1):
            proxy = ChaosProxy(server_port, seed=seed + n)
            await proxy.start()
            proxies[kind.kind] = proxy
            subs[kind.kind] = kind(proxy.url, stream, headers={"X-Chaos-Subscriber": kind.kind})

        tasks = [asyncio.create_task(drive(subs[k], proxies[k])) for k in subs]
        crash_task = asyncio.create_task(disrupt(publisher)) if disrupt else None
        await pub_task
        crashes: list[float] = await crash_task if crash_task is not None else []
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proxy in (pub_proxy, *proxies.values()):
            await proxy.aclose()
    expected = sorted((id_, i) for i, id_ in publisher.acked.items())
    reports = {
        k: subscriber_report(subs[k], proxies[k], expected, key=lambda d: d.data["i"]) for k in subs
    }
    after_crash = [t for sub in subs.values() for t in recovery_times(crashes, sub.delivered)]
    summary = summarize(
        name,
        reports,
        events=len(publisher.acked),
        fault_recoveries=after_crash,
        extra={
            "duration_s": round(time.monotonic() - started, 2),
            "acknowledged": len(publisher.acked),
            "crashes": len(crashes),
            "publisher": publisher.report(pub_proxy),
            **(extra or {}),
        },
    )
    emit(summary)
    assert publisher.closed and len(publisher.acked) == total
    return summary
