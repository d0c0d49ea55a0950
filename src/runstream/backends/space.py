"""The free-disk check in front of every write: refuse before the disk is full.

A database that runs out of disk mid-transaction is rolled back by SQLite, but
the process is then refused everything, including the deletes that would free
space. :class:`SpaceGuard` refuses appends and new runs earlier, while
``min_free_disk`` bytes are still free, with
:class:`~runstream.errors.InsufficientStorage` (HTTP 507); nothing is written,
and writes resume by themselves once space returns.

The probe (free bytes of a directory) is injectable: tests open and close the
guard without filling a disk. Its answer is cached for ``interval`` seconds so
the check costs appends almost nothing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

from runstream.errors import InsufficientStorage

__all__ = ["DEFAULT_CHECK_INTERVAL", "DiskProbe", "SpaceGuard", "format_bytes", "free_disk"]

DiskProbe = Callable[[str], int]
"""Free bytes available at a path."""

DEFAULT_CHECK_INTERVAL = 1.0
"""Seconds a free-space reading is trusted before the probe is asked again."""


def free_disk(path: str) -> int:
    """Bytes available to this user on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def format_bytes(value: float) -> str:
    """``1288490188`` → ``"1.2 GiB"`` (for messages)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class SpaceGuard:
    """Refuses writes while the free space at ``path`` is below ``min_free`` bytes.

    :meth:`check` raises :class:`InsufficientStorage`; ``refusals`` counts them
    (the ``runstream_storage_refusals`` metric).
    """

    def __init__(
        self,
        path: str,
        min_free: int,
        *,
        probe: DiskProbe = free_disk,
        interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.min_free = min_free
        self.probe = probe
        self.interval = interval
        self.clock = clock
        self.refusals = 0
        self._checked_at: float | None = None
        self._free = 0

    def free(self) -> int:
        """Free bytes at ``path`` (cached for ``interval`` seconds)."""
        now = self.clock()
        if self._checked_at is None or now - self._checked_at >= self.interval:
            try:
                self._free = self.probe(self.path)
            except OSError:
                self._free = self.min_free  # cannot tell: do not refuse on a probe failure
            self._checked_at = now
        return self._free

    def invalidate(self) -> None:
        """Forget the cached reading: the next :meth:`check` asks the probe."""
        self._checked_at = None

    def check(self) -> None:
        """Raise :class:`InsufficientStorage` (and count it) if space is below the minimum."""
        free = self.free()
        if free < self.min_free:
            self.refusals += 1
            raise InsufficientStorage(
                f"only {format_bytes(free)} free at {self.path!r}, below "
                f"[storage] min_free_disk = {format_bytes(self.min_free)}: nothing was "
                "written; free space (or lower the threshold), then retry"
            )
