"""``runstream rm``, ``runstream gc``, ``runstream status``: deletion, retention, store size.

Like ``ls``/``show``/``cancel`` (see :mod:`.runs_cmds`), each works over the HTTP
API with ``--server URL`` (or ``RUNSTREAM_URL``), or else against the local store
named by ``--backend``. ``gc`` and ``status`` read ``[retention]``/``[storage]``
from ``--config`` (or ``runstream.toml``) when they work on the local store.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from runstream.backends.space import format_bytes, free_disk
from runstream.cli.render import EXIT_ERROR, print_error, run_command, status_style
from runstream.cli.runs_cmds import (
    _print_json,
    _stdout_console,
    backend_option,
    local_runs,
    make_client,
    resolve_backend,
    server_hint,
    server_options,
)
from runstream.errors import IllegalTransition, RunNotFound, RunstreamError
from runstream.runs.lifecycle import ALL_STATUSES

__all__ = ["gc", "rm", "status"]


def _config_option(func: Any) -> Any:
    return click.option(
        "--config",
        "config_path",
        default=None,
        metavar="FILE",
        help="Settings file for [retention] and [storage] [env RUNSTREAM_CONFIG; "
        "default ./runstream.toml if present].",
    )(func)


def _use_server(server: str | None, backend: str | None) -> bool:
    return bool(server) and backend is None


# -- rm ------------------------------------------------------------------------------------


@click.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--force", is_flag=True, help="Cancel a queued or running run first, then delete.")
@click.option("--task", default=None, help="Delete the ended runs of this task.")
@click.option(
    "--status",
    type=click.Choice(ALL_STATUSES),
    default=None,
    help="Delete the ended runs with this status.",
)
@click.option(
    "--before",
    default=None,
    metavar="TIME",
    help="Delete the ended runs created before TIME (unix seconds or RFC 3339).",
)
@click.option("--all", "all_runs", is_flag=True, help="Delete every ended run (no filter).")
@click.option("--json", "as_json", is_flag=True, help="Print what was deleted as JSON.")
@backend_option
@server_options()
def rm(
    run_ids: tuple[str, ...],
    force: bool,
    task: str | None,
    status: str | None,
    before: str | None,
    all_runs: bool,
    as_json: bool,
    backend: str | None,
    server: str | None,
    token: str | None,
) -> None:
    """Delete runs and their streams.

    By id (`runstream rm ID...`; a queued or running run is refused unless
    --force, which cancels it and waits for its end), or by filter
    (`runstream rm --task T --status S --before TIME`, all of them must match;
    only runs that ended are deleted; --all for every ended run).
    """
    filters = task is not None or status is not None or before is not None or all_runs
    if run_ids and filters:
        raise click.UsageError("give run ids or filters (--task/--status/--before/--all), not both")
    if not run_ids and not filters:
        raise click.UsageError("give run ids, or --task/--status/--before (or --all)")

    async def main() -> int:
        if run_ids:
            return await _rm_ids(run_ids, force, as_json, backend, server, token)
        if _use_server(server, backend):
            assert server is not None
            with server_hint(server):
                async with make_client(server, token) as client:
                    result = await client.delete_runs(
                        task=task, status=status, before=before, all=all_runs
                    )
        else:
            from runstream.runs.retention import parse_time
            from runstream.runs.service import RunService
            from runstream.runs.tasks import TaskRegistry

            cutoff = None if before is None else parse_time(before, field="before")
            async with local_runs(resolve_backend(backend), create=False) as (store, log):
                deleted, skipped = await RunService(TaskRegistry(), store, log).delete_matching(
                    task=task,
                    status=status,  # type: ignore[arg-type]
                    before=cutoff,
                )
                if deleted:
                    await log.reclaim_space()
            result = {"deleted": deleted, "skipped": skipped}
        if as_json:
            _print_json(result)
            return 0
        console = _stdout_console()
        for run_id in result["deleted"]:
            console.print(f"deleted {run_id}")
        console.print(
            f"{len(result['deleted'])} run(s) deleted"
            + (f"; {result['skipped']} not ended, kept" if result["skipped"] else ""),
            style="dim",
        )
        return 0

    run_command(main())


async def _rm_ids(
    run_ids: tuple[str, ...],
    force: bool,
    as_json: bool,
    backend: str | None,
    server: str | None,
    token: str | None,
) -> int:
    deleted: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    if _use_server(server, backend):
        assert server is not None
        with server_hint(server):
            async with make_client(server, token) as client:
                for run_id in run_ids:
                    try:
                        deleted.append((await client.delete_run(run_id, force=force))["deleted"])
                    except RunstreamError as exc:
                        failed.append((run_id, str(exc)))
    else:
        from runstream.runs.service import RunService
        from runstream.runs.tasks import TaskRegistry

        async with local_runs(resolve_backend(backend), create=False) as (store, log):
            service = RunService(TaskRegistry(), store, log)
            for run_id in run_ids:
                try:
                    deleted.append((await service.delete(run_id, force=force)).to_json())
                except (RunNotFound, IllegalTransition) as exc:
                    failed.append((run_id, str(exc)))
            if deleted:
                await log.reclaim_space()
    if as_json:
        _print_json({"deleted": deleted, "failed": dict(failed)})
    else:
        console = _stdout_console()
        for run in deleted:
            status = str(run.get("status"))
            console.print(
                Text.assemble(f"deleted {run['id']} (", (status, status_style(status)), ")")
            )
        for _run_id, message in failed:
            print_error(message)
    return EXIT_ERROR if failed else 0


# -- gc ------------------------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_config_option
@backend_option
@server_options()
def gc(
    as_json: bool,
    config_path: str | None,
    backend: str | None,
    server: str | None,
    token: str | None,
) -> None:
    """Apply the retention policy now and print what was removed."""

    async def main() -> int:
        if _use_server(server, backend):
            assert server is not None
            with server_hint(server):
                async with make_client(server, token) as client:
                    result = await client.gc()
        else:
            from runstream.config import load_settings
            from runstream.runs.retention import Retention, RetentionPolicy
            from runstream.runs.tasks import TaskRegistry

            settings = load_settings(config_path)
            registry = TaskRegistry.from_config(settings.tasks)
            tasks = {t.name: t.retention for t in registry if t.retention is not None}
            policy = RetentionPolicy.from_settings(settings.retention, tasks)
            url = resolve_backend(backend or settings.server.backend)
            async with local_runs(url, create=False) as (store, log):
                result = (await Retention(policy, store, log).sweep(full=True)).to_json()
        if as_json:
            _print_json(result)
            return 0
        table = Table(show_header=False, box=None)
        for key, value in result.items():
            table.add_row(key.replace("_", " "), str(value))
        _stdout_console().print(table)
        return 0

    run_command(main())


# -- status --------------------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_config_option
@backend_option
@server_options()
def status(
    as_json: bool,
    config_path: str | None,
    backend: str | None,
    server: str | None,
    token: str | None,
) -> None:
    """Show the store's size and row counts, free disk, retention and gates."""

    async def main() -> int:
        if _use_server(server, backend):
            assert server is not None
            with server_hint(server):
                async with make_client(server, token) as client:
                    result = await client.status()
        else:
            result = await _local_status(config_path, backend)
        if as_json:
            _print_json(result)
            return 0
        _stdout_console().print(_status_table(result))
        return 0

    run_command(main())


