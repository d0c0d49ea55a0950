"""Capture throughput: a child's output through run_process into an EventLog, vs raw sqlite3.

Usage::

    .venv/bin/python bench/capture.py                    # 1,000,000 lines, temp sqlite file
    .venv/bin/python bench/capture.py --lines 100000     # smaller
    .venv/bin/python bench/capture.py --backend memory://
    .venv/bin/python bench/capture.py --reps 3           # interleave runs, report medians
    .venv/bin/python bench/capture.py --profile          # add the top functions (main thread)

A Python child writes ``--lines`` lines of 80 bytes (79 characters and a
newline) to stdout in chunks of 10,000 lines. :func:`run_process` captures
them; the sink appends each batch to one stream in chunks of at most 5,000
events, as ``stdout`` events with ``OutputLine.to_data()`` as data. The
capture rate counts from starting the child to ``run_process`` returning, so
it includes the last append.

The baseline, measured in the same run, is plain ``sqlite3``: ``executemany``
of the same rows (stream, id, type, JSON data, time) into a fresh file with
the backend's pragmas (WAL, the backend's ``synchronous``), 5,000 rows per
transaction, one commit each, rows prepared before the clock starts.

Two more captures (skip with ``--no-prejson``) use a sink that passes
``data_json=item.to_data_json()``, so ``NewEvent`` skips its generic JSON
encoding, once as is and once pipelined (building chunk k+1 while chunk k is
being appended). ``--no-breakdown`` skips timing each stage separately.

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
from runstream.core.model import NewEvent, now
from runstream.runner.lines import LineSplitter, OutputLine
from runstream.runner.process import run_process

APPEND_CHUNK = 5000
"""Most events per append, in the capture sink and in the baseline's transactions."""

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


async def capture_rate(
    log: EventLog, lines: int, *, prejson: bool = False, pipelined: bool = False
) -> tuple[float, dict[str, Any]]:
    """Lines/s of one capture run into ``log``; checks that every line was stored.

    ``prejson``: the sink builds events the way the runs executor does
    (``NewEvent.trusted`` with ``item.to_data_json()``: no generic JSON encoding,
    no re-validation of a type that is stdout/stderr by construction).
    ``pipelined``: the sink builds the next chunk of a batch while the previous
    chunk's append is in flight (appends stay sequential, and the sink still
    returns only once all are stored).
    """
    stream = f"bench-capture-{uuid.uuid4().hex[:8]}"
    batches = events = whole_lines = 0

    async def sink(batch: Sequence[OutputLine]) -> None:
        nonlocal batches, events, whole_lines
        batches += 1
        events += len(batch)
        whole_lines += sum(not item.partial for item in batch)
        in_flight: asyncio.Future[Any] | None = None
        for start in range(0, len(batch), APPEND_CHUNK):
            part = batch[start : start + APPEND_CHUNK]
            if prejson:
                chunk = [
                    NewEvent.trusted(item.stream, item.to_data(), item.to_data_json())
                    for item in part
                ]
            else:
                chunk = [NewEvent(item.stream, item.to_data()) for item in part]
            if not pipelined:
                await log.append(stream, chunk)
                continue
            if in_flight is not None:
                await in_flight
            in_flight = asyncio.ensure_future(log.append(stream, chunk))
        if in_flight is not None:
            await in_flight

    t0 = time.perf_counter()
    result = await run_process([sys.executable, "-c", CHILD, str(lines)], sink=sink)
    elapsed = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"child failed: {result}")
    # A line may legitimately arrive in partial pieces (timer flush under load),
    # so count whole lines as the sink saw them and events as the log stored them.
    info = await log.info(stream)
    if whole_lines != lines or info.last_id != events:
        raise SystemExit(f"{whole_lines} lines in {events} events, {info.last_id} stored")
    page = await log.read(stream, after=events - 1, limit=1)
    if page.events[0].data != {"line": child_line(lines - 1)}:
        raise SystemExit(f"last event is {page.events[0]!r}")
    details = {"sink_calls": batches, "events": events, "seconds": round(elapsed, 3)}
    return rate(lines, elapsed), details


