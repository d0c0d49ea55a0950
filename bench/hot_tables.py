"""run_all.py's tables for issue 17's hot paths: HTTP appends next to the Node reference
server, fan-out CPU per delivery against the base tree, and ``serve --processes``.

Kept apart from run_all.py (which imports it) so that file does not grow further.
``--base-src DIR`` of run_all.py (a checkout of the commit before the change, its
``src/``) makes the fan-out and append benches measure that tree too, in the same run.
"""

from __future__ import annotations

from typing import Any, Protocol


class _Job(Protocol):
    name: str
    result: dict[str, Any] | None
    error: str | None

    @property
    def command(self) -> str: ...


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float | int):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"
    return str(value)


def http_append_rows(job: _Job, row: Any) -> list[Any]:
    """Rows (run_all's ``Row``) for bench/http_append.py's result."""
    res = job.result or {}
    targets = res.get("targets") or {}
    node = _dig(targets, "node", "requests_per_s")
    goals = {"memory": 2.0, "sqlite": 1.5}
    rows = []
    for name, t in targets.items():
        rate = t.get("requests_per_s")
        base = name.startswith("base_")
        goal = None if base else goals.get(name)
        ratio = round(rate / node, 2) if rate and node and name != "node" else None
        rows.append(
            row(
                f"{name}: POSTs/s (server CPU per request, generator cores)",
                f"{_fmt(rate)} ({_fmt(t.get('server_cpu_ms_per_1k'))} µs, "
                f"{_fmt(t.get('generator_cpu_share'))})",
                _fmt(node) if name != "node" else None,
                ratio,
                f"≥ {goal:g}× Node" if goal else "",
                (ratio >= goal) if goal and ratio is not None else None,
            )
        )
    redis, sqlite = (
        _dig(targets, "redis", "requests_per_s"),
        _dig(targets, "sqlite", "requests_per_s"),
    )
    if redis and sqlite:
        r = round(redis / sqlite, 2)
        rows.append(
            row("redis vs sqlite POSTs/s", _fmt(redis), _fmt(sqlite), r, "≥ 0.8×", r >= 0.8)
        )
    return rows


def fanout_cpu_rows(result: dict[str, Any], row: Any) -> list[Any]:
    """CPU per delivery and p99 at 1,000 subscribers × 20 events/s, with the base tree's."""
    rs, base = result.get("runstream") or {}, result.get("runstream_base") or {}
    cpu, bcpu = (
        rs.get("server_cpu_ms_per_1k_deliveries"),
        base.get("server_cpu_ms_per_1k_deliveries"),
    )
    p99, bp99 = _dig(rs, "latency_ms", "p99"), _dig(base, "latency_ms", "p99")
    return [
        row(
            "1000 subscribers × 20/s: server CPU per 1,000 deliveries (base tree as baseline)",
            cpu,
            bcpu,
            round(cpu / bcpu, 2) if cpu and bcpu else None,
            "≤ 12 ms",
            cpu <= 12 if cpu is not None else None,
            "ms",
        ),
        row(
            "1000 subscribers × 20/s: p99 (base tree as baseline)",
            p99,
            bp99,
            round(p99 / bp99, 2) if p99 and bp99 else None,
            "≤ 100 ms",
            p99 <= 100 if p99 is not None else None,
            "ms",
        ),
    ]


def processes_rows(job: _Job, row: Any) -> list[Any]:
    """Fan-out capacity of ``serve --processes 2`` against one process, same run."""
    res = job.result or {}
    one, two = res.get("runstream") or {}, res.get("runstream_multi") or {}
    d1, d2 = one.get("deliveries_per_s"), two.get("deliveries_per_s")
    r = round(d2 / d1, 2) if d1 and d2 else None
    return [
        row(
            "1000 subscribers, 500 events/s offered: deliveries/s, 2 processes vs 1",
            d2,
            d1,
            r,
            "≥ 1.6×",
            r >= 1.6 if r is not None else None,
        ),
        row(
            "p50 / p99 latency, 2 processes vs 1",
            f"{_fmt(_dig(two, 'latency_ms', 'p50'))} / {_fmt(_dig(two, 'latency_ms', 'p99'))}",
            f"{_fmt(_dig(one, 'latency_ms', 'p50'))} / {_fmt(_dig(one, 'latency_ms', 'p99'))}",
            None,
            "",
            None,
            "ms",
        ),
        row(
            "CPU share of server / load generator, 2 processes vs 1",
            f"{_fmt(two.get('server_cpu_share_in_window'))} / "
            f"{_fmt(two.get('load_generator_cpu_share_in_window'))}",
            f"{_fmt(one.get('server_cpu_share_in_window'))} / "
            f"{_fmt(one.get('load_generator_cpu_share_in_window'))}",
            None,
            "",
            None,
            "cores",
        ),
    ]
