"""Entry point of the ``runstream`` console script; each command lives in its own module."""

from __future__ import annotations

import click

from runstream._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="runstream")
def cli() -> None:
    """Run long tasks and stream every event they produce, exactly once, to any client."""


def _register() -> None:
    # Commands import their dependencies lazily so `runstream --help` stays fast.
    from runstream.cli.demo import demo

    cli.add_command(demo)
    from runstream.cli.serve import serve

    cli.add_command(serve)
    from runstream.cli.run import run
    from runstream.cli.runs_cmds import cancel, ls, show
    from runstream.cli.tail import tail

    for command in (run, tail, ls, show, cancel):
        cli.add_command(command)
    from runstream.cli.worker import worker

    cli.add_command(worker)
    from runstream.cli.ops_cmds import gc, rm, status

    for command in (rm, gc, status):
        cli.add_command(command)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
