"""``runstream run``: run a command now, or submit a declared task and follow it.

``runstream run [OPTIONS] -- CMD [ARGS...]``
    Runs CMD in this process as a recorded run of task ``cmd`` (params
    ``{"argv": [...]}``) in the local store (``--backend``, default
    ``RUNSTREAM_BACKEND`` or ``sqlite:///./.runstream/runstream.db``). Its
    output goes through the run's stream and is printed live, stdout to stdout
    and stderr to stderr, colours and partial lines as written. The CLI exits
    with CMD's exit code (128+N if signal N killed it, 127 if it was not
    found). The first Ctrl-C cancels gracefully (SIGTERM to CMD's process
    group, SIGKILL after ``--grace`` seconds); a second Ctrl-C kills it at
    once. A cancelled run exits 130, a timed out one 124. ``runstream ls`` and
    ``show`` see the run afterwards, and ``runstream cancel RUN_ID`` from
    another terminal stops it like a Ctrl-C.

``runstream run [OPTIONS] TASK [--param k=v ...]``
    Submits a declared task to a server (``--server``) and follows it like
    ``tail``, exiting with the run's exit code. The first Ctrl-C asks the
    server to cancel the run and keeps showing it to its end; a second one
    stops following. ``--detach`` prints the run id and returns at once.

The command is passed as an argv (no shell); CMD's environment is this
process's, minus ``RUNSTREAM_*`` variables (they may hold tokens).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from runstream.backends.base import EventLog
from runstream.cli.render import (
    EXIT_BROKEN_PIPE,
    EXIT_CANCELLED,
    Renderer,
    RunOutcome,
    error_console,
    print_error,
    run_command,
)
from runstream.cli.runs_cmds import (
    DEFAULT_SERVER_URL,
    backend_option,
    local_runs,
    resolve_backend,
    server_options,
)
from runstream.cli.tail import follow_remote, on_interrupt, outcome_from_run
from runstream.errors import RunstreamError, ValidationError
from runstream.redact import mask_secrets
from runstream.runs.model import RunRecord
from runstream.runs.tasks import DEFAULT_GRACE, TaskSpec

__all__ = ["COMMAND_TASK", "run"]

COMMAND_TASK = "cmd"
"""Task name of runs recorded by ``runstream run -- CMD``."""

_ARGV_KEY = "runstream.run.argv"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_FOLLOW_END_TIMEOUT = 5.0
"""After the command ended with its stream left open, how long to keep showing output."""


@dataclass(frozen=True, slots=True)
class _LiteralCommand(TaskSpec):
    """The task of ``run -- CMD``: the recorded ``argv`` param, verbatim.

    A declared task substitutes ``"{name}"`` items; a user's own command line
    must reach the program exactly as typed, braces included.
    """

    def build_argv(self, params: Mapping[str, Any]) -> list[str]:
        argv = params.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValidationError("params.argv must be a non-empty list of strings", field="argv")
        return list(argv)


class _RunCommand(click.Command):
    """Splits the arguments at the first ``--``: what follows is the command to run."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta[_ARGV_KEY] = args[i + 1 :]
            args = args[:i]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[OPTIONS]", "(TASK | -- CMD [ARGS]...)"]


def _parse_params(items: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--param")
        params[key] = value
    return params


@click.command(cls=_RunCommand)
@click.argument("task", required=False)
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A task param (repeatable); the server converts it to the declared type.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Time limit of the run (ends timed_out, exit 124).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACE,
    show_default=True,
    metavar="SECONDS",
    help="-- CMD only: seconds between SIGTERM and SIGKILL when cancelled.",
)
@click.option("--detach", "-d", is_flag=True, help="TASK only: print the run id and return.")
@click.option("--json", "as_json", is_flag=True, help="TASK only: print events as JSON lines.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the run's output.")
@backend_option
@server_options(DEFAULT_SERVER_URL)
@click.pass_context
def run(
    ctx: click.Context,
    task: str | None,
    params: tuple[str, ...],
    timeout: float | None,
    grace: float,
    detach: bool,
    as_json: bool,
    quiet: bool,
    backend: str | None,
    server: str,
    token: str | None,
) -> None:
    """Run a command now (run -- CMD ARGS...), or a declared TASK on a server.

    \b
    runstream run -- python -u train.py --epochs 3
    runstream run hello --param name=Ada --server http://127.0.0.1:8787
    """
    argv: list[str] | None = ctx.meta.get(_ARGV_KEY)
    if argv is not None:
        if task is not None:
            raise click.UsageError(f"give either TASK ({task!r}) or -- CMD ARGS..., not both")
        if not argv:
            raise click.UsageError("nothing to run after --")
        if params or detach or as_json:
            raise click.UsageError("--param, --detach and --json apply to TASK runs only")
        run_command(_run_local(argv, resolve_backend(backend), timeout, grace, quiet))
    if task is None:
        raise click.UsageError(
            "give a declared TASK to submit to a server, or -- CMD ARGS... to run a command now"
        )
    run_command(
        _run_remote(task, _parse_params(params), server, token, timeout, detach, as_json, quiet)
    )


# -- run -- CMD --------------------------------------------------------------------------------


