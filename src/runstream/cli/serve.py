"""``runstream serve``: the HTTP API (and, with the runs layer, its workers)."""

from __future__ import annotations

import click

from runstream.config import load_settings
from runstream.errors import ConfigError
from runstream.redact import mask_secrets


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="runstream.toml to read (default: $RUNSTREAM_CONFIG or ./runstream.toml).",
)
@click.option("--backend", default=None, help="Backend URL: sqlite:///path, redis://..., memory://")
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8787).")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="In-process workers for runs (0 = API only).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=0),
    default=None,
    help="Server processes sharing the port (default: one per CPU core; 1 on memory://).",
)
def serve(
    config_path: str | None,
    backend: str | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    processes: int | None,
) -> None:
    """Serve the HTTP API: streams, SSE/WebSocket/long-poll, /metrics, /openapi.json."""
    from runstream.app import build_app
    from runstream.server.processes import resolve_processes, serve_processes
    from runstream.server.serve import serve as run_server

    try:
        settings = load_settings(
            config_path,
            backend=backend,
            host=host,
            port=port,
            workers=workers,
            processes=processes,
        )
        settings.check_bind()
        count = resolve_processes(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"runstream serving {mask_secrets(settings.server.backend)} on "
        f"http://{settings.server.host}:{settings.server.port}"
        + (f" with {count} processes" if count > 1 else ""),
        err=True,
    )
    try:
        if count > 1:
            build_app(settings)  # configuration errors show here, not once per process
            raise SystemExit(serve_processes(settings, count, build_app))
        run_server(settings, build_app(settings))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
