"""Capture throughput: a child's output through run_process into an EventLog, vs raw sqlite3.

Usage::

    .venv/bin/python bench/capture.py                    # 1,000,000 lines, temp sqlite file
    .venv/bin/python bench/capture.py --lines 100000     # smaller
    .venv/bin/python bench/capture.py --backend memory://
    .venv/bin/python bench/capture.py --reps 3           # interleave runs, report medians
    .venv/bin/python bench/capture.py --profile          # add the top functions (main thread)

A Python child writes ``--lines`` lines of 80 bytes (79 characters and a
newline) to stdout in chunks of 10,000 lines. :func:`run_process` captures
them into one stream through the runs executor's own sink,
:func:`runstream.runs.executor.output_sink` (the code path of every command
run): ``stdout`` events with ``OutputLine.to_data()`` as data, appended in
chunks of ``executor.APPEND_CHUNK`` events with ``EventLog.append_encoded``.
The capture rate counts from starting the child to ``run_process``
returning, so it includes the last append; the stored events are checked.

The baseline, measured in the same run, is plain ``sqlite3``: ``executemany``
of the same rows (stream, id, type, JSON data, time) into a fresh file with
the backend's pragmas (WAL, the backend's ``synchronous``), 5,000 rows per
transaction, one commit each, rows prepared before the clock starts.

One more capture (skip with ``--no-variants``) uses a sink written on the
public API only: ``log.append`` of ``NewEvent(item.stream, item.to_data())``
for each record, in the same chunks (``capture_newevent_*``).
``--no-breakdown`` skips timing each stage separately, in this process.

Prints one JSON object: ``{"lines", "capture_lines_per_s",
"raw_sqlite_rows_per_s", "ratio", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runstream.backends import EventLog, open_backend
from runstream.core.model import EncodedEvents, NewEvent, now
from runstream.runner.lines import LineSplitter, OutputBatch, OutputLine, encode_runs
from runstream.runner.process import Sink, run_process
from runstream.runs.executor import APPEND_CHUNK, output_sink

RAW_CHUNK = 5000
"""Rows per transaction in the baseline."""

LINE_BYTES = 80

CHILD = textwrap.dedent(
    """
    import sys
    n = int(sys.argv[1])
    pad = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2
    write = sys.stdout.buffer.write
    for start in range(0, n, 10000):
        stop = min(n, start + 10000)
        write(b"".join(b"line %09d %s\\n" % (i, pad[:64]) for i in range(start, stop)))
    """
)


def child_line(i: int) -> str:
    """The text of line ``i`` as the child writes it (without the newline)."""
    return f"line {i:09d} {('abcdefghijklmnopqrstuvwxyz0123456789' * 2)[:64]}"


assert len(child_line(0)) + 1 == LINE_BYTES


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def newevent_sink(log: EventLog, stream: str) -> Sink:
    """A sink on the public API only: a ``NewEvent`` per record, ``log.append`` per chunk."""

    async def sink(batch: Sequence[OutputLine]) -> None:
        events = [NewEvent(item.stream, item.to_data()) for item in batch]
        for start in range(0, len(events), APPEND_CHUNK):
            await log.append(stream, events[start : start + APPEND_CHUNK])

    return sink


async def capture_rate(
    log: EventLog, lines: int, *, variant: str = "executor"
) -> tuple[float, dict[str, Any]]:
    """Lines/s of one capture run into ``log``; checks that every line was stored.

    ``variant``: ``"executor"`` captures through the runs executor's
    :func:`output_sink`; ``"newevent"`` through :func:`newevent_sink`.
    """
    stream = f"bench-capture-{uuid.uuid4().hex[:8]}"
    batches = events = 0
    inner = output_sink(log, stream) if variant == "executor" else newevent_sink(log, stream)

    async def sink(batch: Sequence[OutputLine]) -> None:
        nonlocal batches, events
        batches += 1
        events += len(batch)
        await inner(batch)

    t0 = time.perf_counter()
    result = await run_process([sys.executable, "-c", CHILD, str(lines)], sink=sink)
    elapsed = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"child failed: {result}")
    await check_stored(log, stream, lines, events)
    details = {"sink_calls": batches, "events": events, "seconds": round(elapsed, 3)}
    return rate(lines, elapsed), details


async def check_stored(log: EventLog, stream: str, lines: int, events: int) -> None:
    """Every line the child printed is in ``stream``, in order, as ``stdout`` events.

    A line may legitimately arrive in ``partial`` pieces (a timer flush under
    load): pieces are joined before comparing.
    """
    info = await log.info(stream)
    if info.last_id != events:
        raise SystemExit(f"the sink got {events} records, {info.last_id} events stored")
    after, line, pieces = 0, 0, ""
    while after < events:
        page = await log.read(stream, after=after, limit=10_000)
        for event in page.events:
            data = event.data
            if event.type != "stdout" or set(data) - {"line", "partial"}:
                raise SystemExit(f"unexpected event {event!r}")
            pieces += data["line"]
            if not data.get("partial"):
                if pieces != child_line(line):
                    raise SystemExit(f"line {line} stored as {pieces!r}")
                line, pieces = line + 1, ""
        after = page.next_after
    if line != lines or pieces:
        raise SystemExit(f"{line} whole lines stored, {lines} printed")


def raw_sqlite_rate(path: Path, lines: int, synchronous: str) -> float:
    """Rows/s of plain ``executemany`` of the same rows, ``RAW_CHUNK`` per committed transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(
            "CREATE TABLE events (stream TEXT NOT NULL, id INTEGER NOT NULL, type TEXT NOT NULL,"
            " data TEXT NOT NULL, time REAL NOT NULL, PRIMARY KEY (stream, id)) WITHOUT ROWID"
        )
        stream, t = "bench-raw", now()
        rows = [
            (stream, i + 1, "stdout", json.dumps({"line": child_line(i)}, separators=(",", ":")), t)
            for i in range(lines)
        ]
        t0 = time.perf_counter()
        for start in range(0, lines, RAW_CHUNK):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO events (stream, id, type, data, time) VALUES (?, ?, ?, ?, ?)",
                rows[start : start + RAW_CHUNK],
            )
            conn.execute("COMMIT")
        return rate(lines, time.perf_counter() - t0)
    finally:
        conn.close()


