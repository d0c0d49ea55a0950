"""``runstream worker``: execute queued runs from a Redis backend, on any host, any number of them.

The worker reads the same ``runstream.toml`` as the API servers (only its
``[tasks.*]`` and ``[server] backend`` matter here), takes runs from the Redis
queue, holds a lease on each while it runs, and settles runs of workers that
died (see :mod:`runstream.backends.redis.dispatch`).

Python tasks (``callable = "pkg.module:fn"``) are imported from the working
directory (and the usual ``sys.path``).

Signals: the first SIGTERM or SIGINT stops taking work and gives running runs
``--grace`` seconds to finish, after which they are cancelled (each child gets
SIGTERM, then SIGKILL after its task's grace) and recorded as ``cancelled``; a
second signal cancels them at once. The process exits 0 once every run it
took is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import click

from runstream.backends import engine_for
from runstream.backends.engine import Engine, WorkerSpec
from runstream.config import load_settings
from runstream.errors import BackendError, ConfigError, RunstreamError
from runstream.redact import mask_secrets
from runstream.runs.gates import gates_from_settings
from runstream.runs.tasks import TaskRegistry

DEFAULT_CONCURRENCY = 4
READY_LINE = "runstream worker {name} ready"
"""Printed to stderr once the worker listens for runs (scripts and tests wait for it)."""


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="runstream.toml declaring the [tasks.*] to run "
    "(default: $RUNSTREAM_CONFIG or ./runstream.toml).",
)
@click.option(
    "--backend",
    default=None,
    help="redis://host:port/db (default: [server] backend or $RUNSTREAM_BACKEND).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Runs executed at once by this worker.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Seconds a run's claim survives without a heartbeat (default 30). A dead "
    "worker's runs are detected about 1.5 leases after its last heartbeat.",
)
@click.option(
    "--name",
    default=None,
    help="Consumer name (default <host>-<pid>). Reuse a name across restarts to settle "
    "what the previous process left at once.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=None,
    help="On SIGTERM/SIGINT, seconds running runs may take to finish before they are cancelled "
    "[default: server.run_grace, 10].",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Logging level (default: [server] log_level).",
)
def worker(
    config_path: str | None,
    backend: str | None,
    concurrency: int,
    lease: float | None,
    name: str | None,
    grace: float | None,
    log_level: str | None,
) -> None:
    """Execute queued runs from a Redis backend (any number of workers, any hosts)."""
    try:
        settings = load_settings(config_path, backend=backend)
        url = settings.server.backend
        engine = engine_for(url)
        if engine.new_worker is None:
            raise ConfigError(
                f"runstream worker needs a backend with a shared run queue, such as redis:// "
                f"(got {mask_secrets(url)!r}); with {engine.name}, runs execute inside "
                "`runstream serve` (--workers N)"
            )
        registry = TaskRegistry.from_config(settings.tasks)
        run_grace = settings.server.run_grace if grace is None else grace
        gates = gates_from_settings(settings, registry)
        spec = WorkerSpec(concurrency, run_grace, name=name, lease=lease, gates=gates)
    except RunstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    logging.basicConfig(
        level=(log_level or settings.server.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not len(registry):
        click.echo("warning: no [tasks.*] declared; every run taken will fail", err=True)
    # Python tasks (callable = "pkg.module:fn") import from the working directory, as
    # with `python -m`; the console script alone would not look there.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        asyncio.run(_work(url, engine, registry, spec))
    except RunstreamError as exc:
        raise click.ClickException(str(exc)) from exc


async def _work(url: str, engine: Engine, registry: TaskRegistry, spec: WorkerSpec) -> None:
    assert engine.new_worker is not None
    store = engine.open_run_store(url)
    log = engine.open_log(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    runner = engine.new_worker(store, log, registry, spec)

    def on_signal(signum: int) -> None:
        if stop.is_set():
            runner.cancel_all(f"worker {runner.name} was asked to stop again")
            return
        logging.getLogger("runstream.worker").info(
            "%s received: no new runs; running ones get %gs",
            signal.Signals(signum).name,
            spec.shutdown_grace,
        )
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    async def announce() -> None:
        await runner.ready.wait()
        tasks = ", ".join(registry.names()) or "none"
        click.echo(
            READY_LINE.format(name=runner.name) + f" (tasks: {tasks}; {runner.describe()})",
            err=True,
        )

    try:
        async with log:
            try:
                await store.start()
            except BackendError as exc:
                # Not fatal: the worker waits for Redis (e.g. both started by one compose file).
                logging.getLogger("runstream.worker").warning("%s; waiting for it", exc)
            announcer = asyncio.create_task(announce())
            try:
                await runner.run(stop)
            finally:
                announcer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await announcer
    finally:
        await store.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
