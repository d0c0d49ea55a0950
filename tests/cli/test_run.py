"""``runstream run -- CMD``: a real CLI process running a real command, recorded locally."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runstream.backends import open_run_store
from runstream.cli.main import cli as cli_group
from runstream.runs.model import RunRecord
from tests.cli.conftest import (
    CLI,
    cli,
    cli_env,
    finish,
    group_alive,
    py,
    read_until,
    run_id_from,
    start_cli,
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"RUNSTREAM_BACKEND": f"sqlite:///{tmp_path / 'local.db'}"}


async def stored_runs(env: dict[str, str]) -> list[RunRecord]:
    """What the local store holds, read directly (``ls``/``show`` are tested on their own)."""
    store = open_run_store(env["RUNSTREAM_BACKEND"])
    await store.start()
    try:
        runs, _ = await store.list(limit=100)
    finally:
        await store.aclose()
    return runs


async def stored_run(run_id: str, env: dict[str, str]) -> RunRecord:
    (run,) = [r for r in await stored_runs(env) if r.id == run_id]
    return run


async def test_output_goes_to_the_same_streams_in_order(
    tmp_path: Path, env: dict[str, str]
) -> None:
    code = (
        "import sys\n"
        "for i in range(200):\n"
        "    print('out', i)\n"
        "    print('err', i, file=sys.stderr)\n"
    )
    result = await cli("run", "-q", "--", *py(code), cwd=tmp_path, env=env)
    assert result.code == 0, result.err
    assert result.out == "".join(f"out {i}\n" for i in range(200))
    assert result.err == "".join(f"err {i}\n" for i in range(200))


async def test_exit_code_of_the_command_is_the_cli_exit_code_and_argv_is_verbatim(
    tmp_path: Path, env: dict[str, str]
) -> None:
    code = "import sys; print(sys.argv[1:]); sys.exit(3)"
    # Braces and dashes reach the command verbatim: no templating, no option parsing.
    result = await cli("run", "--", *py(code), "{name}", "-x", cwd=tmp_path, env=env)
    assert result.code == 3
    assert result.out == "['{name}', '-x']\n"
    run = await stored_run(run_id_from(result.stderr), env)
    assert (run.status, run.exit_code, run.task) == ("failed", 3, "cmd")
    assert run.params["argv"][-3:] == [code, "{name}", "-x"]


@pytest.mark.parametrize(("sig", "expected"), [("TERM", 143), ("KILL", 137)])
async def test_death_by_signal_exits_128_plus_n(
    tmp_path: Path, env: dict[str, str], sig: str, expected: int
) -> None:
    result = await cli("run", "-q", "--", "sh", "-c", f"kill -{sig} $$", cwd=tmp_path, env=env)
    assert result.code == expected, result.err


async def test_ansi_colours_are_kept_byte_for_byte(tmp_path: Path, env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "sys.stdout.write('\\x1b[1;31mred\\x1b[0m plain\\n\\x1b[32mno newline at the end')\n"
        "sys.stderr.write('\\x1b[33mwarn\\x1b[0m\\n')\n"
    )
    result = await cli("run", "-q", "--", *py(code), cwd=tmp_path, env=env)
    assert result.code == 0
    # The log records lines, not whether the very last one had its newline: it gets one.
    assert result.stdout == b"\x1b[1;31mred\x1b[0m plain\n\x1b[32mno newline at the end\n"
    assert result.stderr == b"\x1b[33mwarn\x1b[0m\n"


async def test_one_mib_line_arrives_whole(tmp_path: Path, env: dict[str, str]) -> None:
    code = "import sys\nsys.stdout.write('a' * (1 << 20) + 'Z\\n' + 'after\\n')\n"
    result = await cli("run", "-q", "--", *py(code), cwd=tmp_path, env=env)
    assert result.code == 0
    assert result.stdout == b"a" * (1 << 20) + b"Z\nafter\n"


async def test_a_prompt_without_newline_shows_while_the_command_waits(
    tmp_path: Path, env: dict[str, str]
) -> None:
    code = "import sys, time\nsys.stdout.write('waiting> ')\nsys.stdout.flush()\ntime.sleep(30)"
    proc = await start_cli("run", "-q", "--", *py(code), cwd=tmp_path, env=env)
    try:
        assert proc.stdout is not None
        seen = await read_until(proc.stdout, b"waiting> ", timeout=15)
        assert seen == b"waiting> "
    finally:
        proc.send_signal(signal.SIGINT)
        result = await finish(proc)
    assert result.code == 130


async def test_missing_program_exits_127_with_a_message(
    tmp_path: Path, env: dict[str, str]
) -> None:
    result = await cli("run", "-q", "--", "no-such-program-xyz", cwd=tmp_path, env=env)
    assert result.code == 127
    assert "executable not found: no-such-program-xyz" in result.err


async def test_timeout_ends_timed_out_with_124(tmp_path: Path, env: dict[str, str]) -> None:
    result = await cli(
        "run", "--timeout", "0.5", "--grace", "1", "--",
        *py("import time; print('go'); time.sleep(30)"),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.code == 124
    assert result.out == "go\n"
    assert (await stored_run(run_id_from(result.stderr), env)).status == "timed_out"


TRAPPING_CHILD = """
import os, signal, sys, time
def on_term(signum, frame):
    print('got SIGTERM, cleaning up', flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], 'w').write(str(os.getpgid(0)))