def raw_sqlite_rate(path: Path, lines: int, synchronous: str) -> float:
    """Rows/s of plain ``executemany`` of the same rows, 5,000 per committed transaction."""
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
        for start in range(0, lines, APPEND_CHUNK):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO events (stream, id, type, data, time) VALUES (?, ?, ?, ?, ?)",
                rows[start : start + APPEND_CHUNK],
            )
            conn.execute("COMMIT")
        return rate(lines, time.perf_counter() - t0)
    finally:
        conn.close()


async def breakdown(log: EventLog, lines: int) -> dict[str, float]:
    """Microseconds per line of each stage, measured separately in this process.

    ``split``: LineSplitter over the child's bytes in 256 KiB reads;
    ``to_event``: ``NewEvent(l.stream, l.to_data())`` as in the sink;
    ``to_event_cached_encoder``: the same with the JSON encoded by one reused
    ``JSONEncoder`` (what ``core.model.encode_data`` could do);
    ``to_event_prejson``: with ``data_json=item.to_data_json()``;
    ``append``: appending the prepared events, 5,000 per call.
    """
    pad = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2
    data = b"".join(b"line %09d %s\n" % (i, pad[:64]) for i in range(lines))
    splitter = LineSplitter("stdout")
    t0 = time.perf_counter()
    out: list[OutputLine] = []
    for start in range(0, len(data), 256 * 1024):
        out += splitter.feed(data[start : start + 256 * 1024])
    out += splitter.close()
    t1 = time.perf_counter()
    events = [NewEvent(item.stream, item.to_data()) for item in out]
    t2 = time.perf_counter()
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for item in out:
        value = item.to_data()
        NewEvent(item.stream, value, data_json=encoder.encode(value))
    t3 = time.perf_counter()
    for item in out:
        NewEvent(item.stream, item.to_data(), data_json=item.to_data_json())
    t3b = time.perf_counter()
    stream = f"bench-append-{uuid.uuid4().hex[:8]}"
    for start in range(0, len(events), APPEND_CHUNK):
        await log.append(stream, events[start : start + APPEND_CHUNK])
    t4 = time.perf_counter()

    def per_line(seconds: float) -> float:
        return round(seconds / lines * 1e6, 3)

    return {
        "split": per_line(t1 - t0),
        "to_event": per_line(t2 - t1),
        "to_event_cached_encoder": per_line(t3 - t2),
        "to_event_prejson": per_line(t3b - t3),
        "append": per_line(t4 - t3b),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        url = args.backend or f"sqlite:///{tmp}/capture.db"
        log = open_backend(url)
        synchronous = str(getattr(log, "synchronous", "full")).upper()
        capture_rates: list[float] = []
        prejson_rates: list[float] = []
        pipelined_rates: list[float] = []
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
                if args.prejson:
                    prejson_rates.append((await capture_rate(log, args.lines, prejson=True))[0])
                    pipelined = await capture_rate(log, args.lines, prejson=True, pipelined=True)
                    pipelined_rates.append(pipelined[0])
            stages = await breakdown(log, args.lines) if args.breakdown else {}
        capture, raw = statistics.median(capture_rates), statistics.median(raw_rates)
        report: dict[str, Any] = {
            "lines": args.lines,
            "capture_lines_per_s": capture,
            "raw_sqlite_rows_per_s": raw,
            "ratio": round(capture / raw, 3),
            "backend": url.replace(tmp, "<tmp>"),
            "synchronous": synchronous.lower(),
            **(
                {
                    "capture_prejson_lines_per_s": statistics.median(prejson_rates),
                    "ratio_prejson": round(statistics.median(prejson_rates) / raw, 3),
                    "capture_prejson_pipelined_lines_per_s": statistics.median(pipelined_rates),
                    "ratio_prejson_pipelined": round(statistics.median(pipelined_rates) / raw, 3),
                }
                if prejson_rates
                else {}
            ),
            "reps": args.reps,
            "capture_runs": capture_rates,
            "raw_runs": raw_rates,
            "last_capture": details,
            "us_per_line": {
                "capture": round(1e6 / capture, 3),
                "raw_sqlite": round(1e6 / raw, 3),
                **({"stages": stages} if stages else {}),
            },
            "env": {"python": platform.python_version(), "cpus": os.cpu_count()},
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
        "--no-prejson",
        dest="prejson",
        action="store_false",
        help="skip the extra captures whose sink passes data_json=item.to_data_json()",
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
