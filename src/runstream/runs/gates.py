"""Resource gates: what the machine must have free before a run starts.

A :class:`Gate` holds minimums (free memory, free disk) and a maximum (load
per CPU). ``[gates]`` sets one for every run, a task's ``gate`` table adds its
own (the stricter value wins). The :class:`~runstream.runs.scheduler.Scheduler`
asks :meth:`Gates.reason` before it starts a job: a reason means the gate is
closed, the run stays ``queued``, and the reason is written to its record
(``extra["waiting"]``, shown by the API, the CLI and the web page) by
:class:`WaitNotes`. The scheduler looks again every ``interval`` seconds and
when a slot frees up; the run starts as soon as the gate opens.

The probe (:data:`ResourceProbe`) is injectable, so tests open and close a
gate without loading the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from runstream.backends.space import format_bytes
from runstream.errors import ConfigError, RunNotFound, RunstreamError

__all__ = [
    "WAITING_KEY",
    "Gate",
    "Gates",
    "ResourceProbe",
    "Resources",
    "WaitNotes",
    "closed_reason",
    "gates_from_settings",
    "system_resources",
]

log = logging.getLogger("runstream.runs")

WAITING_KEY = "waiting"
"""The ``extra`` key holding why a queued run has not started."""

_GATE_KEYS = ("min_free_memory", "min_free_disk", "max_load")


@dataclass(frozen=True, slots=True)
class Resources:
    """One reading of the machine: ``None`` for what could not be measured."""

    free_memory: int | None = None
    free_disk: int | None = None
    load: float | None = None
    """1-minute load average per CPU."""


ResourceProbe = Callable[[], Resources]


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def system_resources(path: str = ".") -> Resources:
    """Free memory (``MemAvailable``), free disk at ``path`` and load per CPU, now."""
    try:
        disk: int | None = shutil.disk_usage(path).free
    except OSError:
        disk = None
    try:
        load: float | None = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = None
    return Resources(_mem_available(), disk, load)


@dataclass(frozen=True, slots=True)
class Gate:
    """Minimum free memory and disk (bytes), maximum load per CPU; ``None`` = not checked."""

    min_free_memory: int | None = None
    min_free_disk: int | None = None
    max_load: float | None = None

    @property
    def empty(self) -> bool:
        return self.min_free_memory is None and self.min_free_disk is None and self.max_load is None

    def stricter(self, other: Gate) -> Gate:
        """The gate that is closed whenever either of the two is."""

        def high(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else max(a, b)

        load = (
            other.max_load
            if self.max_load is None
            else self.max_load
            if other.max_load is None
            else min(self.max_load, other.max_load)
        )
        return Gate(
            high(self.min_free_memory, other.min_free_memory),
            high(self.min_free_disk, other.min_free_disk),
            load,
        )

    @classmethod
    def from_config(cls, where: str, table: Any) -> Gate:
        """Parse a ``gate = {min_free_memory = ..., ...}`` table; :class:`ConfigError` if bad."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: gate must be a table ({', '.join(_GATE_KEYS)})")
        unknown = set(table) - set(_GATE_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown gate key(s) {sorted(unknown)}; known: {list(_GATE_KEYS)}"
            )
        values: dict[str, Any] = {}
        for key in ("min_free_memory", "min_free_disk"):
            value = table.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ConfigError(f"{where}: gate.{key} must be a number of bytes >= 0")
            values[key] = value
        load = table.get("max_load")
        if load is not None and (
            isinstance(load, bool) or not isinstance(load, int | float) or not load > 0
        ):
            raise ConfigError(f"{where}: gate.max_load must be a number > 0 (load per CPU)")
        values["max_load"] = None if load is None else float(load)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _GATE_KEYS if getattr(self, key) is not None}


