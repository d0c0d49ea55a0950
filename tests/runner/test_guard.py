"""A command never outlives the runner that started it, even when the runner is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from runstream.runner.process import _group_alive

RUNNER = textwrap.dedent(
    """
    import asyncio, sys
    from runstream.runner.process import run_process

    COMMAND = (
        "import os, subprocess, sys, time\\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\\n"
        "print(os.getpgid(0), p.pid, flush=True)\\n"
        "time.sleep(300)\\n"
    )

    async def sink(batch):
        for line in batch:
            print(line.line, flush=True)

    asyncio.run(run_process([sys.executable, "-c", COMMAND], sink=sink, grace=1.0))
    """
)


@pytest.mark.timeout(60)
def test_sigkilled_runner_takes_its_command_and_grandchildren_down() -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER], stdout=subprocess.PIPE, start_new_session=True
    )
    assert runner.stdout is not None
    first = runner.stdout.readline().split()
    pgid, grandchild = int(first[0]), int(first[1])
    assert _group_alive(pgid)
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    runner.stdout.close()
    deadline = time.monotonic() + 15
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting on processes we do not own: nothing to await
    assert not _group_alive(pgid), "the command's process group survived its runner"
    # The grandchild was in that group: it is gone too.
    assert grandchild > 0


def test_guard_is_transparent_for_exit_codes_and_signals() -> None:
    from runstream.runner.guard import guarded_argv

    r, w = os.pipe()
    try:
        for code in (0, 3, 255):
            argv = guarded_argv([sys.executable, "-c", f"raise SystemExit({code})"], r, 1.0)
            assert subprocess.run(argv, pass_fds=(r,), check=False).returncode == code
        argv = guarded_argv(
            [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGUSR1)"],
            r,
            1.0,
        )
        assert subprocess.run(argv, pass_fds=(r,), check=False).returncode == -signal.SIGUSR1
    finally:
        os.close(r)
        os.close(w)
