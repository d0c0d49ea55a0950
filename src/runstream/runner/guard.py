"""A guard process so that a command never outlives the runner that started it.

The runner starts ``python -I -S -c GUARD_SOURCE <fd> <grace> ARGV...`` as the
leader of a new process group instead of the command itself. The guard forks
and execs the command in that group and waits for it, while holding the read
end of a pipe whose only write end belongs to the runner. If the runner dies —
even by ``kill -9``, when nothing of it can clean up — the kernel closes that
write end, the guard reads EOF, and it kills the whole group (SIGTERM, then
SIGKILL after ``grace``). Without it, a crashed worker's command keeps running
while the run is retried elsewhere.

The guard is transparent otherwise: the command inherits stdin/stdout/stderr,
the environment and the working directory; the guard exits with the command's
exit code, or dies of the same signal. It ignores SIGTERM/SIGINT itself so
that a group-wide SIGTERM from the runner reaches the command and the guard
stays to report how it ended (a group SIGKILL still ends both).

``GUARD_SOURCE`` runs with ``-I -S`` (no site, no environment) and imports
nothing from runstream, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

__all__ = ["GUARD_SOURCE", "guarded_argv", "resolve_executable"]

GUARD_SOURCE = r"""
import os, select, signal, sys, time
fd, grace, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
pid = os.fork()
if pid == 0:
    os.close(fd)
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, ("runstream: cannot run %s: %s\n" % (argv[0], exc.strerror)).encode())
        os._exit(127)
def finish(status):
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    try:
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL/SIGSTOP have no handler to reset
    os.kill(os.getpid(), -code)
    os._exit(128 - code)
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        finish(status)
    ready, _, _ = select.select([fd, wake_r], [], [])
    if wake_r in ready:
        os.read(wake_r, 512)
    if fd in ready and not os.read(fd, 512):
        # The runner is gone: nothing will ever read this command's output or stop it.
        os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        os.killpg(0, signal.SIGKILL)
"""


def resolve_executable(program: str, env: dict[str, str], cwd: str | None) -> str | None:
    """Why ``program`` cannot be started, or ``None`` if it can (checked before the guard runs).

    The guard execs the command itself, so start failures must be found here
    to keep reporting them as ``failed_to_start`` rather than as exit code 127.
    """
    if cwd is not None and not os.path.isdir(cwd):
        return f"working directory not usable: {cwd} (No such file or directory)"
    if os.sep in program:
        path = program if cwd is None or os.path.isabs(program) else os.path.join(cwd, program)
        if not os.path.exists(path):
            return f"executable not found: {program}"
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            return f"permission denied: {program}"
        return None
    search = env.get("PATH", os.defpath)
    if shutil.which(program, path=search) is None:
        return f"executable not found: {program}"
    return None


def guarded_argv(argv: Sequence[str], fd: int, grace: float) -> list[str]:
    """The argv that runs ``argv`` under the guard watching pipe ``fd``."""
    return [sys.executable, "-I", "-S", "-c", GUARD_SOURCE, str(fd), repr(float(grace)), *argv]
