"""``runstream serve --processes N``: N server processes sharing one port.

Each process is a whole server — its own event loop, backend connection, hub
and metrics — bound to the same address with ``SO_REUSEPORT``, so the kernel
spreads new connections over them (by the connection's address hash). The
parent only reserves the port (a bound, never listening socket: it resolves
port 0 and holds the address while children restart), starts the children
(``spawn``: nothing of the parent's state is shared), forwards ``SIGTERM`` /
``SIGINT`` and stops them all if one exits on its own. A parent that is killed
takes its children with it (``PR_SET_PDEATHSIG`` on Linux), as one crashed
process would: nothing is left serving on the port.

What makes that correct:

* **Streams.** A subscriber connected to one process sees events appended
  through another because every engine wakes followers across processes:
  SQLite through the writer's ``PRAGMA data_version`` probe (at most
  ``POLL_INTERVAL`` late while idle), Redis through its pub/sub wake-ups.
  ``memory://`` keeps streams inside one process, so it refuses ``N > 1``.
* **Runs.** Only process 0 (the *primary*) runs in-process workers (the
  SQLite pool, with its recovery of runs a dead process left ``running``, or
  the in-process Redis worker when ``workers`` is set): the configured
  ``workers`` and per-task concurrency limits stay those of one pool. The
  others serve the API with ``workers = 0``; a run they create is queued in
  the shared store and the primary's pool takes it when the run's
  announcement on the runs feed wakes it (and on its periodic rescan). On
  Redis every process queues runs and runs the dispatch janitor, which is
  built for many concurrent instances (``XAUTOCLAIM`` hands a stale entry to
  one caller). The runs-feed repair sweep runs in every process: its
  appends are idempotent (producer ids), so concurrent sweeps write once.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from runstream.config import Settings
from runstream.errors import ConfigError

log = logging.getLogger("runstream.server")

__all__ = ["resolve_processes", "reuse_port_socket", "serve_processes"]

AppBuilder = Callable[[Settings], Any]
"""Builds the ASGI app for one process (a module-level function: it is pickled by name)."""


def resolve_processes(settings: Settings) -> int:
    """How many server processes ``settings`` ask for (``processes = 0``: one per core).

    Raises :class:`ConfigError` for more than one on ``memory://``.
    """
    wanted = settings.server.processes
    in_memory = settings.server.backend.split(":", 1)[0].lower() == "memory"
    if wanted == 0:
        return 1 if in_memory else max(1, os.cpu_count() or 1)
    if wanted > 1 and in_memory:
        raise ConfigError(
            f"server.processes = {wanted}: memory:// keeps streams inside one process, so other "
            "processes would not see them; use 1 process, or sqlite:// or redis:// to use more"
        )
    return wanted


def reuse_port_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (and listening if asked)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelt out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    # (with proto 0, keep-alive answers wait for delayed ACKs: ~40 ms each).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    """End this process at once if ``parent`` dies without stopping it (a crash, ``kill -9``).

    A parent that stops normally passes its signal on; one that is killed leaves its
    children serving on the port, orphaned, which a restarted server would join.
    Linux: ``PR_SET_PDEATHSIG``. Elsewhere a daemon thread watches the parent's pid.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # died before the call: nobody will signal us
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="runstream-parent-watch", daemon=True).start()


def _child(settings: Settings, index: int, build: AppBuilder, parent: int) -> None:
    """One server process: the primary (index 0) keeps the configured workers."""
    from runstream.server.serve import make_server

    _die_with_parent(parent)
    if index > 0:
        settings = settings.replace(workers=0)
    sock = reuse_port_socket(settings.server.host, settings.server.port)
    app = build(settings)
    server = make_server(app, settings, settle=True)
    asyncio.run(server.serve(sockets=[sock]))  # asyncio's loop, as serve() uses


def serve_processes(settings: Settings, count: int, build: AppBuilder) -> int:
    """Run ``count`` server processes on the settings' address until stopped; the exit code.

    Returns once every child has exited: after ``SIGTERM``/``SIGINT`` (passed
    on to the children, which shut down gracefully), or when one child exited
    by itself (the others are then stopped; the code is 1).
    """
    reserved = reuse_port_socket(settings.server.host, settings.server.port, listen=False)
    port = reserved.getsockname()[1]
    settings = settings.replace(port=port)
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_child,
            args=(settings, i, build, os.getpid()),
            name=f"runstream-serve-{i}",
            daemon=False,
        )
        for i in range(count)
    ]
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        for child in children:
            child.start()
        log.info("serving with %d processes on port %d", count, port)
        running = list(children)
        while running:
            multiprocessing.connection.wait([c.sentinel for c in running])
            for child in [c for c in running if c.exitcode is not None]:
                running.remove(child)
                if not stopping:
                    log.error(
                        "server process %s exited with %s; stopping the others",
                        child.name,
                        child.exitcode,
                    )
                    code = 1
                    stop(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.exitcode is None and child.pid is not None:
                child.kill()
                child.join()
        reserved.close()
    return code
