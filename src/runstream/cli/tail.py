"""``runstream tail RUN_ID``: follow a run's log to its end, through server restarts.

The SDK's follower does the reconnecting: it resumes after the last event it
delivered, so a server restart (or a dropped connection) neither loses nor
repeats a line. ``tail`` prints the output as ``runstream run`` does (see
:mod:`runstream.cli.render`), shows progress events as a bar when standard
error is a terminal, ends with a status line and exits with the run's exit
code (0, the command's code, 128+N for signal N, 124 timed out, 130
cancelled, 1 failed without a code or lost).

Ctrl-C stops following (exit 130); the run itself goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from runstream.cli.render import (
    EXIT_BROKEN_PIPE,
    EXIT_CANCELLED,
    Renderer,
    RunOutcome,
    run_command,
)
from runstream.cli.runs_cmds import (
    DEFAULT_SERVER_URL,
    backend_option,
    local_runs,
    resolve_backend,
    server_options,
)
from runstream.runs.lifecycle import FINISHED

if TYPE_CHECKING:
    from runstream.client import AsyncClient

__all__ = ["follow_local", "follow_remote", "on_interrupt", "outcome_from_run", "tail"]

_SIGNAL_IN_ERROR = re.compile(r"killed by signal \S+ \((\d+)\)")


def outcome_from_run(run: dict[str, Any]) -> RunOutcome:
    """A :class:`RunOutcome` from a run's JSON object (when its status events were not seen)."""
    error = run.get("error")
    sig: int | None = None
    if isinstance(error, str) and (m := _SIGNAL_IN_ERROR.search(error)):
        sig = int(m.group(1))
    from runstream.cli.runs_cmds import run_json_duration

    code = run.get("exit_code")
    return RunOutcome(
        status=str(run.get("status", "lost")),
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        signal=sig,
        error=error if isinstance(error, str) else None,
        duration=run_json_duration(run),
    )


@contextlib.contextmanager
def on_interrupt(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` on the event loop for each SIGINT (Ctrl-C) while inside the block."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, callback)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def follow_remote(
    client: AsyncClient,
    run_id: str,
    renderer: Renderer,
    *,
    after: int | str | None = None,
    stop: asyncio.Event | None = None,
) -> RunOutcome | None:
    """Show run ``run_id`` from ``after`` to its end; return how it ended.

    Returns ``None`` if ``stop`` was set before the end. Raises what the SDK's
    follower raises (:class:`RunNotFound`, :class:`RetriesExhausted`, ...).
    """
    # One plain request first: an unknown run or an unreachable server fails in
    # seconds with a clear message, instead of inside the follower's long retry budget
    # (meant for outages *during* a run).
    await client.get_run(run_id)
    async with client.follow_run(run_id, after, stop_event=stop) as follower:
        async for item in follower:
            renderer.item(item)
    outcome = renderer.outcome
    if outcome is None:
        if stop is not None and stop.is_set():
            return None
        # The server had nothing more to send (``after`` was already at the end).
        run = await client.get_run(run_id)
        return outcome_from_run(run) if run.get("status") in FINISHED else None
    if renderer.last_status.get("status") != outcome.status:
        # The final status event was before ``after`` (or the run was closed by
        # someone else, e.g. marked lost): the record has the details.
        outcome = outcome_from_run(await client.get_run(run_id))
    return outcome


async def follow_local(
    url: str,
    run_id: str,
    renderer: Renderer,
    *,
    after: str | None = None,
    stop: asyncio.Event | None = None,
) -> RunOutcome | None:
    """:func:`follow_remote` against the local store of backend ``url`` (no server)."""
    from runstream.protocol.cursor import parse_position

    position = parse_position(after)
    async with local_runs(url, create=False) as (store, log):
        await store.get(run_id)  # RunNotFound for an unknown id, before waiting on anything
        follow = log.follow(run_id, position)
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while True:
                step = asyncio.ensure_future(anext(follow))
                waiting = {step} if stopper is None else {step, stopper}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    return None
                try:
                    renderer.item(step.result())
                except StopAsyncIteration:
                    break
        finally:
            if stopper is not None:
                stopper.cancel()
            aclose = getattr(follow, "aclose", None)
            if aclose is not None:
                await aclose()
        outcome = renderer.outcome
        if outcome is not None and renderer.last_status.get("status") != outcome.status:
            outcome = outcome_from_run((await store.get(run_id)).to_json())
        return outcome


@click.command()
@click.argument("run_id")
@click.option(
    "--after",
    default=None,
    metavar="N",
    help="Start after event N (an id, <epoch>:<id>, or 'now'); default: the beginning.",
)
@click.option("--json", "as_json", is_flag=True, help="Print every event as a JSON line.")
@click.option("--quiet", "-q", is_flag=True, help="No status lines, only the run's output.")
@backend_option
@server_options(DEFAULT_SERVER_URL)
def tail(
    run_id: str,
    after: str | None,
    as_json: bool,
    quiet: bool,
    backend: str | None,
    server: str,
    token: str | None,
) -> None:
    """Follow a run's output until it ends; exit with the run's exit code.

    Talks to the server (--server, default $RUNSTREAM_URL or
    http://127.0.0.1:8787) and keeps following through server restarts. With
    --backend it reads the local store instead (no server needed).
    """

    async def main() -> int:
        stop = asyncio.Event()
        renderer = Renderer(json_mode=as_json, show_status=not quiet, on_broken_pipe=stop.set)
        with on_interrupt(stop.set):
            if backend is not None:
                outcome = await follow_local(
                    resolve_backend(backend), run_id, renderer, after=after, stop=stop
                )
            else:
                from runstream.cli.runs_cmds import make_client, server_hint

                with server_hint(server):
                    async with make_client(server, token) as client:
                        outcome = await follow_remote(
                            client, run_id, renderer, after=after, stop=stop
                        )
        if renderer.broken_pipe:
            return EXIT_BROKEN_PIPE
        if outcome is None:
            renderer.finish(None)
            if not quiet and not as_json:
                renderer.message("[dim]stopped following; the run goes on[/]")
            return EXIT_CANCELLED
        renderer.finish(outcome, label=run_id)
        return outcome.process_exit_code

    run_command(main())
