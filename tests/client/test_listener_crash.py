"""A listener process killed with ``kill -9`` mid-stream and restarted from its checkpoint store.

A real subprocess (``crash_listener.py``) runs ``run_forever`` with a SQLite or
file checkpoint store; its handler's side effect is one appended log line per
event. The test kills it (SIGKILL: no cleanup, no final save) twice while the
stream is being produced, restarts it each time, and lets the third run reach
the end. Then, from the log and the checkpoint read right after each kill:

* every event was handled at least once and none was skipped;
* the restarted run handles exactly the events after the saved checkpoint;
* the duplicates are exactly the events the killed run had handled beyond its
  last saved checkpoint. They come from two windows: events that finished
  while an earlier one was still running (the checkpoint stops at the first
  unfinished event), and events settled while the latest position was still
  being written (saves are coalesced, one at a time).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from runstream.client._async import AsyncClient

from .conftest import LiveServer

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("crash_listener.py")
EVENTS = 3000
KILL_AT = (700, 1800)
"""Kill the run once it reports this many handled events (its own count)."""


@dataclass
class Listener:
    proc: asyncio.subprocess.Process
    tag: str

    async def wait_handled(self, n: int) -> None:
        """Read the listener's progress lines until it reports ``n`` handled events."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(60):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"listener {self.tag} exited early ({await self.proc.wait()})"
                if line.startswith("handled ") and int(line.split()[1]) >= n:
                    return


async def start(url: str, kind: str, store: Path, log: Path, tag: str, tmp: Path) -> Listener:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
    err = (tmp / f"listener-{tag}.err").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        url,
        "crash",
        kind,
        str(store),
        str(log),
        tag,
        stdout=asyncio.subprocess.PIPE,
        stderr=err,
        env=env,
    )
    err.close()
    return Listener(proc, tag)


def saved_position(kind: str, store: Path) -> int:
    """The checkpoint as the killed process left it on disk."""
    if kind == "sqlite":
        with sqlite3.connect(store) as db:
            row = db.execute(
                "SELECT position FROM runstream_checkpoints WHERE name = 'crash'"
            ).fetchone()
        position = row[0] if row else "0"
    else:
        position = json.loads(store.read_text())["crash"]["position"] if store.exists() else "0"
    return int(str(position).rpartition(":")[2])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["sqlite", "file"])
async def test_kill_9_and_restart_handles_every_event_at_least_once_and_skips_none(
    live_server: LiveServer, tmp_path: Path, kind: str
) -> None:
    store = tmp_path / ("checkpoints.db" if kind == "sqlite" else "checkpoints.json")
    log = tmp_path / "handled.log"

    async def produce(client: AsyncClient) -> None:
        for start_at in range(0, EVENTS, 50):
            await client.publish_many(
                "crash", [("job", {"n": n}) for n in range(start_at, start_at + 50)]
            )
            await asyncio.sleep(0.01)  # a live stream, not a backlog
        await client.close_stream("crash", status="succeeded")

    saved_at_kill: list[int] = []
    async with AsyncClient(live_server.url) as producer:
        await producer.publish("crash", "job", {"n": -1})  # the stream exists before listening
        producing = asyncio.create_task(produce(producer))
        for n, threshold in enumerate(KILL_AT):
            listener = await start(live_server.url, kind, store, log, f"run{n}", tmp_path)
            await listener.wait_handled(threshold - (KILL_AT[n - 1] if n else 0))
            listener.proc.send_signal(signal.SIGKILL)
            assert await listener.proc.wait() == -signal.SIGKILL
            saved_at_kill.append(saved_position(kind, store))
        last = await start(live_server.url, kind, store, log, "run2", tmp_path)
        assert last.proc.stdout is not None
        out = (await asyncio.wait_for(last.proc.stdout.read(), 60)).decode()
        assert await last.proc.wait() == 0, (tmp_path / "listener-run2.err").read_text()
        await producing
    total = EVENTS + 2  # the event published first, EVENTS more, the end entry
    assert f"end {total}" in out

    by_run: dict[str, list[int]] = defaultdict(list)
    keys: dict[int, set[str]] = defaultdict(set)
    for line in log.read_text().splitlines():
        tag, id_, key = line.split()
        by_run[tag].append(int(id_))
        keys[int(id_)].add(key)
    counts = Counter(i for ids in by_run.values() for i in ids)

    assert sorted(counts) == list(range(1, total + 1)), "an event was skipped"
    assert all(len(k) == 1 for k in keys.values()), "idempotency keys differ between deliveries"
    duplicates = {i: c - 1 for i, c in counts.items() if c > 1}
    expected: Counter[int] = Counter()
    for n, saved in enumerate(saved_at_kill):
        killed, restarted = by_run[f"run{n}"], by_run[f"run{n + 1}"]
        # The restart resumes exactly after the checkpoint the killed run left.
        assert min(restarted) == saved + 1, (saved, min(restarted))
        # What the killed run had handled beyond that checkpoint is handled again.
        expected.update(i for i in killed if i > saved)
    assert duplicates == dict(expected)
    report = {
        "store": kind,
        "events": total,
        "kills": len(KILL_AT),
        "checkpoint_at_kill": saved_at_kill,
        "handled_before_kill": [max(by_run[f"run{n}"]) for n in range(len(KILL_AT))],
        "duplicates": sum(duplicates.values()),
        "duplicates_per_kill": [
            sum(1 for i in by_run[f"run{n}"] if i > saved) for n, saved in enumerate(saved_at_kill)
        ],
        "skipped": 0,
    }
    print("LISTENER_CRASH", json.dumps(report))
