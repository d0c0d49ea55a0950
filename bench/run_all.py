"""Run every benchmark, then write docs/benchmarks.md and its plots from that one run.

Usage::

    .venv/bin/python bench/run_all.py            # the full run (about 10-15 minutes)
    .venv/bin/python bench/run_all.py --quick    # every bench with its --quick sizes
    .venv/bin/python bench/run_all.py --only fanout --only sse_codec

Each bench script runs as a subprocess and prints one JSON object; this script
keeps those objects (``test-artifacts/bench/<name>.json``, with the exact
command), puts each figure next to the baseline measured in the same run and
the target the issues set, and writes:

* ``docs/benchmarks.md`` — date, machine, the commands, one table per bench;
* ``docs/img/bench-fanout.png`` — deliveries/s and p99 latency against
  subscribers (runstream and the FastAPI + sse-starlette + XREAD baseline);
* ``docs/img/bench-append.png`` — append throughput per backend next to the
  raw engine (``sqlite3`` executemany, pipelined ``XADD``).

A bench that fails is reported as failed in the document (with the end of its
stderr); the others still run. Needs ``matplotlib`` (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hot_tables

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
RAW = ROOT / "test-artifacts" / "bench"
PY = sys.executable

FANOUT_FULL = (10, 100, 1000)
FANOUT_QUICK = (10, 100)
STRESS_RATE = 500
"""Events/s of the stress series: more than the baseline can fan out to 1,000 subscribers,
so deliveries/s there is each server's capacity (fanout.py's default rate is 20)."""
STRESS_FULL = (100, 1000)
STREAMS = 1000
STREAMS_RATE = 200
"""The many-streams series: STREAMS streams with one subscriber each, STREAMS_RATE events/s
spread over them."""


@dataclass
class Job:
    name: str
    args: list[str]
    timeout: float
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def command(self) -> str:
        return " ".join(
            [
                "python",
                *(
                    str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a
                    for a in self.args
                ),
            ]
        )


def jobs_for(quick: bool, base_src: str | None = None) -> list[Job]:
    def script(name: str) -> str:
        return str(BENCH / name)

    base = ["--compare-src", base_src] if base_src else []

    q = ["--quick"] if quick else []
    jobs = [
        Job("sse_codec", [script("sse_codec.py"), *(["--events", "50000"] if quick else [])], 300),
        Job("append", [script("append.py"), *q], 900),
        Job("redis_append", [script("redis_append.py"), *q], 900),
        Job(
            "capture",
            [
                script("capture.py"),
                "--lines",
                "100000" if quick else "1000000",
                "--reps",
                "1" if quick else "3",
            ],
            1800,
        ),
        Job("worker_failover", [script("worker_failover.py"), *q], 900),
        Job("durable", [script("durable.py"), *q], 1200),
        Job(
            "http_append",
            [script("http_append.py"), *base, *(["--duration", "3"] if quick else [])],
            900,
        ),
    ]
    sizes = FANOUT_QUICK if quick else FANOUT_FULL
    for n in sizes:
        args = [script("fanout.py"), "--subscribers", str(n)]
        if quick:
            args += ["--duration", "3", "--warmup", "1"]
        if n != max(sizes):  # resume is measured once, in the largest run
            args.append("--no-resume")
        else:  # the base tree's CPU per delivery, same run (issue 17)
            args += base
        jobs.append(Job(f"fanout_{n}", args, 900))
    for n in () if quick else STRESS_FULL:
        args = [script("fanout.py"), "--subscribers", str(n), "--rate", str(STRESS_RATE)]
        jobs.append(Job(f"fanout_{n}_stress", [*args, "--no-resume"], 900))
    streams = 100 if quick else STREAMS
    args = [script("fanout.py"), "--subscribers", str(streams), "--streams", str(streams)]
    args += ["--rate", str(STREAMS_RATE), "--no-resume"]
    if quick:
        args += ["--duration", "3", "--warmup", "1"]
    jobs.append(Job("fanout_streams", args, 900))
    if not quick:  # serve --processes 2 against one process (issue 17)
        args = [script("fanout.py"), "--subscribers", "1000", "--rate", str(STRESS_RATE)]
        args += ["--no-resume", "--skip-baseline", "--compare-processes", "2"]
        jobs.append(Job("processes_fanout", args, 900))
        # The same with the servers pinned to CPU 0 and the generator to the rest, so the
        # server is the bottleneck: the ratio is the efficiency of 2 processes on one core.
        jobs.append(Job("processes_pinned", [*args, "--server-cpus", "0"], 900))
    return jobs


def run_job(job: Job) -> None:
    print(f"== {job.name}: {job.command}", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [PY, *job.args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=job.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        job.error = f"timed out after {job.timeout:g} s"
        return
    finally:
        job.seconds = time.monotonic() - start
    if proc.returncode != 0:
        job.error = f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        return
    try:
        job.result = json.loads(proc.stdout)
    except ValueError:
        job.error = f"no JSON on stdout: {proc.stdout.strip()[-500:]!r}"
    print(f"   done in {job.seconds:.0f} s{' (FAILED)' if job.error else ''}", file=sys.stderr)


# -- figures ---------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    value: Any
    baseline: Any = None
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    unit: str = ""


@dataclass
class Table:
    title: str
    note: str = ""
    rows: list[Row] = field(default_factory=list)
    error: str | None = None
    command: str = ""


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}" if value else "0"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def dig(obj: Any, *path: str | int) -> Any:
    for key in path:
        if obj is None:
            return None
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def ratio_row(
    figure: str, value: Any, baseline: Any, *, minimum: float, unit: str = "events/s"
) -> Row:
    r = value / baseline if isinstance(value, int | float) and baseline else None
    return Row(
        figure,
        value,
        baseline,
        round(r, 3) if r is not None else None,
        f"≥ {minimum:.0%} of baseline",
        None if r is None else r >= minimum,
        unit,
    )


def table_append(job: Job) -> Table:
    t = Table("Append throughput (EventLog API, in-process)", command=job.command)
    t.note = (
        "Baseline: plain `sqlite3` `executemany` of the same rows into a fresh file with the "
        "backend's schema and pragmas, interleaved with the backend runs (medians). Target "
        "(issue 2): batched appends ≥ 50 % of the raw engine rate; a follower in another process "
        "sees an append within 100 ms."
    )
    res = job.result or {}
    for name, backend in (res.get("backends") or {}).items():
        for label, entry in (dig(backend, "append") or {}).items():
            if isinstance(entry, dict) and "events_per_s" in entry:
                t.rows.append(
                    Row(
                        f"{name}: {label.replace('_', ' ')}", entry["events_per_s"], unit="events/s"
                    )
                )
        for label, entry in (dig(backend, "vs_raw_sqlite") or {}).items():
            row = ratio_row(
                f"{name}: {label.replace('_', ' ')} vs raw sqlite3",
                entry.get("backend_events_per_s"),
                entry.get("raw_events_per_s"),
                minimum=0.5,
            )
            if label == "single_sequential":  # one commit per event: no target set
                row.target, row.ok = "", None
            t.rows.append(row)
        follow = dig(backend, "follow") or {}
        for where, stats in follow.items():
            if isinstance(stats, dict) and "p99_ms" in stats:
                cross = where == "cross_process"
                p99 = stats["p99_ms"]
                t.rows.append(
                    Row(
                        f"{name}: append → follower ({where.replace('_', ' ')}) p50 / p99",
                        f"{fmt(stats['p50_ms'])} / {fmt(p99)}",
                        unit="ms",
                        target="p99 < 100 ms" if cross else "",
                        ok=(p99 < 100) if cross else None,
                    )
                )
    return t


def table_redis_append(job: Job) -> Table:
    t = Table("Redis append throughput", command=job.command)
    res = job.result or {}
    t.note = (
        f"Server: {dig(res, 'env', 'server')}. Baseline: redis-py pipelined `XADD` of the same "
        "entries (one round trip per batch), interleaved; `redis-benchmark -P` XADD for scale. "
        "Target (issue 3): batched append ≥ 50 % of raw pipelined XADD."
    )
    for label, entry in (dig(res, "redis", "vs_raw_xadd") or {}).items():
        row = ratio_row(
            f"{label.replace('_', ' ')} vs raw XADD",
            entry.get("backend_events_per_s"),
            entry.get("raw_xadd_events_per_s"),
            minimum=0.5,
        )
        if label == "single_sequential":
            row.target, row.ok = "", None
        t.rows.append(row)
        if "redis_benchmark_xadd_per_s" in entry:
            t.rows.append(
                Row(
                    f"{label.replace('_', ' ')} vs redis-benchmark",
                    entry["backend_events_per_s"],
                    entry["redis_benchmark_xadd_per_s"],
                    entry.get("ratio_vs_redis_benchmark"),
                    unit="events/s",
                )
            )
    follow = dig(res, "redis", "follow") or {}
    for where, stats in follow.items():
        if isinstance(stats, dict) and "p99_ms" in stats:
            t.rows.append(
                Row(
                    f"append → follower ({where.replace('_', ' ')}) p50 / p99",
                    f"{fmt(stats['p50_ms'])} / {fmt(stats['p99_ms'])}",
                    unit="ms",
                )
            )
    mem = dig(res, "redis", "memory")
    if mem:
        t.rows.append(
            Row("Redis memory per stored event", mem.get("bytes_per_event"), unit="bytes")
        )
    return t


def table_capture(job: Job) -> Table:
    res = job.result or {}
    t = Table(
        f"Subprocess capture ({fmt(res.get('lines'))} lines of 80 bytes)", command=job.command
    )
    t.note = (
        "A child prints the lines; `run_process` captures them and the runs executor's own "
        "sink (`output_sink`: runs of pre-encoded events through `append_encoded`, 1,000 events "
        "per append) stores them in SQLite as stdout events; every stored line is checked "
        "afterwards. Baseline: plain `sqlite3` `executemany` of the same rows (5,000 per "
        "transaction), same run, interleaved (medians). Target (issue 5): ≥ 50 % of the raw rate."
    )
    raw = res.get("raw_sqlite_rows_per_s")
    t.rows.append(
        ratio_row(
            "capture (the executor's sink)",
            res.get("capture_lines_per_s"),
            raw,
            minimum=0.5,
            unit="lines/s",
        )
    )
    if "capture_newevent_lines_per_s" in res:
        row = ratio_row(
            "capture, one `NewEvent` per line through `append`",
            res["capture_newevent_lines_per_s"],
            raw,
            minimum=0.5,
            unit="lines/s",
        )
        row.target, row.ok = "(variant)", None
        t.rows.append(row)
    stages = dig(res, "us_per_line", "stages") or {}
    if stages:
        t.rows.append(
            Row(
                "per line: split / encode / append (raw: insert)",
                f"{fmt(stages.get('split'))} / {fmt(stages.get('encode'))} / "
                f"{fmt(stages.get('append'))}",
                dig(res, "us_per_line", "raw_sqlite"),
                unit="µs",
            )
        )
    return t


def table_failover(job: Job) -> Table:
    t = Table("Worker failover and cancel (Redis, real worker processes)", command=job.command)
    t.note = (
        "A worker running a run is killed with SIGKILL; time from the kill to the run's stream "
        "closing with `lost`. Then a cancel requested from another connection, to the stream "
        "closing with `cancelled`. Targets (issue 5): within two leases; cancel within a second."
    )
    for entry in dig(job.result, "results") or []:
        lease = entry["lease_s"]
        detect = entry["detect_killed_worker_s"]
        t.rows.append(
            Row(
                f"lease {lease:g} s: kill → lost (median / max)",
                f"{fmt(detect['median'])} / {fmt(detect['max'])}",
                unit="s",
                target=f"≤ {2 * lease:g} s (two leases)",
                ok=detect["max"] <= 2 * lease,
            )
        )
        cancel = entry["cancel_to_end_s"]
        t.rows.append(
            Row(
                f"lease {lease:g} s: cancel → cancelled (median / max)",
                f"{fmt(cancel['median'])} / {fmt(cancel['max'])}",
                unit="s",
                target="≤ 1 s",
                ok=cancel["max"] <= 1.0,
            )
        )
    return t


def table_codec(job: Job) -> Table:
    res = job.result or {}
    t = Table("SSE codec (micro-benchmark, one core)", command=job.command)
    size = res.get("frame_bytes_avg")
    t.note = f"{fmt(res.get('events'))} frames of about {size} bytes. No target; for scale."
    for key, label, unit in (
        ("encode_events_per_s", "encode (one-line JSON, epoch:id ids)", "events/s"),
        ("encode_multiline_events_per_s", "encode (multi-line data)", "events/s"),
        ("decode_events_per_s", "decode, 64 KiB chunks", "events/s"),
        ("decode_mb_per_s", "decode, 64 KiB chunks", "MB/s"),
        ("decode_1k_chunks_mb_per_s", "decode, 1 KiB chunks", "MB/s"),
    ):
        t.rows.append(Row(label, res.get(key), unit=unit))
    return t


def table_durable(job: Job) -> Table:
    """runstream next to the Node reference Durable Streams server (bench/durable.py)."""
    res = job.result or {}
    servers = res.get("servers") or {}
    t = Table("Durable Streams: runstream vs the Node reference server", command=job.command)
    t.note = (
        f"Reference: npm {dig(res, 'tools', 'reference')}; append load by autocannon "
        f"{dig(res, 'tools', 'autocannon')} (32 connections, one message per POST). Pairs: "
        "runstream memory vs reference memory, runstream SQLite (synchronous=full) vs reference "
        "file-backed. Goal (issue 16): runstream ahead on each."
    )
    pairs = (
        ("memory", "runstream-memory", "ref-memory"),
        ("SQLite vs file", "runstream-sqlite", "ref-file"),
    )
    for label, ours, ref in pairs:
        a, b = servers.get(ours) or {}, servers.get(ref) or {}
        for figure, path, higher, unit in (
            ("append", ("append", "requests_per_s"), True, "req/s"),
            ("catch-up of 10,000 messages", ("catch_up_10k_ms",), False, "ms"),
            ("SSE fan-out to 1,000 readers", ("fanout", "deliveries_per_s"), True, "deliveries/s"),
            ("SSE fan-out p99", ("fanout", "latency_ms_p99"), False, "ms"),
        ):
            value, base = dig(a, *path), dig(b, *path)
            ok = None
            if isinstance(value, int | float) and isinstance(base, int | float) and base:
                ok = value > base if higher else value < base
            ratio = round(value / base, 3) if ok is not None else None
            t.rows.append(Row(f"{label}: {figure}", value, base, ratio, "ahead", ok, unit))
    return t


def fanout_results(
    jobs: Sequence[Job], *, stress: bool = False
) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for job in jobs:
        if is_fanout(job, stress=stress) and job.result:
            out.append((int(job.name.split("_")[1]), job.result))
    return sorted(out)


def fanout_rate(jobs: Sequence[Job], stress: bool) -> float:
    for _, res in fanout_results(jobs, stress=stress):
        return float(dig(res, "config", "rate") or 0)
    return 0.0


def is_fanout(job: Job, *, stress: bool) -> bool:
    """One-stream fan-out jobs (``fanout_<n>``, ``fanout_<n>_stress``)."""
    if job.name == "fanout_streams" or not job.name.startswith("fanout_"):
        return False
    return job.name.endswith("_stress") == stress


def deliveries_row(
    label: str, rs: dict[str, Any], bl: dict[str, Any], *, min_ratio: float | None = None
) -> Row:
    """Deliveries/s of both servers; with ``min_ratio``, the target runstream ≥ that × baseline."""
    rs_d, bl_d = rs.get("deliveries_per_s"), bl.get("deliveries_per_s")
    row = Row(label, rs_d, bl_d, round(rs_d / bl_d, 2) if rs_d and bl_d else None)
    if min_ratio is not None:
        row.target = f"≥ {min_ratio:g}× baseline"
        row.ok = (rs_d >= min_ratio * bl_d) if rs_d is not None and bl_d else None
    return row


def latency_row(label: str, rs: dict[str, Any], bl: dict[str, Any], *, target: bool) -> Row:
    """p50 / p99 of both servers; with ``target``, runstream's p99 ≤ 1/5 of the baseline's."""
    p99, bp99 = dig(rs, "latency_ms", "p99"), dig(bl, "latency_ms", "p99")
    return Row(
        label,
        f"{fmt(dig(rs, 'latency_ms', 'p50'))} / {fmt(p99)}",
        f"{fmt(dig(bl, 'latency_ms', 'p50'))} / {fmt(bp99)}",
        round(p99 / bp99, 3) if p99 and bp99 else None,
        "p99 ≤ 1/5 of baseline" if target else "",
        (p99 <= bp99 / 5) if target and p99 and bp99 else None,
        "ms",
    )


def table_fanout_stress(jobs: Sequence[Job]) -> Table:
    fan = [j for j in jobs if is_fanout(j, stress=True)]
    t = Table(
        f"Fan-out under stress: {STRESS_RATE} events/s on one stream",
        command="; ".join(j.command for j in fan),
    )
    t.note = (
        f"The same bench with events published at {STRESS_RATE}/s (one POST each), more than "
        "the baseline can fan out, so deliveries/s is each server's capacity on this machine. "
        "Targets (issue 4), at 1,000 subscribers: deliveries/s ≥ 10× the baseline's with p99 "
        "≤ 1/5 of the baseline's. The offered figure is per server: the publisher keeps at "
        "most 64 POSTs in flight, so a server that answers POSTs late is offered less. The "
        "load generator counts every event on every connection and times every event on every "
        "k-th connection (about 100 of them); its own CPU share is listed so a generator "
        "bottleneck would show."
    )
    errors = [f"{j.name}: {j.error}" for j in fan if j.error]
    if errors:
        t.error = "; ".join(errors)
    for n, res in fanout_results(jobs, stress=True):
        rs, bl = res.get("runstream") or {}, res.get("baseline") or {}
        target = n == 1000
        offered = (
            f"{fmt(rs.get('offered_deliveries_per_s'))} / {fmt(bl.get('offered_deliveries_per_s'))}"
        )
        t.rows.append(
            deliveries_row(
                f"{n} subscribers: deliveries/s (offered {offered})",
                rs,
                bl,
                min_ratio=10 if target else None,
            )
        )
        t.rows.append(latency_row(f"{n} subscribers: end-to-end p50 / p99", rs, bl, target=target))
        t.rows.append(
            Row(
                f"{n} subscribers: CPU share of server / load generator",
                f"{fmt(rs.get('server_cpu_share_in_window'))} / "
                f"{fmt(rs.get('load_generator_cpu_share_in_window'))}",
                f"{fmt(bl.get('server_cpu_share_in_window'))} / "
                f"{fmt(bl.get('load_generator_cpu_share_in_window'))}",
                unit="cores",
            )
        )
    return t


def table_fanout_streams(job: Job) -> Table:
    res = job.result or {}
    streams = dig(res, "config", "streams") or STREAMS
    rate = dig(res, "config", "rate") or STREAMS_RATE
    t = Table(
        f"Many streams: {streams:,} streams × 1 SSE subscriber each (Redis)", command=job.command
    )
    t.note = (
        f"{rate:g} events/s in all, round robin over the streams (one POST each); the same "
        "servers and load generator as above. Here nothing is shared between subscribers, so "
        "this measures the cost of many quiet streams: one reader each, their wake-ups, the "
        "periodic reconciliation, keepalives. No target."
    )
    rs, bl = res.get("runstream") or {}, res.get("baseline") or {}
    offered = fmt(rs.get("offered_deliveries_per_s"))
    t.rows.append(deliveries_row(f"deliveries/s (offered {offered})", rs, bl))
    t.rows.append(latency_row("end-to-end p50 / p99", rs, bl, target=False))
    t.rows.append(
        Row(
            "server CPU share in the window",
            rs.get("server_cpu_share_in_window"),
            bl.get("server_cpu_share_in_window"),
            unit="cores",
        )
    )
    t.rows.append(
        Row(
            "memory per idle subscriber (with its stream's reader)",
            rs.get("memory_per_idle_subscriber_kb"),
            bl.get("memory_per_idle_subscriber_kb"),
            unit="KB",
        )
    )
    return t


def table_fanout(jobs: Sequence[Job]) -> Table:
    fan = [j for j in jobs if is_fanout(j, stress=False)]
    t = Table(
        "Fan-out: N SSE subscribers on one stream (Redis)",
        command="; ".join(j.command for j in fan),
    )
    t.note = (
        "Both servers are separate processes on the same private redis-server, driven by the same "
        "raw-asyncio load generator in the same run. Baseline: FastAPI + sse-starlette + one "
        "`XREAD BLOCK` loop per subscriber. A moderate rate (20 events/s), which the baseline "
        "too delivers, only late; the throughput targets are in the stress table below. Targets "
        "(issue 4) here: at 1,000 subscribers p99 ≤ 1/5 of the baseline's; memory per idle "
        "subscriber < 20 KB; resume of 10,000 missed events < 200 ms."
    )
    errors = [f"{j.name}: {j.error}" for j in fan if j.error]
    if errors:
        t.error = "; ".join(errors)
    for n, res in fanout_results(jobs):
        rs, bl = res.get("runstream") or {}, res.get("baseline") or {}
        offered = fmt(rs.get("offered_deliveries_per_s"))
        t.rows.append(deliveries_row(f"{n} subscribers: deliveries/s (offered {offered})", rs, bl))
        t.rows.append(
            latency_row(f"{n} subscribers: end-to-end p50 / p99", rs, bl, target=n == 1000)
        )
        mem, bmem = rs.get("memory_per_idle_subscriber_kb"), bl.get("memory_per_idle_subscriber_kb")
        t.rows.append(
            Row(
                f"{n} subscribers: memory per idle subscriber",
                mem,
                bmem,
                None,
                "< 20 KB" if n >= 100 else "",
                (mem < 20) if n >= 100 and mem is not None else None,
                "KB",
            )
        )
        if n == max(x for x, _ in fanout_results(jobs)):  # resume: once, from the largest run
            res_ms, bres_ms = dig(rs, "resume_10k_ms", "median"), dig(bl, "resume_10k_ms", "median")
            t.rows.append(
                Row(
                    "resume of 10,000 missed events (median)",
                    res_ms,
                    bres_ms,
                    None,
                    "< 200 ms",
                    res_ms < 200 if res_ms is not None else None,
                    "ms",
                )
            )
    return t


def table_hot_paths(by_name: dict[str, Job]) -> Table:
    """Issue 17: HTTP appends vs the Node reference, fan-out CPU, --processes."""
    t = Table("Hot paths: HTTP appends, fan-out CPU, processes (issue 17)")
    names = ("http_append", "fanout_1000", "processes_fanout", "processes_pinned")
    jobs = [by_name[n] for n in names if n in by_name]
    t.command = "; ".join(j.command for j in jobs)
    t.note = (
        "One event per POST, 32 connections (autocannon 9.0.0, 8 s after a 2 s warm-up), to each "
        "runstream backend and to the Durable Streams reference server `@durable-streams/server` "
        "0.3.7 in memory, same run; `base_*` rows (with `--base-src`) are the commit before "
        "issue 17's changes. Server CPU per request from /proc; the generator's share in cores. "
        "Fan-out CPU per delivery at 1,000 subscribers × 20 events/s against the base tree; "
        "`serve --processes 2` against one process at 500 events/s offered, free and with the "
        "servers pinned to one CPU (the generator on the other, so the server is the bottleneck: "
        "the ratio is the efficiency of 2 processes, and N free cores give about N times it). "
        "Targets (issue 17): "
        "SQLite ≥ 1.5× and memory ≥ 2× the reference's rate, Redis ≥ 0.8× SQLite; ≤ 12 ms server "
        "CPU per 1,000 deliveries with p99 ≤ 100 ms; 2 processes ≥ 1.6× one's capacity. "
        "The decisions block at the end of this page explains the results and the choices."
    )
    errors = [f"{j.name}: {j.error}" for j in jobs if j.error]
    if errors:
        t.error = "; ".join(errors)
    if "http_append" in by_name and by_name["http_append"].result:
        t.rows += hot_tables.http_append_rows(by_name["http_append"], Row)
    fan = by_name.get("fanout_1000")
    if fan is not None and fan.result and fan.result.get("runstream_base"):
        t.rows += hot_tables.fanout_cpu_rows(fan.result, Row)
    if "processes_fanout" in by_name and by_name["processes_fanout"].result:
        t.rows += hot_tables.processes_rows(by_name["processes_fanout"], Row)
    if "processes_pinned" in by_name and by_name["processes_pinned"].result:
        t.rows += hot_tables.processes_rows(by_name["processes_pinned"], Row, pinned=True)
    return t


# -- plots -----------------------------------------------------------------------------


def plot_fanout(jobs: Sequence[Job], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        (f"{fanout_rate(jobs, False):g} ev/s", fanout_results(jobs), "-"),
        (f"{STRESS_RATE} ev/s", fanout_results(jobs, stress=True), ":"),
    ]
    if not series[0][1]:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    for rate_label, data, line in series:
        if not data:
            continue
        ns = [n for n, _ in data]
        for side, label, marker, color in (
            ("runstream", "runstream", "o", "tab:blue"),
            ("baseline", "FastAPI + sse-starlette + XREAD", "s", "tab:orange"),
        ):
            d = [dig(r, side, "deliveries_per_s") for _, r in data]
            p = [dig(r, side, "latency_ms", "p99") for _, r in data]
            style = {"marker": marker, "linestyle": line, "color": color}
            name = f"{label}, {rate_label}"
            if any(v is not None for v in d):
                ax1.plot(ns, [v or float("nan") for v in d], label=name, **style)
            if any(v is not None for v in p):
                ax2.plot(ns, [v or float("nan") for v in p], label=name, **style)
        offered = [dig(r, "runstream", "offered_deliveries_per_s") for _, r in data]
        ax1.plot(
            ns,
            [v or float("nan") for v in offered],
            line,
            color="grey",
            label=f"offered, {rate_label}",
        )
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("SSE subscribers on one stream")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("deliveries / s")
    ax1.set_title("Throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 end-to-end latency (ms)")
    ax2.set_title("p99 latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_append(jobs: dict[str, Job], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, float | None]] = []  # label, runstream, raw engine
    append = jobs.get("append")
    for name, backend in (dig(append.result if append else None, "backends") or {}).items():
        for label, entry in (dig(backend, "vs_raw_sqlite") or {}).items():
            bars.append(
                (
                    f"{name}\n{label.replace('_', ' ')}",
                    entry["backend_events_per_s"],
                    entry["raw_events_per_s"],
                )
            )
        if not dig(backend, "vs_raw_sqlite"):
            for label in ("batch_100", "batch_1000"):
                v = dig(backend, "append", label, "events_per_s")
                if v:
                    bars.append((f"{name}\n{label.replace('_', ' ')}", v, None))
    redis = jobs.get("redis_append")
    for label, entry in (
        dig(redis.result if redis else None, "redis", "vs_raw_xadd") or {}
    ).items():
        bars.append(
            (
                f"redis\n{label.replace('_', ' ')}",
                entry["backend_events_per_s"],
                entry["raw_xadd_events_per_s"],
            )
        )
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(11, 4.2))
    xs = range(len(bars))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [b[1] for b in bars], width, label="runstream append")
    ax.bar(
        [x + width / 2 for x in xs],
        [b[2] or 0 for b in bars],
        width,
        label="raw engine (sqlite3 executemany / pipelined XADD)",
    )
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("events / s")
    ax.set_title("Append throughput per backend vs the raw engine, same run")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the document ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    redis_version = None
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        )
        redis_version = out.stdout.split()[2].removeprefix("v=") if out.stdout else None
    except OSError:
        pass
    import sqlite3

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "redis": redis_version,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def render_table(t: Table) -> list[str]:
    lines = [f"## {t.title}", ""]
    if t.command:
        lines += [f"`{t.command}`", ""]
    if t.note:
        lines += [t.note, ""]
    if t.error:
        lines += [f"**Failed in this run:** `{t.error[:600]}`", ""]
    if not t.rows:
        if not t.error:
            lines += ["(no figures)", ""]
        return lines
    lines += [
        "| figure | runstream | baseline (same run) | ratio | target | result |",
        "|---|---:|---:|---:|---|:---:|",
    ]
    for r in t.rows:
        result = "" if r.ok is None else ("pass" if r.ok else "**FAIL**")
        value = fmt(r.value, r.unit)
        base = fmt(r.baseline, r.unit) if r.baseline is not None else "–"
        ratio = f"{r.ratio:g}" if r.ratio is not None else "–"
        lines.append(f"| {r.figure} | {value} | {base} | {ratio} | {r.target} | {result} |")
    lines.append("")
    return lines


def write_doc(
    jobs: list[Job],
    quick: bool,
    started: dt.datetime,
    plots: dict[str, bool],
    info: dict[str, Any],
    only: Sequence[str] = (),
) -> None:
    by_name = {j.name: j for j in jobs}
    builders: list[tuple[str, Callable[[Job], Table]]] = [
        ("append", table_append),
        ("redis_append", table_redis_append),
        ("capture", table_capture),
        ("worker_failover", table_failover),
        ("sse_codec", table_codec),
        ("durable", table_durable),
    ]
    tables: list[Table] = []
    if any(is_fanout(j, stress=False) for j in jobs):
        tables.append(table_fanout(jobs))
    if any(is_fanout(j, stress=True) for j in jobs):
        tables.append(table_fanout_stress(jobs))
    if "fanout_streams" in by_name:
        streams_job = by_name["fanout_streams"]
        t = table_fanout_streams(streams_job)
        t.error = streams_job.error
        tables.append(t)
    for name, build in builders:
        job = by_name.get(name)
        if job is None:
            continue
        t = build(job)
        if job.error:
            t.error = job.error
        tables.append(t)
    hot = table_hot_paths(by_name)
    if hot.rows or hot.error:
        tables.insert(0, hot)
    verdicts = [r.ok for t in tables for r in t.rows if r.ok is not None]
    flags = "".join([" --quick" if quick else "", *(f" --only {o}" for o in only)])
    failed_benches = [j.name for j in jobs if j.error]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/run_all.py{flags}` — every figure below comes from that "
        "one run; do not edit by hand.",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC (took {sum(j.seconds for j in jobs) / 60:.1f} min)",
        f"- Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gb']} GB RAM, "
        f"load average at start {info['load_average']}",
        f"- Python {info['python']} on {info['platform']}; SQLite {info['sqlite']}; "
        f"redis-server {info['redis']}",
        f"- Targets met: {sum(1 for v in verdicts if v)} of {len(verdicts)}"
        + (f"; benches that failed to run: {', '.join(failed_benches)}" if failed_benches else ""),
        "",
        "The machine is a shared 2-core VM; other work was running at the same time, so absolute "
        "figures are noisy. Every comparison is against a baseline measured in the same run, "
        "interleaved where the bench allows, which is what the targets are about. Raw JSON of "
        "this run: `test-artifacts/bench/*.json` (not committed).",
        "",
    ]
    if plots.get("fanout"):
        lines += ["![fan-out: throughput and p99 against subscribers](img/bench-fanout.png)", ""]
    if plots.get("append"):
        lines += ["![append throughput per backend vs the raw engine](img/bench-append.png)", ""]
    for t in tables:
        lines += render_table(t)
    if hot.rows:
        lines += [hot_tables.DECISIONS]
    DOC.write_text("\n".join(lines).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every bench at its quick size")
    parser.add_argument("--only", action="append", default=[], help="run only these (prefix match)")
    parser.add_argument("--no-doc", action="store_true", help="print the results, write nothing")
    parser.add_argument(
        "--base-src",
        help="the src/ of an earlier checkout: measured too by the fan-out (1,000) and HTTP "
        "append benches, same run",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: rebuild the page from the last run's test-artifacts/bench/*.json",
    )
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    info = machine()
    jobs = [
        j
        for j in jobs_for(args.quick, args.base_src)
        if not args.only or any(j.name.startswith(o) for o in args.only)
    ]
    RAW.mkdir(parents=True, exist_ok=True)
    run_file = RAW / "run.json"  # when and where the last run was, for --render-only
    if args.render_only and run_file.exists():
        kept_run = json.loads(run_file.read_text())
        started = dt.datetime.fromisoformat(kept_run["started"])
        info = kept_run["machine"]
    elif not args.render_only:
        run_file.write_text(json.dumps({"started": started.isoformat(), "machine": info}))
    for job in jobs:
        raw = RAW / f"{job.name}.json"
        if args.render_only:
            if raw.exists():
                kept = json.loads(raw.read_text())
                job.result, job.error = kept["result"], kept["error"]
                job.seconds = kept["seconds"]
            else:
                job.error = "not in the last run"
            continue
        run_job(job)
        kept = {
            "command": job.command,
            "seconds": round(job.seconds, 1),
            "error": job.error,
            "result": job.result,
        }
        raw.write_text(json.dumps(kept, indent=2))
    if args.no_doc:
        print(json.dumps({j.name: j.result or j.error for j in jobs}, indent=2))
        return
    IMG.mkdir(parents=True, exist_ok=True)
    plots = {
        "fanout": plot_fanout(jobs, IMG / "bench-fanout.png"),
        "append": plot_append({j.name: j for j in jobs}, IMG / "bench-append.png"),
    }
    write_doc(jobs, args.quick, started, plots, info, args.only)
    print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    failed = [j.name for j in jobs if j.error]
    if failed:
        print(f"benches that failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
