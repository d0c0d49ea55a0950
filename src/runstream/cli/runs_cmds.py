"""``runstream ls``, ``runstream show RUN_ID``, ``runstream cancel RUN_ID``.

Each works two ways:

* with ``--server URL`` (or ``RUNSTREAM_URL``, the SDK's variable, or the
  older ``RUNSTREAM_SERVER``), over the HTTP API through the SDK;
* otherwise against the local store named by ``--backend`` (default
  ``RUNSTREAM_BACKEND`` or ``sqlite:///./.runstream/runstream.db``), so runs
  recorded by ``runstream run -- CMD`` show up with no server running. An
  explicit ``--backend`` wins over those variables.

Runs are handled as their JSON objects (the API's shape, which
:meth:`RunRecord.to_json` also produces), so both ways print the same tables.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from runstream.backends import DEFAULT_BACKEND_URL
from runstream.backends.base import EventLog
from runstream.cli.render import run_command, status_style
from runstream.client import _env as client_env
from runstream.errors import RunNotFound, StreamNotFound
from runstream.redact import mask_secrets
from runstream.runs.lifecycle import ALL_STATUSES
from runstream.runs.store import RunStore

if TYPE_CHECKING:
    from runstream.client import AsyncClient

__all__ = [
    "backend_option",
    "cancel",
    "local_runs",
    "ls",
    "make_client",
    "run_json_duration",
    "server_hint",
    "server_options",
    "show",
]

DEFAULT_SERVER_URL = "http://127.0.0.1:8787"
DEFAULT_LIMIT = 20
CLI_REQUEST_ATTEMPTS = 3

F = TypeVar("F", bound=Callable[..., Any])


# -- shared options ------------------------------------------------------------------------


def backend_option(func: F) -> F:
    return click.option(
        "--backend",
        default=None,
        metavar="URL",
        help="Local store: sqlite:///path.db, memory://, redis://... "
        f"[env RUNSTREAM_BACKEND; default {DEFAULT_BACKEND_URL}]",
    )(func)


def server_options(default: str | None = None) -> Callable[[F], F]:
    """``--server`` (env ``RUNSTREAM_URL``, else ``RUNSTREAM_SERVER``) and ``--token``
    (env ``RUNSTREAM_TOKEN``): the same variables as the SDK's ``AsyncClient()``."""

    def decorate(func: F) -> F:
        return _server_options(func, default)

    return decorate


def _server_options(func: F, default: str | None) -> F:
    func = click.option(
        "--token",
        envvar=client_env.TOKEN,
        default=None,
        metavar="TOKEN",
        help="Bearer token for the server [env RUNSTREAM_TOKEN].",
    )(func)
    shown = default or "local store"
    return click.option(
        "--server",
        # The first one set wins: the SDK reads them in the same order.
        envvar=[client_env.URL, client_env.URL_ALIAS],
        default=default,
        metavar="URL",
        help="runstream server to talk to "
        f"[env RUNSTREAM_URL or RUNSTREAM_SERVER; default {shown}].",
    )(func)


def resolve_backend(backend: str | None) -> str:
    import os

    return backend or os.environ.get("RUNSTREAM_BACKEND") or DEFAULT_BACKEND_URL


def local_file(url: str) -> Path | None:
    """The file a local backend URL keeps its runs in (``None`` for other engines)."""
    from runstream.backends import engine_for

    return engine_for(url).local_file(url)


@contextlib.asynccontextmanager
async def local_runs(url: str, *, create: bool = True) -> AsyncIterator[tuple[RunStore, EventLog]]:
    """The local run store and event log of backend ``url``, started, closed on exit.

    With ``create=False`` a SQLite file that does not exist yet is not
    created: :class:`RunNotFound` is raised instead (nothing was ever
    recorded there).
    """
    from runstream.backends import open_backend, open_run_store

    path = local_file(url)
    if not create and path is not None and not path.exists():
        raise RunNotFound(f"no runs recorded yet: {path} does not exist")
    store = open_run_store(url)
    await store.start()
    try:
        async with open_backend(url) as log:
            yield store, log
    finally:
        await store.aclose()


def make_client(server: str, token: str | None) -> AsyncClient:
    """The SDK client every server-facing command uses.

    Single requests give up after a few quick attempts (someone is waiting at
    a prompt); following a run keeps the SDK's longer budget for outages.
    """
    from runstream.client import AsyncClient
    from runstream.client.policy import RetryPolicy

    retry = RetryPolicy(max_attempts=CLI_REQUEST_ATTEMPTS, max_elapsed=10.0, fallback_after=0)
    return AsyncClient(server, token=token, retry=retry)


