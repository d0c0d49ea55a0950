"""Helpers for CLI tests: the real ``runstream`` in a subprocess, and a restartable server.

``cli(...)`` runs ``python -m runstream.cli.main ARGS`` to the end and returns
its exit code and output; ``start_cli(...)`` starts it and returns the
process, to read its output while it runs or send it signals.

``runs_server`` is a real uvicorn server with the runs API in the test's event
loop, on a SQLite file of the test's directory. ``.restart()`` stops it and
starts a new one on the same port and file, as an operator restarting the
service would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from runstream.server.app import create_app
from runstream.server.runs import RunsAPI
from tests.server.live import make_settings, serve_in_task

CLI = (sys.executable, "-m", "runstream.cli.main")
CLI_TIMEOUT = 45.0
STOP_TIMEOUT = 20.0


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without ``RUNSTREAM_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTREAM_")}
    env.pop("COLUMNS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclasses.dataclass
class Result:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


async def start_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        cwd=cwd,
        env=cli_env(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = CLI_TIMEOUT) -> Result:  # noqa: ASYNC109
    """Wait for ``proc`` and collect what is left of its output."""
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, stdout, stderr)


async def cli(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> Result:
    return await finish(await start_cli(*args, cwd=cwd, env=env))


async def read_until(stream: asyncio.StreamReader, marker: bytes, timeout: float = 20.0) -> bytes:  # noqa: ASYNC109
    """Read ``stream`` until ``marker`` was seen; return everything read."""
    buf = b""
    async with asyncio.timeout(timeout):
        while marker not in buf:
            chunk = await stream.read(65536)
            if not chunk:
                raise AssertionError(f"EOF before {marker!r}; got {buf[-500:]!r}")
            buf += chunk
    return buf


def py(code: str) -> list[str]:
    """argv running ``code`` with this interpreter, unbuffered."""
    return [sys.executable, "-u", "-c", code]


def group_alive(pgid: int) -> bool:
    """Whether a (non-zombie) process of group ``pgid`` is still alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            fields = stat[stat.rfind(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
    return False


@dataclasses.dataclass
class RunsServer:
    """A real server with the runs API; restartable on the same port and database."""

    backend_url: str
    tasks: Mapping[str, Any]
    workers: int
    port: int = 0
    _server: Any = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        settings = make_settings(backend=self.backend_url, workers=self.workers)
        settings = settings.evolve(tasks=self.tasks)
        runs = RunsAPI.from_settings(settings, shutdown_grace=1.0)
        app = create_app(settings, routers=[runs.router], on_startup=[runs.startup])
        live = await serve_in_task(app, settings, port=self.port)
        self.port = live.port
        self._server, self._task = live.server, live.task

    async def stop(self) -> None:
        """Stop as on SIGTERM; a shutdown stuck for STOP_TIMEOUT s is forced and reported."""
        if self._task is None:
            return
        server, task = self._server, self._task
        self._server = self._task = None
        server.should_exit = True
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if not done:
            server.force_exit = True
            await asyncio.wait({task}, timeout=STOP_TIMEOUT)
            raise AssertionError(f"server on port {self.port} took over {STOP_TIMEOUT}s to stop")
        task.result()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


DECLARED_TASKS: dict[str, Any] = {
    "lines": {
        "command": [
            *py(
                "import sys, time\n"
                "n, code = int(sys.argv[1]), int(sys.argv[2])\n"
                "for i in range(n):\n"
                "    print('\\x1b[32mline %d\\x1b[0m' % i)\n"
                "    if i % 3 == 0: print('err %d' % i, file=sys.stderr)\n"
                "sys.exit(code)\n"
            ),
            "{n}",
            "{code}",
        ],
        "params": {
            "n": {"type": "integer", "default": 5},
            "code": {"type": "integer", "default": 0},
        },
    },
    "progress": {
        "callable": "runstream.cli.demo:progress_task",
        "params": {"steps": {"type": "integer"}, "delay": {"type": "number", "default": 0}},
    },
    "sleepy": {
        "command": py("import time\nprint('started')\ntime.sleep(60)"),
        "grace": 2,
    },
}


@pytest.fixture
async def runs_server(tmp_path: Path) -> AsyncIterator[RunsServer]:
    """A server with in-process workers and the ``lines``/``sleepy`` tasks, on SQLite."""
    server = RunsServer(f"sqlite:///{tmp_path / 'server.db'}", DECLARED_TASKS, workers=2)
    await server.start()
    yield server
    await server.stop()


def lines_of(data: bytes) -> list[str]:
    return data.decode().splitlines()


def run_id_from(stderr: bytes) -> str:
    """The run id ``runstream run`` prints first on stderr (``run TASK`` adds its page URL)."""
    first = stderr.decode().splitlines()[0].split()[0]
    assert first.startswith("run-"), stderr
    return first


__all__: Sequence[str] = (
    "CLI",
    "DECLARED_TASKS",
    "Result",
    "RunsServer",
    "cli",
    "cli_env",
    "finish",
    "group_alive",
    "lines_of",
    "py",
    "read_until",
    "run_id_from",
    "runs_server",
    "start_cli",
)
