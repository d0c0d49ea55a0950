"""SQLite-specific behaviour: durability, other processes, group commit, locking, URLs.

The shared contract (``test_contract.py``) covers the EventLog semantics; these
tests cover what only a file shared by real processes can show.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runstream.backends import open_backend
from runstream.backends.sqlite.log import SQLiteEventLog
from runstream.backends.sqlite.sql import _JSON_EACH_PROBE, SCHEMA_VERSION, _has_json_each
from runstream.core.model import UNREADABLE_TYPE, EncodedEvents, NewEvent, Producer, encode_data
from runstream.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    StaleProducerSeq,
    StreamClosed,
    StreamDeleted,
    StreamNotFound,
)

WAIT = 10.0


def url_for(path: Path, query: str = "") -> str:
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SQLiteEventLog]:
    backend = SQLiteEventLog(tmp_path / "log.db")
    async with backend:
        yield backend


# -- durability across kill -9 ------------------------------------------------

BURST_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from runstream.backends.sqlite.log import SQLiteEventLog
    from runstream.core.model import NewEvent

    async def writer(log, task):
        for n in range(1_000_000):
            size = task % 3 + 1
            batch = [NewEvent("n", {"task": task, "n": n, "b": b}) for b in range(size)]
            res = await log.append("burst", batch)
            print(res.first_id, res.last_id, task, n, flush=True)

    async def main():
        async with SQLiteEventLog(sys.argv[1]) as log:
            await asyncio.gather(*(writer(log, task) for task in range(8)))

    asyncio.run(main())
    """
)