print('ready', flush=True)
while True:
    time.sleep(0.1)
"""

IGNORING_CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], 'w').write(str(os.getpgid(0)))
print('ready', flush=True)
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize(
    ("sig", "reason"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGHUP, "received SIGHUP")]
)
async def test_ctrl_c_or_hangup_cancels_gracefully_and_records_cancelled(
    tmp_path: Path, env: dict[str, str], sig: signal.Signals, reason: str
) -> None:
    pgid_file = tmp_path / "pgid"
    proc = await start_cli("run", "--", *py(TRAPPING_CHILD), str(pgid_file), cwd=tmp_path, env=env)
    assert proc.stdout is not None
    await read_until(proc.stdout, b"ready\n")
    proc.send_signal(sig)
    result = await finish(proc)
    assert result.code == 130, result.err
    # The child got SIGTERM and its handler ran: a graceful stop, not a kill.
    assert result.out == "got SIGTERM, cleaning up\n"
    assert not group_alive(int(pgid_file.read_text()))
    run = await stored_run(run_id_from(result.stderr), env)
    assert run.status == "cancelled"
    assert reason in str(run.error)


async def test_second_ctrl_c_kills_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    pgid_file = tmp_path / "pgid"
    proc = await start_cli(
        "run", "--grace", "60", "--", *py(IGNORING_CHILD), str(pgid_file), cwd=tmp_path, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    await read_until(proc.stdout, b"ready\n")
    proc.send_signal(signal.SIGINT)
    await read_until(proc.stderr, b"Ctrl-C again")
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    result = await finish(proc)
    assert result.code == 130
    assert time.monotonic() - started < 20  # far below the 60 s grace
    assert not group_alive(int(pgid_file.read_text()))
    (run,) = await stored_runs(env)
    assert run.status == "cancelled"


async def test_cancel_from_another_terminal_stops_the_run(
    tmp_path: Path, env: dict[str, str]
) -> None:
    pgid_file = tmp_path / "pgid"
    proc = await start_cli("run", "--", *py(TRAPPING_CHILD), str(pgid_file), cwd=tmp_path, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    run_id = (await read_until(proc.stderr, b"\n")).decode().strip()
    await read_until(proc.stdout, b"ready\n")
    cancelled = await cli("cancel", run_id, cwd=tmp_path, env=env)
    assert cancelled.code == 0, cancelled.err
    assert "cancel requested" in cancelled.out
    result = await finish(proc)
    assert result.code == 130
    assert not group_alive(int(pgid_file.read_text()))
    assert (await stored_run(run_id, env)).status == "cancelled"


def test_usage_errors_exit_2() -> None:
    runner = CliRunner()
    nothing = runner.invoke(cli_group, ["run"])
    assert nothing.exit_code == 2
    assert "-- CMD" in nothing.output
    both = runner.invoke(cli_group, ["run", "sometask", "--", "echo"])
    assert both.exit_code == 2
    assert "not both" in both.output
    empty = runner.invoke(cli_group, ["run", "--"])
    assert empty.exit_code == 2


async def test_concurrent_runs_share_the_local_store(tmp_path: Path, env: dict[str, str]) -> None:
    results = await asyncio.gather(
        *(cli("run", "-q", "--", *py(f"print({i})"), cwd=tmp_path, env=env) for i in range(3))
    )
    assert sorted(r.out for r in results) == ["0\n", "1\n", "2\n"]
    assert [r.status for r in await stored_runs(env)] == ["succeeded"] * 3


async def test_a_closed_pipe_stops_the_command_like_sigpipe(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """``runstream run -- CMD | head -1``: the reader left, so CMD is stopped, exit 141."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", '"$@" | head -1; exit "${PIPESTATUS[0]}"', "sh", *CLI,
        "run", "-q", "--", "yes", "endless",
        cwd=tmp_path, env=cli_env(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    result = await finish(proc)
    assert result.out == "endless\n"  # and `yes` never ends by itself
    assert result.code == 141, result.err
    (run,) = await stored_runs(env)
    assert run.status == "cancelled"
