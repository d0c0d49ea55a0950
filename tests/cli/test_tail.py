"""``runstream run TASK`` and ``runstream tail`` against a real server, through restarts."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from runstream.client import AsyncClient
from tests.cli.conftest import (
    CLI,
    DECLARED_TASKS,
    RunsServer,
    cli,
    cli_env,
    finish,
    py,
    read_until,
    run_id_from,
    start_cli,
)


def expected_lines(n: int) -> str:
    return "".join(f"\x1b[32mline {i}\x1b[0m\n" for i in range(n))


async def test_run_task_follows_to_the_end_with_the_run_exit_code(
    runs_server: RunsServer, tmp_path: Path
) -> None:
    result = await cli(
        "run", "lines", "-p", "n=7", "--param", "code=3", "--server", runs_server.url,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 3, result.err
    assert result.out == expected_lines(7)
    # stderr: the run id first, the task's stderr lines in order, then the final status line.
    err = result.err.splitlines()
    assert err[0].startswith("run-")
    assert [line for line in err if line.startswith("err ")] == ["err 0", "err 3", "err 6"]
    assert "failed" in err[-1]
    assert "(exit 3)" in err[-1]


async def test_run_task_json_lines_parse_and_end_with_the_end_event(
    runs_server: RunsServer, tmp_path: Path
) -> None:
    result = await cli(
        "run", "lines", "-p", "n=3", "--json", "--server", runs_server.url, cwd=tmp_path
    )
    assert result.code == 0, result.err
    events = [json.loads(line) for line in result.out.splitlines()]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["line"] for e in events if e["type"] == "stdout"] == [
        f"\x1b[32mline {i}\x1b[0m" for i in range(3)
    ]
    assert events[-1]["type"] == "end"
    assert events[-1]["data"]["status"] == "succeeded"


async def test_run_task_detach_prints_the_id_and_tail_follows_it(
    runs_server: RunsServer, tmp_path: Path
) -> None:
    detached = await cli("run", "lines", "-d", "--server", runs_server.url, cwd=tmp_path)
    assert detached.code == 0, detached.err
    run_id = detached.out.strip()
    assert run_id.startswith("run-")
    tailed = await cli("tail", run_id, "--server", runs_server.url, cwd=tmp_path)
    assert tailed.code == 0, tailed.err
    assert tailed.out == expected_lines(5)
    assert "succeeded" in tailed.err.splitlines()[-1]


async def test_unknown_task_and_unknown_run_fail_with_a_message(
    runs_server: RunsServer, tmp_path: Path
) -> None:
    unknown = await cli("run", "nope", "--server", runs_server.url, cwd=tmp_path)
    assert unknown.code == 1
    assert "nope" in unknown.err
    assert "Traceback" not in unknown.err
    missing = await cli("tail", "run-doesnotexist", "--server", runs_server.url, cwd=tmp_path)
    assert missing.code == 1
    assert "Traceback" not in missing.err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    unreachable = await cli("run", "lines", "--server", nobody, cwd=tmp_path)
    assert unreachable.code == 1
    assert "Is a runstream server running" in unreachable.err
    assert time.monotonic() - started < 30  # a few quick attempts, not a long silent wait


async def test_ctrl_c_on_run_task_cancels_the_run_on_the_server(
    runs_server: RunsServer, tmp_path: Path
) -> None:
    proc = await start_cli("run", "sleepy", "--server", runs_server.url, cwd=tmp_path)
    assert proc.stdout is not None
    await read_until(proc.stdout, b"started\n")
    proc.send_signal(signal.SIGINT)
    result = await finish(proc)
    assert result.code == 130, result.err
    run_id = run_id_from(result.stderr)
    async with AsyncClient(runs_server.url) as client:
        assert (await client.get_run(run_id))["status"] == "cancelled"


async def test_ls_show_cancel_over_http(runs_server: RunsServer, tmp_path: Path) -> None:
    detached = await cli("run", "sleepy", "-d", "--server", runs_server.url, cwd=tmp_path)
    run_id = detached.out.strip()
    env = {"RUNSTREAM_SERVER": runs_server.url}  # the variable works like --server
    cancelled = await cli("cancel", run_id, cwd=tmp_path, env=env)
    assert cancelled.code == 0, cancelled.err
    tailed = await cli("tail", run_id, "--json", cwd=tmp_path, env=env)
    assert tailed.code == 130
    assert json.loads(tailed.out.splitlines()[-1])["data"]["status"] == "cancelled"
    listing = await cli("ls", "--json", "--task", "sleepy", cwd=tmp_path, env=env)
    assert [r["id"] for r in json.loads(listing.out)["runs"]] == [run_id]
    shown = await cli("show", run_id, "--json", cwd=tmp_path, env=env)
    assert json.loads(shown.out)["status"] == "cancelled"


async def test_server_url_precedence_flag_then_runstream_url_then_runstream_server(
    runs_server: RunsServer, tmp_path: Path
) -> None:
    detached = await cli("run", "lines", "-d", "--server", runs_server.url, cwd=tmp_path)
    run_id = detached.out.strip()
    nowhere = "http://127.0.0.1:9"  # the discard port: nothing answers
    cases = [
        (["--server", runs_server.url], {"RUNSTREAM_URL": nowhere}),
        ([], {"RUNSTREAM_URL": runs_server.url, "RUNSTREAM_SERVER": nowhere}),
    ]
    for flags, env in cases:
        shown = await cli("show", run_id, "--json", *flags, cwd=tmp_path, env=env)
        assert shown.code == 0, (flags, env, shown.err)
        assert json.loads(shown.out)["id"] == run_id


PRODUCER = """
import sys, time
n = int(sys.argv[1])
for i in range(n):
    print('\\x1b[32mline %d\\x1b[0m' % i, flush=True)
    time.sleep(0.05)
