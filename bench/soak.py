"""Soak: runs are created continuously with retention on; does the store level off, and do
appends slow down while a retention pass deletes?

Usage::

    .venv/bin/python bench/soak.py                         # 600 s on a temp SQLite file
    .venv/bin/python bench/soak.py --duration 60 --quick   # a smoke run
    .venv/bin/python bench/soak.py --backend redis://127.0.0.1:7777/0?prefix=soak

What runs, all in this process through the real engine, run store and lifecycle:

* **runs** — ``--runs-per-s`` runs are created; each goes queued → running, appends
  ``--lines`` stdout events (``--line-bytes`` each) in batches as the executor does,
  and ends ``succeeded``. Retention keeps ended runs ``--max-age`` seconds, so the
  steady state holds about ``runs_per_s * max_age`` runs.
* **probe** — one event appended every ``--probe-ms`` ms to a plain stream (a new
  one every ``--probe-rotate`` s; the old one is closed and removed by the plain-stream
  rule ``stream_max_closed``), each append timed. An append is counted *during a
  pass* when a retention pass ran at its start or its end; *while sampling* when the
  bench was reading the store's size; the others are the baseline measured in the
  same run. *Before passes* are the baseline appends made in the window of the same
  length just before each pass: as many as during passes, under the same load.
* **retention** — :meth:`runstream.runs.retention.Retention.sweep` every ``--interval``
  s, paced as a server's are (working ``--duty-cycle`` of the time, pausing between
  steps; ``--duty-cycle 1`` for back-to-back steps). SQLite: deletes in bounded
  batches, then ``incremental_vacuum`` in small steps.
* **samples** — every ``--sample-s`` s: the store's size (SQLite: database + WAL
  files, and the WAL alone; Redis: ``used_memory``), its rows, and the runs kept.
  Reading them is work of the bench's own (SQLite counts every row), so samples and
  passes take turns, and the appends a sample overlapped are kept apart.

Prints one JSON object (settings, size over time and its last-third spread, append
latency during vs outside passes, passes) and writes a plot (PNG with matplotlib,
else SVG) and the samples as CSV to ``--out`` (default ``docs/img/soak-<engine>``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runstream.backends import EventLog, engine_for, open_backend, open_run_store
from runstream.core.model import EncodedEvents, NewEvent, encode_data
from runstream.runs.lifecycle import Lifecycle
from runstream.runs.model import RunRecord, new_run_id
from runstream.runs.retention import (
    DUTY_CYCLE,
    Retention,
    RetentionPolicy,
    RunRetention,
    StreamRetention,
)
from runstream.runs.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (
    "duration", "runs_per_s", "lines", "line_bytes", "max_age", "interval", "probe_ms",
    "probe_rotate", "duty_cycle",
)  # fmt: skip
BATCH = 50
"""Output lines per append, as the executor batches a command's output."""


def _floats() -> array[float]:
    return array("d")


@dataclass
class Probe:
    """Append latencies, split by whether a retention pass (or a size sample) was running.

    Kept in arrays of numbers, which Python's garbage collector does not track: as lists
    of tuples, the ~230,000 appends of a 600 s soak made the bench's own heap big enough
    for each full collection to stall the event loop 50-140 ms, and those stalls showed
    up as slow appends.
    """

    during: array[float] = field(default_factory=_floats)
    outside: array[float] = field(default_factory=_floats)
    sampling: array[float] = field(default_factory=_floats)
    ends: array[float] = field(default_factory=_floats)
    """End time of each append outside samples, in time order (then its latency, and
    1 if a pass ran)."""
    latencies: array[float] = field(default_factory=_floats)
    busy: array[int] = field(default_factory=lambda: array("b"))
    sampling_now: bool = False

    def series(
        self, first: int = 0, last: int | None = None
    ) -> Iterator[tuple[float, float, bool]]:
        """(end time, latency, during a pass) of the appends outside samples."""
        stop = len(self.ends) if last is None else last
        for i in range(first, stop):
            yield self.ends[i], self.latencies[i], bool(self.busy[i])