async def breakdown(log: EventLog, lines: int) -> dict[str, float]:
    """Microseconds per line of each stage, measured separately in this process.

    The executor's path: ``split`` (``LineSplitter.feed_batch`` over the
    child's bytes in 256 KiB reads), ``encode`` (``encode_runs`` of those
    batches and their ``EncodedEvents`` chunks), ``append`` (``append_encoded``,
    ``APPEND_CHUNK`` events per call). For comparison, the public API's path:
    ``split_records`` (``LineSplitter.feed``: an ``OutputLine`` per line),
    ``to_event`` (``NewEvent(l.stream, l.to_data())``), ``append_events``
    (``log.append`` of those, ``APPEND_CHUNK`` per call).
    """
    pad = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2
    data = b"".join(b"line %09d %s\n" % (i, pad[:64]) for i in range(lines))
    reads = [data[start : start + 256 * 1024] for start in range(0, len(data), 256 * 1024)]
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    splitter = LineSplitter("stdout")
    batches = [splitter.feed_batch(chunk) for chunk in reads]
    batches.append(OutputBatch(splitter.close()))
    t1 = time.perf_counter()
    chunks: list[list[EncodedEvents]] = []
    for batch in batches:
        for type_, data_json in encode_runs(batch):
            for start in range(0, len(data_json), APPEND_CHUNK):
                chunks.append([EncodedEvents(type_, data_json[start : start + APPEND_CHUNK])])
    t2 = time.perf_counter()
    stream = f"bench-encoded-{uuid.uuid4().hex[:8]}"
    for chunk in chunks:
        await log.append_encoded(stream, chunk)
    t3 = time.perf_counter()
    times.update(split=t1 - t0, encode=t2 - t1, append=t3 - t2)

    t0 = time.perf_counter()
    splitter = LineSplitter("stdout")
    records: list[OutputLine] = []
    for read in reads:
        records += splitter.feed(read)
    records += splitter.close()
    t1 = time.perf_counter()
    events = [NewEvent(item.stream, item.to_data()) for item in records]
    t2 = time.perf_counter()
    stream = f"bench-append-{uuid.uuid4().hex[:8]}"
    for start in range(0, len(events), APPEND_CHUNK):
        await log.append(stream, events[start : start + APPEND_CHUNK])
    t3 = time.perf_counter()
    times.update(split_records=t1 - t0, to_event=t2 - t1, append_events=t3 - t2)
    return {name: round(seconds / lines * 1e6, 3) for name, seconds in times.items()}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        url = args.backend or f"sqlite:///{tmp}/capture.db"
        log = open_backend(url)
        synchronous = str(getattr(log, "synchronous", "full")).upper()
        capture_rates: list[float] = []
        newevent_rates: list[float] = []
        raw_rates: list[float] = []
        details: dict[str, Any] = {}
        profile_text = ""
        async with log:
            for rep in range(args.reps):
                raw_rates.append(
                    raw_sqlite_rate(Path(tmp) / f"raw-{rep}.db", args.lines, synchronous)
                )
                profiler = cProfile.Profile() if args.profile and rep == 0 else None
                if profiler is not None:
                    profiler.enable()
                value, details = await capture_rate(log, args.lines)
                if profiler is not None:
                    profiler.disable()
                    buf = io.StringIO()
                    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(15)
                    profile_text = buf.getvalue()
                capture_rates.append(value)
                if args.variants:
                    newevent_rates.append(
                        (await capture_rate(log, args.lines, variant="newevent"))[0]
                    )
            stages = await breakdown(log, args.lines) if args.breakdown else {}
        capture, raw = statistics.median(capture_rates), statistics.median(raw_rates)
        report: dict[str, Any] = {
            "lines": args.lines,
            "capture_lines_per_s": capture,
            "raw_sqlite_rows_per_s": raw,
            "ratio": round(capture / raw, 3),
            "backend": url.replace(tmp, "<tmp>"),
            "synchronous": synchronous.lower(),
            "append_chunk": APPEND_CHUNK,
            "raw_chunk": RAW_CHUNK,
            **(
                {
                    "capture_newevent_lines_per_s": statistics.median(newevent_rates),
                    "ratio_newevent": round(statistics.median(newevent_rates) / raw, 3),
                }
                if newevent_rates
                else {}
            ),
            "reps": args.reps,
            "capture_runs": capture_rates,
            "raw_runs": raw_rates,
            **({"newevent_runs": newevent_rates} if newevent_rates else {}),
            "last_capture": details,
            "us_per_line": {
                "capture": round(1e6 / capture, 3),
                "raw_sqlite": round(1e6 / raw, 3),
                **({"stages": stages} if stages else {}),
            },
            "env": {
                "python": platform.python_version(),
                "sqlite": sqlite3.sqlite_version,
                "cpus": os.cpu_count(),
            },
        }
        if profile_text:
            report["profile_main_thread"] = profile_text.splitlines()
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines the child prints")
    parser.add_argument("--backend", default="", help="EventLog URL (default: temp sqlite file)")
    parser.add_argument("--reps", type=int, default=1, help="interleaved runs; medians reported")
    parser.add_argument("--profile", action="store_true", help="cProfile the first capture run")
    parser.add_argument(
        "--no-variants",
        dest="variants",
        action="store_false",
        help="skip the capture through a sink on the public API only (NewEvent per line)",
    )
    parser.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip timing the stages (split, event building, append) separately",
    )
    args = parser.parse_args()
    if args.lines < 1 or args.reps < 1:
        parser.error("--lines and --reps must be >= 1")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