def closed_reason(gate: Gate, now: Resources) -> str | None:
    """Why ``gate`` is closed for the reading ``now`` (``None``: open). Pure.

    What could not be measured does not close a gate.
    """
    reasons: list[str] = []
    memory, need_memory = now.free_memory, gate.min_free_memory
    if need_memory is not None and memory is not None and memory < need_memory:
        reasons.append(f"free memory {format_bytes(memory)} < {format_bytes(need_memory)}")
    disk, need_disk = now.free_disk, gate.min_free_disk
    if need_disk is not None and disk is not None and disk < need_disk:
        reasons.append(f"free disk {format_bytes(disk)} < {format_bytes(need_disk)}")
    if gate.max_load is not None and now.load is not None and now.load > gate.max_load:
        reasons.append(f"load {now.load:.2f} per CPU > {gate.max_load:.2f}")
    return "; ".join(reasons) or None


class Gates:
    """The global gate plus each task's, against one probe.

    ``gates.reason(task_gate)`` is the question the scheduler asks before a start.
    """

    def __init__(
        self,
        default: Gate | None = None,
        *,
        probe: ResourceProbe = system_resources,
        interval: float = 5.0,
    ) -> None:
        if interval <= 0:
            raise ConfigError("gates.interval must be > 0")
        self.default = default or Gate()
        self.probe = probe
        self.interval = interval

    def gate_for(self, task_gate: Gate | None) -> Gate:
        return self.default if task_gate is None else self.default.stricter(task_gate)

    def reason(self, task_gate: Gate | None) -> str | None:
        """Why a run with ``task_gate`` may not start now, or ``None`` if it may."""
        gate = self.gate_for(task_gate)
        if gate.empty:
            return None
        try:
            now = self.probe()
        except Exception as exc:  # a broken probe must not stop every run
            log.warning("resource probe failed (%s); gates are open", exc)
            return None
        return closed_reason(gate, now)


def gates_from_settings(settings: Any, tasks: Iterable[Any]) -> Gates | None:
    """The :class:`Gates` of ``settings.gates`` (a :class:`~runstream.config.Settings`) and
    the tasks' own ``gate`` tables; ``None`` when nothing is gated."""
    table = settings.gates
    default = Gate(table.min_free_memory, table.min_free_disk, table.max_load)
    if default.empty and all(getattr(t, "gate", None) is None for t in tasks):
        return None
    return Gates(default, interval=table.interval)


class _ExtraStore(Protocol):
    async def set_extra(self, run_id: str, key: str, value: Any, *, expect: Any = ...) -> Any: ...


class WaitNotes:
    """Writes why a queued run waits into its record (``extra["waiting"]``), in order per run.

    :meth:`note` is synchronous (the scheduler calls it); the write happens in a
    task. :meth:`clear` (awaited by the job before it runs) waits for those
    writes and removes the note, so a started run never shows a stale reason.
    """

    def __init__(self, store: _ExtraStore) -> None:
        self.store = store
        self._last: dict[str, asyncio.Task[None]] = {}

    def note(self, run_id: str, reason: str | None) -> None:
        previous = self._last.get(run_id)
        self._last[run_id] = asyncio.get_running_loop().create_task(
            self._write(run_id, reason, previous), name=f"runstream-waiting:{run_id}"
        )

    async def _write(
        self, run_id: str, reason: str | None, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        try:
            await self.store.set_extra(run_id, WAITING_KEY, reason)
        except RunNotFound:
            pass
        except RunstreamError as exc:
            log.warning("run %s: could not record why it waits: %s", run_id, exc)

    async def clear(self, run_id: str) -> None:
        """Before a run starts: wait for its pending notes, then remove the note."""
        last = self._last.pop(run_id, None)
        if last is None:
            return
        with contextlib.suppress(Exception):
            await last
        await self._write(run_id, None, None)

    def forget(self, run_id: str) -> None:
        """The run will not start here (handed back, cancelled): drop its bookkeeping."""
        self._last.pop(run_id, None)