def before_windows(probe: Probe, windows: list[tuple[float, float]]) -> list[float]:
    """Baseline appends that ended in the window as long as each pass, just before it."""
    out: list[float] = []
    for start, end in windows:
        first = bisect.bisect_left(probe.ends, start - (end - start))
        last = bisect.bisect_left(probe.ends, start)
        out += [v for _, v, busy in probe.series(first, last) if not busy]
    return out


def percentiles(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "n": len(ordered),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def by_minute(probe: Probe) -> list[dict[str, Any]]:
    """p50/p99/max of the appends (passes or not; not those a size sample overlapped) per
    minute of the soak: flat when cleanup does not make appends slower as the store fills
    and is emptied."""
    minutes: dict[int, list[float]] = {}
    for t, elapsed, _busy in probe.series():
        minutes.setdefault(int(t // 60), []).append(elapsed)
    out = []
    for minute, samples in sorted(minutes.items()):
        row = percentiles(samples)
        out.append({"minute": minute, **{k: row[k] for k in ("n", "p50_ms", "p99_ms", "max_ms")}})
    return out


async def store_size(log: EventLog) -> tuple[float, dict[str, float]]:
    stats = await log.storage_stats()
    return stats.get("file_bytes", stats.get("used_memory", 0.0)), stats


def wal_mib(log: EventLog) -> float:
    """SQLite: the size of the WAL file alone (part of the store size); 0 elsewhere."""
    path = getattr(log, "path", None)
    try:
        return round(os.stat(f"{path}-wal").st_size / 2**20, 3) if path else 0.0
    except OSError:
        return 0.0


async def one_run(store: RunStore, log: EventLog, lifecycle: Lifecycle, args: Any) -> None:
    record = RunRecord(new_run_id(), "soak", {}, "queued", time.time())
    await lifecycle.create(record)
    await lifecycle.advance(record.id, "queued", "running", worker="soak", started_at=time.time())
    line = "x" * args.line_bytes
    for start in range(0, args.lines, BATCH):
        texts = [
            encode_data({"line": f"{i:06d} {line}"})
            for i in range(start, min(args.lines, start + BATCH))
        ]
        await log.append_encoded(record.id, [EncodedEvents("stdout", texts)])
    await lifecycle.advance(record.id, "running", "succeeded", exit_code=0, finished_at=time.time())


async def make_runs(
    store: RunStore, log: EventLog, args: Any, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    lifecycle = Lifecycle(store, log)
    period = 1.0 / args.runs_per_s
    running: set[asyncio.Task[None]] = set()
    next_at = time.monotonic()
    while not stop.is_set():
        task = asyncio.create_task(one_run(store, log, lifecycle, args))
        running.add(task)
        task.add_done_callback(running.discard)
        counts["runs"] += 1
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*running, return_exceptions=True)


async def probe_appends(
    log: EventLog, retention: Retention, args: Any, stop: asyncio.Event, probe: Probe, t0: float
) -> None:
    index = 0
    stream = f"soak-probe-{index}"
    rotated = time.monotonic()
    i = 0
    while not stop.is_set():
        if time.monotonic() - rotated >= args.probe_rotate:
            await log.close(stream)
            index += 1
            stream = f"soak-probe-{index}"
            rotated = time.monotonic()
        busy, sampling = retention.sweeping, probe.sampling_now
        start = time.perf_counter()
        await log.append(stream, NewEvent("probe", {"i": i}))
        elapsed = time.perf_counter() - start
        busy = busy or retention.sweeping
        if sampling or probe.sampling_now:
            probe.sampling.append(elapsed)
        else:
            (probe.during if busy else probe.outside).append(elapsed)
            probe.ends.append(time.monotonic() - t0)
            probe.latencies.append(elapsed)
            probe.busy.append(busy)
        i += 1
        await asyncio.sleep(args.probe_ms / 1000)


async def passes_forever(retention: Retention, turns: asyncio.Lock, interval: float) -> None:
    """:meth:`Retention.run_forever` (paced passes), taking turns with the size samples."""
    while True:
        await asyncio.sleep(interval)
        async with turns:
            await retention.sweep(paced=True)


async def soak(args: Any) -> dict[str, Any]:
    url = args.backend
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="runstream-soak-")
        url = f"sqlite:///{Path(tmp.name) / 'soak.db'}"
    engine = engine_for(url).name
    log = open_backend(url)
    store = open_run_store(url)
    await log.start()
    await store.start()
    policy = RetentionPolicy(
        runs=RunRetention(max_age=args.max_age),
        streams=StreamRetention(max_closed=args.probe_rotate),
        feed_max_age=args.max_age,
    )
    passes: list[dict[str, Any]] = []
    pass_windows: list[tuple[float, float]] = []
    t0 = time.monotonic()

    def on_sweep(result: Any) -> None:
        end = time.monotonic() - t0
        pass_windows.append((end - result.duration, end))
        passes.append({"t": round(end, 1), **result.to_json()})

    retention = Retention(
        policy,
        store,
        log,
        interval=args.interval,
        duty_cycle=args.duty_cycle,
        on_sweep=on_sweep,
    )
    turns = asyncio.Lock()
    stop = asyncio.Event()
    probe = Probe()
    counts = {"runs": 0}
    samples: list[dict[str, float]] = []
    workers = [
        asyncio.create_task(make_runs(store, log, args, stop, counts)),
        asyncio.create_task(probe_appends(log, retention, args, stop, probe, t0)),
        asyncio.create_task(passes_forever(retention, turns, args.interval)),
    ]
    try:
        while (elapsed := time.monotonic() - t0) < args.duration:
            async with turns:
                probe.sampling_now = True
                try:
                    size, stats = await store_size(log)
                    run_stats = await store.stats()
                finally:
                    probe.sampling_now = False
            samples.append(
                {
                    "t": round(elapsed, 2),
                    "bytes": size,
                    "mib": round(size / 2**20, 3),
                    "wal_mib": wal_mib(log),
                    "events": stats.get("events", stats.get("keys", 0.0)),
                    "runs_kept": run_stats.get("runs", 0.0),
                    "free_pages": stats.get("free_pages", 0.0),
                }
            )
            await asyncio.sleep(args.sample_s)
    finally:
        stop.set()
        workers[2].cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await store.aclose()
        await log.aclose()
        if tmp is not None:
            tmp.cleanup()
    third = [s["mib"] for s in samples[len(samples) * 2 // 3 :]] or [0.0]
    out_base = Path(args.out or ROOT / "docs" / "img" / f"soak-{engine}")
    report: dict[str, Any] = {
        "bench": "soak",
        "engine": engine,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "runs_created": counts["runs"],
        "size_mib": {
            "max": round(max(s["mib"] for s in samples), 2),
            "final": round(samples[-1]["mib"], 2),
            "last_third_min": round(min(third), 2),
            "last_third_max": round(max(third), 2),
            "at_max_age": round(
                next((s["mib"] for s in samples if s["t"] >= args.max_age), samples[-1]["mib"]),
                2,
            ),
            "wal_max": round(max(s["wal_mib"] for s in samples), 2),
            "wal_last_third_max": round(
                max(s["wal_mib"] for s in samples[len(samples) * 2 // 3 :]), 2
            ),
        },
        "append_latency": {
            "during_passes": percentiles(probe.during),
            "outside_passes": percentiles(probe.outside),
            "before_passes": percentiles(before_windows(probe, pass_windows)),
            "while_sampling": percentiles(probe.sampling),
            "all_by_minute": by_minute(probe),
        },
        "passes": {
            "count": len(passes),
            "mean_s": round(statistics.fmean(p["duration"] for p in passes), 3) if passes else 0,
            "max_s": round(max((p["duration"] for p in passes), default=0.0), 3),
            "mean_paused_s": (
                round(statistics.fmean(p["paused"] for p in passes), 3) if passes else 0
            ),
            "runs_deleted": sum(p["runs_deleted"] for p in passes),
            "streams_deleted": sum(p["streams_deleted"] for p in passes),
            "pages_reclaimed": sum(p["pages_reclaimed"] for p in passes),
        },
        "outputs": write_outputs(out_base, samples, probe, pass_windows, engine),
    }
    return report


def write_outputs(
    base: Path,
    samples: list[dict[str, float]],
    probe: Probe,
    windows: list[tuple[float, float]],
    engine: str,
) -> list[str]:
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    csv_path = base.with_suffix(".csv")
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    written.append(str(csv_path.relative_to(ROOT) if csv_path.is_relative_to(ROOT) else csv_path))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        svg = base.with_suffix(".svg")
        svg.write_text(svg_plot(samples, engine))
        written.append(str(svg))
        return written
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for start, end in windows:
        for ax in (top, bottom):
            ax.axvspan(start, end, color="#f2c14e", alpha=0.35, lw=0)
    top.plot([s["t"] for s in samples], [s["mib"] for s in samples], color="#1f6feb")
    top.set_ylabel("store size (MiB)")
    top.set_title(f"runstream soak on {engine}: size with retention on (passes shaded)")
    top.set_ylim(bottom=0)
    outside = [(t, v * 1000) for t, v, busy in probe.series() if not busy]
    during = [(t, v * 1000) for t, v, busy in probe.series() if busy]
    if outside:
        bottom.scatter(*zip(*outside, strict=True), s=2, color="#57606a", label="outside passes")
    if during:
        bottom.scatter(*zip(*during, strict=True), s=4, color="#cf222e", label="during passes")
    bottom.set_yscale("log")
    bottom.set_ylabel("append latency (ms)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    png = base.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    written.append(str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png))
    return written


def svg_plot(samples: list[dict[str, float]], engine: str) -> str:
    """A minimal line chart of the size over time, for when matplotlib is missing."""
    w, h, pad = 800, 300, 40
    t_max = max(s["t"] for s in samples) or 1
    y_max = max(s["mib"] for s in samples) or 1
    xs = [pad + (w - 2 * pad) * s["t"] / t_max for s in samples]
    ys = [h - pad - (h - 2 * pad) * s["mib"] / y_max for s in samples]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
        f'<text x="{pad}" y="20">runstream soak on {engine}: store MiB (max {y_max:.1f})'
        f" over {t_max:.0f} s</text>"
        f'<polyline fill="none" stroke="#1f6feb" points="{points}"/></svg>'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="backend URL (default: temp SQLite)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--runs-per-s", type=float, default=5.0)
    parser.add_argument("--lines", type=int, default=200, help="stdout events per run")
    parser.add_argument("--line-bytes", type=int, default=100)
    parser.add_argument("--max-age", type=float, default=60.0, help="retention of ended runs")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between passes")
    # 2 ms: passes take ~1 % of the time, and the tail during them needs ~1,000 samples.
    parser.add_argument("--probe-ms", type=float, default=2.0)
    parser.add_argument("--probe-rotate", type=float, default=30.0)
    parser.add_argument(
        "--duty-cycle",
        type=float,
        default=DUTY_CYCLE,
        help=f"share of the time a pass works, [retention] duty_cycle (default {DUTY_CYCLE}; "
        "1: no pauses)",
    )
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--out", default=None, help="output path without suffix")
    parser.add_argument("--quick", action="store_true", help="short settings for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.max_age, args.interval, args.probe_rotate, args.sample_s = 10.0, 3.0, 5.0, 1.0
    report = asyncio.run(soak(args))
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