async def _run_local(
    argv: list[str], url: str, run_timeout: float | None, grace: float, quiet: bool
) -> int:
    from runstream.runs.executor import RunControl, execute_run
    from runstream.runs.lifecycle import Lifecycle
    from runstream.runs.model import new_run_id

    spec = _LiteralCommand(name=COMMAND_TASK, command=tuple(argv), grace=grace, inherit_env=True)
    record = RunRecord(
        id=new_run_id(),
        task=COMMAND_TASK,
        params={"argv": list(argv)},
        status="queued",
        created_at=time.time(),
        timeout=run_timeout,
    )
    console = error_console()
    # The output is shown as the command wrote it: only errors and the final
    # word on a cancel/timeout are added, on stderr.
    control = RunControl()
    renderer = Renderer(
        show_status=False,
        console=console,
        # `runstream run -- CMD | head`: the reader is gone, so stop CMD as a shell's
        # SIGPIPE would (gracefully here, and recorded).
        on_broken_pipe=lambda: control.cancel("stopped: the output's reader went away"),
    )
    executor: asyncio.Task[RunRecord] | None = None
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            control.cancel("cancelled by Ctrl-C")
            if not quiet:
                renderer.message(
                    f"[yellow]cancelling (SIGTERM, SIGKILL in {grace:g}s); "
                    "Ctrl-C again to kill now[/]"
                )
        elif executor is not None and not executor.done():
            # Cancelling the executor's task kills the process group with SIGKILL
            # at once; the executor still records the run as cancelled.
            executor.cancel()

    # The command runs in its own session, so a signal meant for runstream never
    # reaches it: SIGTERM (kill) and SIGHUP (terminal closed) stop it gracefully.
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(
            signum, control.cancel, f"cancelled: runstream received {signum.name}"
        )
    try:
        with on_interrupt(on_sigint):
            async with local_runs(url) as (store, log):
                await Lifecycle(store, log).create(record)
                if not quiet:
                    console.print(f"{record.id}", style="dim", highlight=False)
                follower = asyncio.create_task(_show(log.follow(record.id), renderer))
                executor = asyncio.create_task(
                    execute_run(record, spec, log, store, control=control)
                )
                try:
                    try:
                        final = await executor
                    except asyncio.CancelledError:
                        if not executor.cancelled():
                            raise
                        final = await store.get(record.id)
                    # Let the output catch up with the end of the run: all of it once the
                    # stream is closed (the follower then ends at the end event), else a
                    # bounded wait (the executor could not close it; its error is known).
                    closed = await _stream_closed(log, record.id)
                    await asyncio.wait({follower}, timeout=None if closed else _FOLLOW_END_TIMEOUT)
                finally:
                    if not follower.done():
                        follower.cancel()
                    await asyncio.wait({follower})
                if not follower.cancelled() and follower.exception() is not None:
                    print_error(f"showing the output failed: {follower.exception()}")
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    outcome = renderer.outcome
    if outcome is None or outcome.status != final.status:
        outcome = outcome_from_run(final.to_json())
    renderer.finish(outcome)
    if renderer.broken_pipe:
        return EXIT_BROKEN_PIPE
    _report_local_end(console, record.id, outcome, quiet)
    return outcome.process_exit_code


async def _stream_closed(log: EventLog, stream: str) -> bool:
    try:
        return (await log.info(stream)).closed
    except RunstreamError:
        return False


async def _show(items: Any, renderer: Renderer) -> None:
    async for item in items:
        renderer.item(item)


def _report_local_end(console: Any, run_id: str, outcome: RunOutcome, quiet: bool) -> None:
    """Say why the command did not simply exit: a shell would be silent about exit codes."""
    if outcome.status == "failed" and outcome.exit_code is None and outcome.signal is None:
        # The program never ran (not found, not executable, ...): always worth saying.
        print_error(outcome.error or "the command failed")
        return
    if quiet or outcome.status in ("succeeded", "failed"):
        return
    console.print(Renderer.status_line(outcome, label=run_id), highlight=False)


# -- run TASK ------------------------------------------------------------------------------


async def _run_remote(*args: Any) -> int:
    from runstream.cli.runs_cmds import server_hint

    with server_hint(args[2]):
        return await _submit_and_follow(*args)


async def _submit_and_follow(
    task: str,
    params: dict[str, str],
    server: str,
    token: str | None,
    run_timeout: float | None,
    detach: bool,
    as_json: bool,
    quiet: bool,
) -> int:
    from runstream.cli.runs_cmds import make_client

    console = error_console()
    async with make_client(server, token) as client:
        created = await client.create_run(task, params, timeout=run_timeout)
        run_id = str(created["id"])
        if detach:
            click.echo(run_id)
            return 0
        if not quiet and not as_json:
            shown = mask_secrets(server.rstrip("/"))
            console.print(f"{run_id}  {shown}/#/runs/{run_id}", style="dim")
        stop = asyncio.Event()
        renderer = Renderer(
            json_mode=as_json, show_status=not quiet, console=console, on_broken_pipe=stop.set
        )
        interrupts = 0
        cancelling: asyncio.Task[Any] | None = None

        def on_sigint() -> None:
            nonlocal interrupts, cancelling
            interrupts += 1
            if interrupts == 1:
                if not quiet and not as_json:
                    renderer.message(
                        "[yellow]cancelling the run; Ctrl-C again to stop following[/]"
                    )
                cancelling = asyncio.ensure_future(client.cancel_run(run_id))
            else:
                stop.set()

        with on_interrupt(on_sigint):
            outcome = await follow_remote(client, run_id, renderer, stop=stop)
        if cancelling is not None and cancelling.done() and not cancelling.cancelled():
            cancelling.exception()  # a failed cancel request shows in the run's status
    if renderer.broken_pipe:
        return EXIT_BROKEN_PIPE
    if outcome is None:
        renderer.finish(None)
        return EXIT_CANCELLED
    renderer.finish(outcome, label=run_id)
    return outcome.process_exit_code
