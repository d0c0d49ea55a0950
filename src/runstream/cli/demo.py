"""``runstream demo``: a self-contained tour on the embedded default.

It needs nothing configured. In one process it

1. starts the HTTP API and web UI on 127.0.0.1 (port 8787, or a free port
   when that one is taken) with the SQLite default backend
   (``./.runstream/runstream.db``) and two sample tasks:
   ``demo-build``, a command that prints coloured lines on stdout and a
   warning on stderr, and ``demo-progress``, a Python task that reports
   progress;
2. submits a run of each through the SDK and shows them live in the
   terminal, exactly as ``runstream run TASK`` would;
3. says where to look: the UI, the run's page, and the commands to try;
4. keeps serving until Ctrl-C (``--once`` stops after the tour); that Ctrl-C
   exits 0, a Ctrl-C during the tour exits 130.

Runs stay in the SQLite file, so ``runstream ls`` shows them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from runstream.cli.render import EXIT_CANCELLED, EXIT_ERROR, Renderer, run_command
from runstream.cli.runs_cmds import backend_option, resolve_backend
from runstream.redact import mask_secrets

__all__ = ["DEMO_PORT", "DEMO_TASKS", "demo", "progress_task"]

DEMO_HOST = "127.0.0.1"
DEMO_PORT = 8787
DEMO_SHUTDOWN_GRACE = 1.0
"""Seconds a demo run may go on after Ctrl-C before it is cancelled."""
_START_TIMEOUT = 20.0

# The sample command: plain Python, so it runs wherever runstream does. No braces:
# "{name}" would read as a param placeholder.
_BUILD_SCRIPT = r"""
import sys, time
steps, delay = int(sys.argv[1]), float(sys.argv[2])
B, G, Y, C, D, R = "\x1b[1m", "\x1b[32m", "\x1b[33m", "\x1b[36m", "\x1b[2m", "\x1b[0m"
print("%sbuilding%s %d modules %s(a command task: stdout, stderr, colours)%s" % (B, R, steps, D, R))
for i in range(1, steps + 1):
    time.sleep(delay)
    bar = "#" * (20 * i // steps)
    print("%s[%2d/%d]%s module_%02d %sok%s  %s[%-20s]%s" % (C, i, steps, R, i, G, R, D, bar, R))
    if i == (steps + 1) // 2:
        print("%swarning%s: module_%02d took longer than usual" % (Y, R, i), file=sys.stderr)
print("%s%sdone%s: %d modules built" % (G, B, R, steps))
"""

DEMO_TASKS: dict[str, dict[str, Any]] = {
    "demo-build": {
        "command": [sys.executable, "-u", "-c", _BUILD_SCRIPT, "{steps}", "{delay}"],
        "params": {
            "steps": {"type": "integer", "default": 8, "min": 1, "max": 1000},
            "delay": {"type": "number", "default": 0.15, "min": 0, "max": 10},
        },
        "timeout": 600,
        "description": "Prints coloured build steps on stdout and a warning on stderr.",
    },
    "demo-progress": {
        "callable": "runstream.cli.demo:progress_task",
        "params": {
            "steps": {"type": "integer", "default": 8, "min": 1, "max": 1000},
            "delay": {"type": "number", "default": 0.15, "min": 0, "max": 10},
        },
        "timeout": 600,
        "description": "A Python task reporting progress events and log lines.",
    },
}
"""The sample tasks, as ``[tasks.*]`` tables of ``runstream.toml`` would declare them."""


async def progress_task(ctx: Any) -> dict[str, int]:
    """The ``demo-progress`` task: ``steps`` progress events with a log line each."""
    steps = int(ctx.params.get("steps", 8))
    delay = float(ctx.params.get("delay", 0.15))
    await ctx.log(
        "info", f"\x1b[1mcrunching\x1b[0m {steps} chunks (a Python task: progress events)"
    )
    for i in range(1, steps + 1):
        if ctx.cancelled.is_set():
            await ctx.log("warning", f"cancelled after {i - 1} chunks")
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.cancelled.wait(), delay)
        await ctx.progress(current=i, total=steps, message="crunching")
        await ctx.log("info", f"chunk {i}/{steps} \x1b[32mdone\x1b[0m")
    return {"chunks": steps}


def _listen(port: int | None) -> socket.socket:
    """A listening socket on ``DEMO_HOST``: ``port``, or 8787 falling back to a free port."""
    candidates = [port] if port is not None else [DEMO_PORT, 0]
    last: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((DEMO_HOST, candidate))
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno != errno.EADDRINUSE:
                break
            continue
        sock.listen(128)
        sock.set_inheritable(False)
        return sock
    from runstream.errors import ConfigError

    raise ConfigError(f"cannot listen on {DEMO_HOST}:{port or DEMO_PORT}: {last}")


async def _tour(
    backend: str, port: int | None, once: bool, steps: int, delay: float, console: Console
) -> int:
    from runstream.config import Settings
    from runstream.server.app import create_app
    from runstream.server.runs import RunsAPI
    from runstream.server.serve import Server, make_server
    from runstream.server.ui import router as ui_router

    sock = _listen(port)
    bound = sock.getsockname()[1]
    settings = Settings().replace(host=DEMO_HOST, port=bound, backend=backend, log_level="warning")
    settings = settings.evolve(tasks=DEMO_TASKS)
    runs = RunsAPI.from_settings(settings, shutdown_grace=DEMO_SHUTDOWN_GRACE)
    app = create_app(settings, routers=[ui_router, runs.router], on_startup=[runs.startup])
    stopping = asyncio.Event()

    interrupted: list[int] = []

    class DemoServer(Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            stopping.set()  # Ctrl-C: stop showing the tour at once
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a captured Ctrl-C once it has shut down; here Ctrl-C
            # is the expected way to end the demo, so it only stops the server.
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._on_signal, signum)
            try:
                yield
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)

        def _on_signal(self, signum: int) -> None:
            interrupted.append(signum)
            if self.should_exit:
                self.force_exit = True  # a second Ctrl-C: do not wait for connections
            self.should_exit = True

    server = make_server(app, settings, server_class=DemoServer)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://{DEMO_HOST}:{bound}"
    try:
        if not await _started(server, serving):
            return EXIT_ERROR
        console.print(
            Text.assemble(
                ("runstream demo", "bold"),
                f" — serving the API and UI on {url}/ with {mask_secrets(backend)}",
            )
        )
        codes: list[int] = []
        shown: list[str] = []
        for task in ("demo-build", "demo-progress"):
            code, run_id = await _show_run(url, task, steps, delay, stopping, console)
            codes.append(code)
            if run_id is None:
                break
            shown.append(run_id)
        if len(shown) == 2:
            _say_where(console, url, shown[0])
        if once or stopping.is_set():
            server.should_exit = True
        else:
            console.print(Text("serving until Ctrl-C", style="dim"))
        await serving
        if interrupted and len(shown) < 2:
            return EXIT_CANCELLED  # stopped in the middle of the tour
        return max(codes) if codes else EXIT_ERROR
    finally:
        if not serving.done():
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
        sock.close()


async def _started(server: Any, serving: asyncio.Task[None]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _START_TIMEOUT
    while not server.started:  # uvicorn reports readiness only as a flag
        if serving.done() or loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _show_run(
    url: str, task: str, steps: int, delay: float, stopping: asyncio.Event, console: Console
) -> tuple[int, str | None]:
    from runstream.cli.runs_cmds import make_client
    from runstream.cli.tail import follow_remote

    async with make_client(url, None) as client:
        created = await client.create_run(task, {"steps": steps, "delay": delay})
        run_id = str(created["id"])
        console.print()
        console.print(
            Text.assemble(
                ("$ ", "dim"),
                (f"runstream run {task}", "bold"),
                ("  → ", "dim"),
                (run_id, "cyan"),
            )
        )
        renderer = Renderer(console=console)
        outcome = await follow_remote(client, run_id, renderer, stop=stopping)
        renderer.finish(outcome, label=run_id)
    if outcome is None:
        return EXIT_ERROR, None
    return outcome.process_exit_code, run_id


def _say_where(console: Console, url: str, run_id: str) -> None:
    console.print()
    console.print(Text.assemble(("Web UI      ", "bold"), (f"{url}/", "bold cyan underline")))
    console.print(
        Text.assemble(("This run    ", "bold"), (f"{url}/#/runs/{run_id}", "cyan underline"))
    )
    console.print(Text("Try, in another terminal:", style="bold"))
    for line in (
        f"runstream tail {run_id} --server {url}",
        f"runstream run demo-build --param steps=40 --server {url}",
        f"runstream ls --server {url}",
        "runstream run -- python -c \"print('hello from a recorded run')\"",
        "runstream ls",
    ):
        console.print(Text(f"  {line}"))


@click.command()
@backend_option
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help=f"Port to serve on [default {DEMO_PORT}, or a free one if it is taken].",
)
@click.option("--once", is_flag=True, help="Stop after the tour instead of serving until Ctrl-C.")
@click.option("--steps", type=click.IntRange(1, 1000), default=8, show_default=True)
@click.option("--delay", type=click.FloatRange(0, 10), default=0.15, show_default=True)
def demo(backend: str | None, port: int | None, once: bool, steps: int, delay: float) -> None:
    """A self-contained tour: serve the API and UI, run sample tasks live, say where to look."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    run_command(_tour(resolve_backend(backend), port, once, steps, delay, console))