"""


@pytest.mark.timeout(120)
async def test_tail_resumes_across_a_server_restart_line_for_line(tmp_path: Path) -> None:
    """A run written by ``runstream run -- CMD`` into the server's SQLite file, tailed
    through the server while the server is stopped and started again on the same port."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    server = RunsServer(db, DECLARED_TASKS, workers=0)
    await server.start()
    n = 80
    producer = await start_cli(
        "run", "--", *py(PRODUCER), str(n), cwd=tmp_path, env={"RUNSTREAM_BACKEND": db}
    )
    try:
        assert producer.stderr is not None
        run_id = (await read_until(producer.stderr, b"\n")).decode().strip()
        tail = await start_cli("tail", run_id, "--server", server.url, cwd=tmp_path)
        assert tail.stdout is not None
        seen = await read_until(tail.stdout, b"line 10\x1b[0m\n")
        await server.stop()
        await server.restart()  # same port, same database file
        rest = await finish(tail)
        produced = await finish(producer)
    finally:
        await server.stop()
    assert produced.code == 0, produced.err
    assert rest.code == 0, rest.err
    assert produced.stdout == expected_lines(n).encode()
    assert seen + rest.stdout == produced.stdout
    assert "succeeded" in rest.err.splitlines()[-1]


async def test_local_tail_with_backend_needs_no_server(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'local.db'}"
    produced = await cli(
        "run", "--", *py(PRODUCER), "4", cwd=tmp_path, env={"RUNSTREAM_BACKEND": db}
    )
    run_id = run_id_from(produced.stderr)
    tailed = await cli("tail", run_id, "--backend", db, "--after", "3", cwd=tmp_path)
    assert tailed.code == 0, tailed.err
    # Event 1 is "queued", 2 "running", 3 the first line: the rest follows.
    assert tailed.out == "".join(f"\x1b[32mline {i}\x1b[0m\n" for i in range(1, 4))


def read_terminal(fd: int) -> bytes:
    """Everything written to a pseudo-terminal, until its last writer closed it."""
    import os

    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed and drained
            return data
        if not chunk:
            return data
        data += chunk


async def test_progress_bar_on_a_terminal_stderr(runs_server: RunsServer, tmp_path: Path) -> None:
    """stderr on a pseudo-terminal: progress events become a bar, erased before each line."""
    import os
    import pty

    controller, terminal = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "run", "progress", "-p", "steps=3", "--server", runs_server.url,
            cwd=tmp_path, env=cli_env({"COLUMNS": "100", "TERM": "xterm"}),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=terminal,
        )  # fmt: skip
        os.close(terminal)
        terminal = -1
        # Drain the terminal while the CLI runs, so it can never block on a full buffer.
        reading = asyncio.ensure_future(asyncio.to_thread(read_terminal, controller))
        stdout, _ = await asyncio.wait_for(proc.communicate(), 45)
        err = await asyncio.wait_for(reading, 10)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0, err
    assert b"chunk 3/3" in stdout
    assert b'{"chunks": 3}' in stdout
    assert b"\r\x1b[2K" in err  # the bar is drawn and erased in place
    assert b"crunching" in err
    assert b"3/3" in err
    assert b"succeeded" in err