@contextlib.contextmanager
def server_hint(server: str) -> Iterator[None]:
    """Add what to check to a "could not reach the server" error."""
    from runstream.errors import RetriesExhausted

    try:
        yield
    except RetriesExhausted as exc:
        raise RetriesExhausted(
            f"{exc}. Is a runstream server running at {mask_secrets(server)}? Start one with "
            "`runstream serve`, or name it with --server / RUNSTREAM_URL."
        ) from exc


# -- formatting ----------------------------------------------------------------------------


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def run_json_duration(run: Mapping[str, Any]) -> float | None:
    """Seconds from ``started_at`` to ``finished_at`` (or to now while running)."""
    started = _parse_time(run.get("started_at"))
    if started is None:
        return None
    finished = _parse_time(run.get("finished_at"))
    if finished is None:
        if run.get("status") != "running":
            return None
        finished = datetime.now(started.tzinfo)
    return max(0.0, (finished - started).total_seconds())


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fmt_time(value: object, *, short: bool = False) -> str:
    moment = _parse_time(value)
    if moment is None:
        return ""
    return moment.astimezone().strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S %Z")


def _what(run: Mapping[str, Any]) -> str:
    """A one-line summary of what the run executes: the argv, or its params."""
    params = run.get("params") or {}
    argv = params.get("argv") if isinstance(params, Mapping) else None
    if isinstance(argv, list):
        import shlex

        return shlex.join(str(a) for a in argv).replace("\n", "\\n")
    if not params:
        return ""
    return " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in params.items())


def _exit_text(run: Mapping[str, Any]) -> str:
    code = run.get("exit_code")
    return "" if code is None else str(code)


_LS_COLUMNS = (("RUN", 30), ("TASK", 4), ("STATUS", 9), ("EXIT", 4), ("CREATED", 14),
               ("DURATION", 8))  # fmt: skip


def runs_table(runs: Sequence[Mapping[str, Any]], width: int = 180) -> Table:
    """The ``ls`` table for a terminal ``width`` columns wide.

    Every column but the command/params summary keeps its full width; the
    summary is shortened to what is left (and left out below 10 columns).
    """
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, min_width in _LS_COLUMNS:
        table.add_column(
            name,
            no_wrap=True,
            min_width=min_width,
            justify="right" if name in ("EXIT", "DURATION") else "left",
        )
    used = sum(w for _, w in _LS_COLUMNS) + 2 * len(_LS_COLUMNS)
    summary_width = width - used - 1
    if summary_width >= 10:
        table.add_column("COMMAND / PARAMS", no_wrap=True, max_width=summary_width)
    for run in runs:
        status = str(run.get("status", ""))
        cells: list[str | Text] = [
            str(run.get("id", "")),
            str(run.get("task", "")),
            Text(status, style=status_style(status)),
            _exit_text(run),
            _fmt_time(run.get("created_at"), short=True),
            _fmt_duration(run_json_duration(run)),
        ]
        if summary_width >= 10:
            summary = _what(run)
            if len(summary) > summary_width:
                summary = summary[: summary_width - 1] + "…"
            cells.append(summary)
        table.add_row(*cells)
    return table


def run_details(run: Mapping[str, Any], stream: Mapping[str, Any] | None = None) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    status = str(run.get("status", ""))
    rows: list[tuple[str, str | Text]] = [
        ("id", str(run.get("id", ""))),
        ("task", str(run.get("task", ""))),
        ("status", Text(status, style=status_style(status))),
    ]
    if run.get("waiting"):
        rows.append(("waiting", f"for resources: {run['waiting']}"))
    if run.get("exit_code") is not None:
        rows.append(("exit code", str(run["exit_code"])))
    if run.get("error"):
        rows.append(("error", str(run["error"])))
    params = run.get("params") or {}
    argv = params.get("argv") if isinstance(params, Mapping) else None
    if isinstance(argv, list):
        rows.append(("command", _what(run)))
    elif params:
        rows.append(("params", json.dumps(params, ensure_ascii=False)))
    for key in ("created_at", "started_at", "finished_at"):
        if run.get(key):
            rows.append((key.replace("_at", ""), _fmt_time(run[key])))
    duration = run_json_duration(run)
    if duration is not None:
        rows.append(("duration", _fmt_duration(duration)))
    if run.get("timeout") is not None:
        rows.append(("timeout", f"{run['timeout']:g}s"))
    if run.get("worker"):
        rows.append(("worker", str(run["worker"])))
    if run.get("attempt", 1) != 1:
        rows.append(("attempt", str(run["attempt"])))
    if run.get("cancel_requested") and status not in ("cancelled",):
        rows.append(("cancel", "requested"))
    if stream is not None:
        rows.append(("events", f"{stream.get('last_id', 0)} ({stream.get('status', '?')})"))
    for key, value in rows:
        table.add_row(key, value)
    return table