async def _local_status(config_path: str | None, backend: str | None) -> dict[str, Any]:
    from runstream.backends import engine_for
    from runstream.config import load_settings

    settings = load_settings(config_path)
    url = resolve_backend(backend or settings.server.backend)
    async with local_runs(url, create=False) as (store, log):
        stats = await log.storage_stats()
        runs = await store.stats()
        path = log.storage_path()
    return {
        "engine": engine_for(url).name,
        "store": stats,
        "runs": runs,
        "storage": {
            "path": path,
            "free_disk": None if path is None else free_disk(path),
            "min_free_disk": settings.storage.min_free_disk,
        },
        "retention": settings.retention.model_dump(),
        "gates": settings.gates.model_dump(),
    }


def _status_table(result: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_row("engine", str(result.get("engine")))
    store = result.get("store") or {}
    for key in ("file_bytes", "used_memory"):
        if key in store:
            table.add_row("store size", format_bytes(store[key]))
    for key, value in store.items():
        if key not in ("file_bytes", "used_memory", "page_size"):
            table.add_row(key.replace("_", " "), f"{value:g}")
    for key, value in sorted((result.get("runs") or {}).items()):
        table.add_row(key.replace("_", " "), f"{value:g}")
    storage = result.get("storage") or {}
    if storage.get("free_disk") is not None:
        table.add_row(
            "free disk",
            f"{format_bytes(storage['free_disk'])} (writes refused below "
            f"{format_bytes(storage.get('min_free_disk') or 0)})",
        )
    retention = {
        k: v
        for k, v in (result.get("retention") or {}).items()
        if v not in (None, {}, 0) and k not in ("last_pass", "last_pass_at")
    }
    table.add_row("retention", json.dumps(retention) if retention else "keep everything")
    gates = {k: v for k, v in (result.get("gates") or {}).items() if v not in (None, {})}
    table.add_row("gates", json.dumps(gates))
    return table