@pytest.mark.timeout(120)
def test_acknowledged_concurrent_burst_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "burst.db"
    script = tmp_path / "child.py"
    script.write_text(BURST_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    acks: list[tuple[int, int, int, int]] = []
    try:
        for line in proc.stdout:
            first, last, task, n = map(int, line.split())
            acks.append((first, last, task, n))
            if len(acks) >= 400:
                break
        proc.send_signal(signal.SIGKILL)
        # Acknowledgements printed before the kill landed count too.
        # Only whole lines: a line without its newline was not fully acknowledged.
        for text in proc.stdout.read().decode().split("\n")[:-1]:
            first, last, task, n = map(int, text.split())
            acks.append((first, last, task, n))
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    async def verify() -> None:
        async with SQLiteEventLog(db) as log:
            info = await log.info("burst")
            page = await log.read("burst", limit=10_000)
        events = {e.id: e.data for e in page.events}
        assert sorted(events) == list(range(1, info.last_id + 1))
        for first, last, task, n in acks:
            for b, event_id in enumerate(range(first, last + 1)):
                assert events[event_id] == {"task": task, "n": n, "b": b}

    asyncio.run(verify())


# -- another process appending --------------------------------------------------

STDIN_APPENDER = textwrap.dedent(
    """
    import asyncio, sys
    from runstream.backends.sqlite.log import SQLiteEventLog
    from runstream.core.model import NewEvent

    async def main():
        async with SQLiteEventLog(sys.argv[1]) as log:
            loop = asyncio.get_running_loop()
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                if line.startswith("close"):
                    print((await log.close("shared", "succeeded")).last_id, flush=True)
                elif line.startswith("delete"):
                    await log.delete("shared")
                    print("deleted", flush=True)
                else:
                    res = await log.append("shared", NewEvent("n", {"i": int(line)}))
                    print(res.last_id, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(60)
async def test_follower_sees_append_from_another_process_quickly(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    script = tmp_path / "appender.py"
    script.write_text(STDIN_APPENDER)
    rounds = 20
    async with SQLiteEventLog(db) as log:
        # Only the data_version poller can wake the follower in time, not the safety re-read.
        log.safety_poll = 60.0
        await log.append("shared", NewEvent("n", {"i": -1}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            str(db),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            follower = log.follow("shared", after=1)
            latencies = []
            for i in range(rounds):
                proc.stdin.write(f"{i}\n".encode())
                await proc.stdin.drain()
                event = await asyncio.wait_for(anext(follower), WAIT)
                seen = time.time()
                assert not isinstance(event, Exception)
                assert (event.id, event.data) == (i + 2, {"i": i})  # type: ignore[union-attr]
                latencies.append(seen - event.time)  # type: ignore[union-attr]
                assert int(await asyncio.wait_for(proc.stdout.readline(), WAIT)) == i + 2
            await follower.aclose()  # type: ignore[attr-defined]
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), WAIT)
    # The requirement is 100 ms; the bound here is loose for a loaded CI machine
    # (bench/append.py reports the real figure).
    assert max(latencies) < 0.5, latencies


@pytest.mark.timeout(60)
async def test_follower_sees_close_and_delete_from_another_process(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    script = tmp_path / "appender.py"
    script.write_text(STDIN_APPENDER)
    async with SQLiteEventLog(db) as log:
        log.safety_poll = 60.0  # only the poller may wake followers
        await log.append("shared", NewEvent("n", {"i": 0}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            str(db),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            follower = log.follow("shared", after=1)
            waiting = asyncio.ensure_future(anext(follower))
            await asyncio.sleep(0.05)  # let the follower park; the outcome is the same if not
            assert not waiting.done()
            proc.stdin.write(b"delete\n")
            await proc.stdin.drain()
            with pytest.raises(StreamDeleted):
                await asyncio.wait_for(waiting, WAIT)
            assert await asyncio.wait_for(proc.stdout.readline(), WAIT) == b"deleted\n"

            await log.append("shared", NewEvent("n", {"i": 1}))  # re-created, new epoch
            follower = log.follow("shared", after=1)
            waiting = asyncio.ensure_future(anext(follower))
            proc.stdin.write(b"close\n")
            await proc.stdin.drain()
            end = await asyncio.wait_for(waiting, WAIT)
            assert end.is_end and end.data["status"] == "succeeded"  # type: ignore[union-attr]
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(follower), WAIT)
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), WAIT)


async def test_idle_backend_does_not_spin_after_foreign_commits(tmp_path: Path) -> None:
    db = tmp_path / "idle.db"
    # Two instances in one process use two connections: to each other, "another process".
    async with SQLiteEventLog(db) as mine, SQLiteEventLog(db) as theirs:
        await mine.append("s", NewEvent("n", 0))
        follower = mine.follow("s", after=1)
        waiting = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.05)  # let it park, so the poller is watching
        await theirs.append("other", NewEvent("n", 0))
        await theirs.close("s")
        end = await asyncio.wait_for(waiting, WAIT)
        assert end.is_end  # type: ignore[union-attr]
        await follower.aclose()  # type: ignore[attr-defined]
        await theirs.append("other", NewEvent("n", 1))  # a foreign commit nobody follows
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(0.5)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
    assert cpu < 0.5 * wall, (cpu, wall)


async def test_two_processes_appending_interleave_without_gaps(tmp_path: Path) -> None:
    db = tmp_path / "two.db"
    script = tmp_path / "appender.py"
    script.write_text(STDIN_APPENDER)
    async with SQLiteEventLog(db) as log:
        await log.append("shared", NewEvent("n", {"i": -1}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            str(db),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"".join(f"{1000 + i}\n".encode() for i in range(50)))
        await proc.stdin.drain()
        mine = await asyncio.gather(
            *(log.append("shared", NewEvent("n", {"i": i})) for i in range(50))
        )
        proc.stdin.close()
        theirs = [int(x) for x in (await asyncio.wait_for(proc.stdout.read(), WAIT)).split()]
        await asyncio.wait_for(proc.wait(), WAIT)
        page = await log.read("shared", limit=1000)
    ids = sorted([1] + [r.last_id for r in mine] + theirs)
    assert ids == list(range(1, 102))
    assert [e.id for e in page.events] == ids
    assert sorted(e.data["i"] for e in page.events) == [-1, *range(50), *range(1000, 1050)]


# -- group commit ----------------------------------------------------------------


async def test_concurrent_single_appends_share_few_commits(log: SQLiteEventLog) -> None:
    n = 200
    before = log.commits
    results = await asyncio.gather(*(log.append(f"s{i % 5}", NewEvent("n", i)) for i in range(n)))
    used = log.commits - before
    assert 1 <= used <= n // 4, used
    for name in (f"s{k}" for k in range(5)):
        assert sorted(r.last_id for r in results if r.stream == name) == list(range(1, 41))


async def test_failing_request_does_not_undo_others_in_its_group(log: SQLiteEventLog) -> None:
    await log.close("closed")
    entered, gate = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        entered.set()
        gate.wait(WAIT)

    holder = asyncio.create_task(log._write("holder", hold))
    await asyncio.to_thread(entered.wait, WAIT)
    before = log.commits
    # These queue up behind the held transaction, so all of them share the next one.
    tasks = [
        asyncio.create_task(log.append("ok", NewEvent("n", 1))),
        asyncio.create_task(log.append("closed", NewEvent("n", 2))),
        asyncio.create_task(log.append("ok", NewEvent("n", 3), producer=Producer("p", 5))),
        asyncio.create_task(log.append("ok", NewEvent("n", 4), producer=Producer("p", 4))),
        asyncio.create_task(log.trim("missing", max_len=1)),
        asyncio.create_task(log.append("ok", [NewEvent("n", 5), NewEvent("n", 6)])),
    ]
    await asyncio.sleep(0)  # every task runs up to its queued write
    # While the writer holds its transaction open, reads still answer (WAL).
    assert (await asyncio.wait_for(log.info("closed"), WAIT)).closed
    gate.set()
    await holder
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert log.commits - before == 2  # the held transaction, then all six together
    assert isinstance(outcomes[1], StreamClosed)
    assert isinstance(outcomes[3], StaleProducerSeq)
    assert isinstance(outcomes[4], StreamNotFound)
    page = await log.read("ok")
    assert [e.data for e in page.events] == [1, 3, 5, 6]
    assert (await log.info("closed")).last_id == 1


# -- readers and writers -----------------------------------------------------------


@pytest.mark.timeout(60)
async def test_long_reads_do_not_block_appends(log: SQLiteEventLog) -> None:
    blob = "x" * 1000
    for _ in range(10):
        await log.append("big", [NewEvent("n", blob) for _ in range(1000)])
    # A reader that keeps one snapshot open for the whole test (another process, say).
    raw = sqlite3.connect(log.path, isolation_level=None)
    try:
        raw.execute("BEGIN")
        held = raw.execute("SELECT count(*) FROM events").fetchone()[0]
        stop = asyncio.Event()

        async def reader() -> int:
            pages = 0
            while not stop.is_set():
                page = await log.read("big", limit=10_000)
                assert len(page.events) == 10_000
                pages += 1
            return pages

        readers = [asyncio.create_task(reader()) for _ in range(2)]
        worst = 0.0
        for i in range(50):
            t0 = time.perf_counter()
            await asyncio.wait_for(log.append("small", NewEvent("n", i)), WAIT)
            worst = max(worst, time.perf_counter() - t0)
        stop.set()
        assert all(pages >= 1 for pages in await asyncio.gather(*readers))
        assert raw.execute("SELECT count(*) FROM events").fetchone()[0] == held
        raw.execute("COMMIT")
    finally:
        raw.close()
    assert (await log.info("small")).last_id == 50
    assert worst < 2.0, worst


async def test_writer_lock_held_too_long_raises_backend_error_then_recovers(
    tmp_path: Path,
) -> None:
    db = tmp_path / "locked.db"
    async with SQLiteEventLog.from_url(url_for(db, "busy_timeout=0.2")) as log:
        await log.append("s", NewEvent("n", 1))
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(BackendError, match="locked") as info:
                await log.append("s", NewEvent("n", 2))
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert (await log.append("s", NewEvent("n", 3))).last_id == 2


# -- reopening -----------------------------------------------------------------------


async def test_reopening_keeps_epochs_producers_trim_and_close(tmp_path: Path) -> None:
    db = tmp_path / "reopen.db"
    async with SQLiteEventLog(db) as log:
        a = await log.append("a", [NewEvent("n", i) for i in range(5)], producer=Producer("p", 7))
        await log.trim("a", max_len=2)
        await log.append("b", NewEvent("n", 0))
        await log.close("b", "failed", "boom")
        old = await log.append("c", NewEvent("n", 0))
        await log.delete("c")
        new = await log.append("c", NewEvent("n", 1))
        before = await log.list_streams()
    assert new.epoch != old.epoch
    async with SQLiteEventLog(db) as log:
        assert await log.list_streams() == before
        info = await log.info("a")
        assert (info.epoch, info.first_id, info.last_id) == (a.epoch, 4, 5)
        again = await log.append("a", NewEvent("n", 99), producer=Producer("p", 7))
        assert (again.first_id, again.last_id, again.duplicate) == (1, 5, True)
        with pytest.raises(StaleProducerSeq):
            await log.append("a", NewEvent("n", 99), producer=Producer("p", 6))
        with pytest.raises(StreamClosed):
            await log.append("b", NewEvent("n", 1))
        end = (await log.read("b")).events[-1]
        assert (end.is_end, end.data) == (True, {"status": "failed", "reason": "boom"})
        assert (await log.info("c")).epoch == new.epoch
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


async def test_delete_and_trim_touch_only_their_own_stream(log: SQLiteEventLog) -> None:
    for name in ("a", "b", "c"):
        await log.append(name, [NewEvent("n", f"{name}{i}") for i in range(5)])
    await log.trim("b", max_len=1)
    await log.delete("a")
    await log.append("a", NewEvent("n", "again"))
    assert [e.data for e in (await log.read("a")).events] == ["again"]
    assert [e.data for e in (await log.read("b")).events] == ["b4"]
    assert [e.data for e in (await log.read("c")).events] == [f"c{i}" for i in range(5)]
    raw = sqlite3.connect(log.path)
    try:
        rows = raw.execute("SELECT stream, id, data FROM stream_events ORDER BY stream, id")
        assert [(s, i, json.loads(d)) for s, i, d in rows] == [
            ("a", 1, "again"),
            ("b", 5, "b4"),
            *[("c", i + 1, f"c{i}") for i in range(5)],
        ]
    finally:
        raw.close()


async def test_trim_by_age_keeps_the_young_tail(
    log: SQLiteEventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("runstream.backends.sqlite.writes.now", lambda: clock[0])
    await log.append("s", [NewEvent("n", i) for i in range(10)])
    await log.append("other", NewEvent("n", 0))
    clock[0] = 2000.0
    await log.append("s", [NewEvent("n", i) for i in range(10, 13)])
    clock[0] = 2500.0
    assert await log.trim("s", max_age=1000) == 10
    info = await log.info("s")
    assert (info.first_id, info.last_id) == (11, 13)
    assert [e.data for e in (await log.read("s")).events] == [10, 11, 12]
    assert [e.time for e in (await log.read("s")).events] == [2000.0] * 3
    assert await log.trim("s", max_age=1000) == 0
    assert await log.trim("s", max_age=0) == 3
    assert (await log.info("other")).first_id == 1


# -- lifecycle ------------------------------------------------------------------------


async def test_aclose_ends_waiting_followers_with_backend_error(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "closing.db")
    await log.start()
    await log.append("s", NewEvent("n", 1))
    follower = log.follow("s", after=1)
    waiting = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0.05)  # let it reach its wait; the outcome is the same if it has not
    await log.aclose()
    with pytest.raises(BackendError, match="closed"):
        await asyncio.wait_for(waiting, WAIT)
    with pytest.raises(BackendError, match="closed"):
        await log.append("s", NewEvent("n", 2))
    await log.aclose()  # idempotent


async def test_methods_start_the_backend_on_first_use_and_ping(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "lazy.db")
    try:
        assert (await log.append("s", NewEvent("n", 1))).last_id == 1
        await log.ping()
    finally:
        await log.aclose()


# -- URLs -----------------------------------------------------------------------------


def test_relative_url_path_is_relative_to_the_working_directory() -> None:
    assert SQLiteEventLog.from_url("sqlite:///./.runstream/runstream.db").path == (
        "./.runstream/runstream.db"
    )
    assert SQLiteEventLog.from_url("sqlite:///data/x.db").path == "data/x.db"
    assert SQLiteEventLog.from_url("sqlite:////var/lib/x.db").path == "/var/lib/x.db"
    assert SQLiteEventLog.from_url("SQLITE:///my%20dir/x.db").path == "my dir/x.db"


def test_url_query_parameters_are_parsed() -> None:
    log = SQLiteEventLog.from_url("sqlite:///x.db?synchronous=NORMAL&busy_timeout=1.5")
    assert (log.synchronous, log.busy_timeout) == ("normal", 1.5)
    assert SQLiteEventLog.from_url("sqlite:///x.db").synchronous == "full"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/x.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:///dir/",
        "sqlite:///:memory:",
        "sqlite:///x.db?journal=delete",
        "sqlite:///x.db?synchronous=sometimes",
        "sqlite:///x.db?busy_timeout=soon",
    ],
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        SQLiteEventLog.from_url(url)


@pytest.mark.parametrize(("query", "level"), [("", 2), ("synchronous=normal", 1)])
async def test_synchronous_setting_reaches_the_writer_connection(
    tmp_path: Path, query: str, level: int
) -> None:
    log = SQLiteEventLog.from_url(url_for(tmp_path / "sync.db", query))
    async with log:
        # Queued like any write, so it runs on the writer thread's own connection.
        got = await log._write("s", lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
    assert got == level


async def test_start_creates_missing_parent_directories_of_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    log = open_backend("sqlite:///./deep/er/run.db")
    assert isinstance(log, SQLiteEventLog)
    async with log:
        await log.append("s", NewEvent("n", 1))
    assert (tmp_path / "deep" / "er" / "run.db").is_file()


# -- errors ---------------------------------------------------------------------------


async def test_file_that_is_not_a_database_raises_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not an sqlite database, just text " * 100)
    log = SQLiteEventLog(path)
    with pytest.raises(BackendError, match="not a usable runstream database") as info:
        await log.start()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    await log.aclose()


async def test_database_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(BackendError, match="newer"):
        await SQLiteEventLog(path).start()


async def test_parent_that_is_a_file_raises_backend_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(BackendUnavailable):
        await SQLiteEventLog(tmp_path / "file" / "x.db").start()


async def test_stored_data_is_the_encoded_json_text(log: SQLiteEventLog) -> None:
    await log.append("s", NewEvent("n", {"b": [1, 2.5, None], "a": "é"}))
    raw = sqlite3.connect(log.path)
    try:
        (text,) = raw.execute("SELECT data FROM events").fetchone()
    finally:
        raw.close()
    assert text == '{"b":[1,2.5,null],"a":"é"}'
    assert json.loads(text) == (await log.read("s")).events[0].data


@pytest.mark.parametrize("json_each", [True, False], ids=["json_each", "row_by_row"])
async def test_encoded_append_stores_the_same_rows_byte_for_byte(
    log: SQLiteEventLog, json_each: bool
) -> None:
    if json_each and not log.json_each:
        pytest.skip("this SQLite has no json_each")
    log.json_each = json_each
    items: list[tuple[str, object]] = [
        ("stdout", {"line": 'a "quoted" \\ back\\slash', "partial": True}),
        ("stdout", {"line": "\x00\x01\x1f \t \x7f \x1b[0m", "cr": True}),
        ("stderr", {"line": "é € 😀 \u2028 \ufffd", "level": "warning"}),
        ("stderr", {"line": ""}),
        ("stdout", {"line": "y" * 70_000}),
        ("stdout", [1, 2.5, None, {"k": "\\u0000"}]),
    ]
    await log.append("plain", [NewEvent(t, d) for t, d in items])
    before = log.commits
    await log.append_encoded(
        "fast",
        [
            EncodedEvents("stdout", [encode_data(d) for _, d in items[:2]]),
            EncodedEvents("stderr", [encode_data(d) for _, d in items[2:4]]),
            EncodedEvents("stdout", [encode_data(d) for _, d in items[4:]]),
        ],
    )
    assert log.commits - before == 1  # one transaction for the whole append
    raw = sqlite3.connect(log.path)
    try:
        rows = raw.execute(
            "SELECT stream, id, type, data FROM stream_events ORDER BY stream, id"
        ).fetchall()
    finally:
        raw.close()
    fast = [row[1:] for row in rows if row[0] == "fast"]
    plain = [row[1:] for row in rows if row[0] == "plain"]
    assert fast == plain
    assert [data for _, _, data in fast] == [encode_data(d) for _, d in items]


class _ProbeConn:
    """Stands in for a connection in the json_each probe."""

    def __init__(self, rows: list[tuple[str]] | None) -> None:
        self.rows = rows

    def execute(self, sql: str, params: tuple[str]) -> _ProbeConn:
        if self.rows is None:
            raise sqlite3.OperationalError("no such table: json_each")
        return self

    def fetchall(self) -> list[tuple[str]]:
        assert self.rows is not None
        return self.rows


def test_json_each_probe_needs_exact_decoding() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        has = _has_json_each(conn)
    finally:
        conn.close()
    if sqlite3.sqlite_version_info >= (3, 38, 0):
        assert has  # the JSON functions are built in since 3.38
    array, text = _JSON_EACH_PROBE
    assert json.loads(array) == [text]
    assert _has_json_each(_ProbeConn([(text,)])) is True  # type: ignore[arg-type]
    assert _has_json_each(_ProbeConn(None)) is False  # type: ignore[arg-type]
    assert _has_json_each(_ProbeConn([(text[:-1],)])) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("column", "stored"),
    [
        ("data", "{not json"),
        ("data", "1,2"),
        ("data", '"\ud800"'),  # a lone surrogate as raw text: cannot be sent as UTF-8
        ("data", "[" * 5000 + "]" * 5000),  # deeper than any decoder's recursion limit
        ("type", "two\nlines"),
        ("type", "\udc80"),
    ],
)
async def test_unservable_stored_row_is_read_as_an_unreadable_item(
    log: SQLiteEventLog, column: str, stored: str
) -> None:
    # Written by another program or an older version: readers pass over it knowingly,
    # with the same id, and every later event still reaches them.
    await log.append("s", [NewEvent("n", 1), NewEvent("n", 2)])
    raw = sqlite3.connect(log.path)
    try:
        # As raw bytes: what a program other than Python's sqlite3 could store.
        value = stored.encode("utf-8", "surrogatepass")
        raw.execute(
            f"UPDATE events SET {column} = CAST(? AS TEXT) "
            "WHERE key = (SELECT max(key) FROM events)",
            (value,),
        )
        raw.commit()
    finally:
        raw.close()
    await log.append("s", NewEvent("n", 3))
    page = await log.read("s")
    assert [(e.id, e.type) for e in page.events] == [(1, "n"), (2, UNREADABLE_TYPE), (3, "n")]
    assert page.events[1].data["reason"]
    assert [e.data for e in page.events[::2]] == [1, 3]
    assert log.unreadable_events == 1


def test_no_threads_are_left_after_aclose(tmp_path: Path) -> None:
    before = set(threading.enumerate())

    async def use() -> None:
        async with SQLiteEventLog(tmp_path / "t.db") as log:
            await log.append("s", NewEvent("n", 1))
            await log.read("s")

    asyncio.run(use())
    left = [t for t in set(threading.enumerate()) - before if t.name.startswith("runstream")]
    assert left == []
    assert os.path.exists(tmp_path / "t.db")