_PIPE_WIDTH = 250
"""Table width when stdout is not a terminal (Rich would assume 80 and squeeze columns)."""


def _stdout_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=_PIPE_WIDTH)
    return console


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


# -- ls ------------------------------------------------------------------------------------


@click.command(name="ls")
@click.option(
    "--status",
    type=click.Choice(ALL_STATUSES),
    default=None,
    help="Only runs with this status.",
)
@click.option("--task", default=None, help="Only runs of this task (`cmd` for `run -- CMD`).")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="How many runs to show, newest first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@backend_option
@server_options()
def ls(
    status: str | None,
    task: str | None,
    limit: int,
    as_json: bool,
    backend: str | None,
    server: str | None,
    token: str | None,
) -> None:
    """List runs, newest first (from the local store, or a server with --server)."""

    async def main() -> int:
        runs: list[dict[str, Any]]
        next_cursor: str | None
        if server and backend is None:
            with server_hint(server):
                async with make_client(server, token) as client:
                    page = await client.list_runs(status=status, task=task, limit=limit)
            runs, next_cursor = _page_items(page)
        else:
            url = resolve_backend(backend)
            try:
                async with local_runs(url, create=False) as (store, _log):
                    records, next_cursor = await store.list(
                        status=status,  # type: ignore[arg-type]
                        task=task,
                        limit=limit,
                    )
            except RunNotFound:
                records, next_cursor = [], None
            runs = [r.to_json() for r in records]
        if as_json:
            _print_json({"runs": runs, "next_cursor": next_cursor})
            return 0
        console = _stdout_console()
        if not runs:
            console.print("no runs", style="dim")
            return 0
        console.print(runs_table(runs, console.width))
        if next_cursor:
            console.print(f"(showing the newest {len(runs)}; use --limit for more)", style="dim")
        return 0

    run_command(main())


def _page_items(page: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The runs and next cursor of a ``GET /v1/runs`` answer."""
    if isinstance(page, list):
        return [dict(r) for r in page], None
    if isinstance(page, Mapping):
        items = page.get("runs", page.get("items", []))
        cursor = page.get("next_cursor", page.get("cursor"))
        return [dict(r) for r in items], str(cursor) if cursor else None
    return [], None


# -- show ----------------------------------------------------------------------------------


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@backend_option
@server_options()
def show(
    run_id: str, as_json: bool, backend: str | None, server: str | None, token: str | None
) -> None:
    """Show one run's record."""

    async def main() -> int:
        stream: dict[str, Any] | None = None
        if server and backend is None:
            with server_hint(server):
                async with make_client(server, token) as client:
                    run = await client.get_run(run_id)
                    with contextlib.suppress(StreamNotFound):
                        stream = (await client.info(run_id)).to_json()
        else:
            async with local_runs(resolve_backend(backend), create=False) as (store, log):
                run = (await store.get(run_id)).to_json()
                with contextlib.suppress(StreamNotFound):
                    stream = (await log.info(run_id)).to_json()
        if as_json:
            _print_json({**run, "stream_info": stream} if stream is not None else run)
            return 0
        _stdout_console().print(run_details(run, stream))
        return 0

    run_command(main())


# -- cancel --------------------------------------------------------------------------------


@click.command()
@click.argument("run_id")
@backend_option
@server_options()
def cancel(run_id: str, backend: str | None, server: str | None, token: str | None) -> None:
    """Cancel a run: a queued run ends at once, a running one is stopped gracefully.

    The process running it sends SIGTERM to the command's process group, then
    SIGKILL after the task's grace period. A run that already finished is
    left as it is.
    """

    async def main() -> int:
        if server and backend is None:
            with server_hint(server):
                async with make_client(server, token) as client:
                    await client.cancel_run(run_id)
                    run = await client.get_run(run_id)
        else:
            from runstream.runs.service import RunService
            from runstream.runs.tasks import TaskRegistry

            async with local_runs(resolve_backend(backend), create=False) as (store, log):
                record = await RunService(TaskRegistry(), store, log).cancel(run_id)
                run = record.to_json()
        status = str(run.get("status"))
        console = _stdout_console()
        if status == "cancelled":
            console.print(Text.assemble(f"{run_id} ", ("cancelled", status_style(status))))
        elif status in ("queued", "running"):
            console.print(f"{run_id}: cancel requested (it is {status}; it stops shortly)")
        else:
            console.print(
                Text.assemble(f"{run_id} already finished: ", (status, status_style(status)))
            )
        return 0

    run_command(main())
