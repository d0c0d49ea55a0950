"""Run one command in its own process group and hand its output, as lines, to a sink.

:func:`run_process` knows nothing about runs, streams or HTTP. It starts
``argv`` (a list, never a shell string) with stdin on ``/dev/null`` and
stdout/stderr on pipes, reads both pipes concurrently, splits them into
:class:`~runstream.runner.lines.OutputLine` records and awaits
``sink(batch)`` from one writer task with everything gathered since the
previous call (an :class:`~runstream.runner.lines.OutputBatch`: a sequence of
records that :func:`~runstream.runner.lines.encode_runs` encodes cheaply). It
returns a :class:`ProcessResult` once the child has exited, its output is
drained and the sink has seen every record.

Stopping: a ``timeout`` and the ``cancel`` event share one path. SIGTERM goes
to the whole process group, and SIGKILL follows after ``grace`` seconds if the
child or anything holding its pipes is still there. The result's ``outcome``
says which of the two it was.

Buffering for children that are not Python: a C program whose stdout is a
pipe buffers it in 4-8 KiB blocks, so lines show up late. Wrap it with
``stdbuf -oL -eL CMD ...`` (glibc programs), or run it under a pty (e.g.
``script -qfc``) if it ignores stdbuf. Python children get
``PYTHONUNBUFFERED=1`` from :func:`default_env`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from runstream.errors import ValidationError
from runstream.runner.guard import guarded_argv, resolve_executable
from runstream.runner.lines import DEFAULT_MAX_LINE, LineSplitter, OutputBatch, OutputLine

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_BUFFER",
    "Outcome",
    "ProcessResult",
    "Sink",
    "default_env",
    "run_process",
]

Sink: TypeAlias = Callable[[Sequence[OutputLine]], Awaitable[None]]
"""Awaited with each batch of records; :func:`run_process` passes an
:class:`~runstream.runner.lines.OutputBatch`."""
Outcome: TypeAlias = Literal["exited", "timed_out", "cancelled", "failed_to_start"]

DEFAULT_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL."""
DEFAULT_FLUSH_INTERVAL = 0.2
"""Text without a line end is emitted (as ``partial``) after this much quiet on its pipe."""
DEFAULT_MAX_BUFFER = 8 << 20
"""Bytes read but not yet accepted by the sink before pipe reading pauses."""
DEFAULT_DRAIN_TIMEOUT = 2.0
"""After the child exits, how long to wait for its pipes to close."""

_ABANDON_TIMEOUT = 1.0
"""After SIGKILL of the group, how long to wait for pipe EOF before closing our end.

Only a process that left the group (``setsid``) can still hold the pipe then."""
_REAP_TIMEOUT = 10.0
"""Bound on waiting for a SIGKILLed child to be reaped during cleanup."""
_GROUP_POLL = 0.02
_GROUP_GONE_TIMEOUT = 2.0
"""How long to poll for the last killed group members to die (no event exists for it)."""

_STDOUT, _STDERR = 1, 2

_FLUSH_MAX_AGE = 5
"""Unfinished text that keeps growing is flushed after this many flush intervals."""

# Copied from the parent's environment by default_env(); everything else
# (tokens, credentials, the server's own settings) stays out of the child.
_ENV_KEEP = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
)
_ENV_KEEP_PREFIXES = ("LC_",)


def default_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a child gets when none is given.

    A minimal copy of ``os.environ`` (``PATH``, ``HOME``, ``USER``,
    ``LOGNAME``, ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``, ``TMPDIR``,
    ``TERM``) plus ``PYTHONUNBUFFERED=1``, then ``extra`` on top. Callers that
    build their own environment should start from this one.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key in _ENV_KEEP or key.startswith(_ENV_KEEP_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True, slots=True)
class ProcessResult:
    """How a child ended.

    ``exit_code`` is the child's exit status, or ``None`` if it died from a
    signal (then ``signal`` holds the number) or never started (then
    ``error`` says why). ``duration`` is in seconds, from start to result.
    """

    outcome: Outcome
    exit_code: int | None
    signal: int | None
    error: str | None
    pid: int | None
    duration: float


def _check_argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, (str, bytes)):
        raise ValidationError(
            "argv must be a list of arguments, never a shell string", field="command"
        )
    items = list(argv)
    if not items:
        raise ValidationError("argv must name a program", field="command")
    for item in items:
        if not isinstance(item, str):
            raise ValidationError(f"argv items must be strings, got {item!r}", field="command")
        if "\0" in item:
            raise ValidationError("argv items must not contain NUL", field="command")
    return items


def _start_error(exc: OSError, program: str, cwd: str | None) -> str:
    if cwd is not None and exc.filename == cwd:
        return f"working directory not usable: {cwd} ({exc.strerror or exc})"
    if isinstance(exc, FileNotFoundError):
        return f"executable not found: {program}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {program}"
    return f"cannot start {program}: {exc.strerror or exc}"


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` lives (zombies awaiting a reaper do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Killed members linger as zombies until their reaper (often PID 1) gets
    # to them; /proc tells the living from the dead.
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


class _Capture(asyncio.SubprocessProtocol):
    """Protocol and state of one child: pipes → splitters → batch → sink."""

    def __init__(
        self, sink: Sink, *, max_line: int, flush_interval: float, max_buffer: int
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer
        self._splitters = {
            _STDOUT: LineSplitter("stdout", max_line=max_line),
            _STDERR: LineSplitter("stderr", max_line=max_line),
        }
        self._open_fds = {_STDOUT, _STDERR}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._last_data = {_STDOUT: 0.0, _STDERR: 0.0}
        self._pending_since: dict[int, float | None] = {_STDOUT: None, _STDERR: None}
        self._received = {_STDOUT: 0, _STDERR: 0}  # chunks per pipe, to spot late arrivals
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self.pipes_closed: asyncio.Future[None] = self._loop.create_future()
        # Output waiting for the sink, and the bytes it came from (for backpressure).
        self._out = OutputBatch()
        self._queued_bytes = 0
        self._sinking_bytes = 0
        self.paused = False
        self._wake = asyncio.Event()
        self._finished = False

    # -- protocol callbacks (run on the event loop) ---------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        splitter = self._splitters[fd]
        lines = splitter.feed_batch(data)
        self._queued_bytes += len(data)
        self._received[fd] += 1
        now = self._last_data[fd] = self._loop.time()
        if lines:
            self._push(lines)
        if not splitter.pending_bytes:
            self._pending_since[fd] = None
        elif lines or self._pending_since[fd] is None:
            self._pending_since[fd] = now  # a new unfinished line starts here
            self._arm(fd, self._flush_interval)
        if not self.paused and self._queued_bytes + self._sinking_bytes >= self._max_buffer:
            self._set_paused(True)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._end_pipe(fd)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    # -- helpers ----------------------------------------------------------------

    # Timer flush. Text without a line end is passed on once its stream has
    # been quiet for flush_interval, or has kept growing for
    # _FLUSH_MAX_AGE x flush_interval. A tail cut off only because *we* were
    # slow must not be split: so never while reading is paused for the sink,
    # never while unread data waits in the pipe, and only after data already
    # read but still queued on the loop has been fed.

    def _arm(self, fd: int, delay: float) -> None:
        if fd not in self._timers:
            self._timers[fd] = self._loop.call_later(delay, self._on_timer, fd)

    def _on_timer(self, fd: int) -> None:
        self._timers.pop(fd, None)
        since = self._pending_since[fd]
        if fd not in self._open_fds or since is None or self.paused:
            return  # resuming re-arms
        due = min(
            self._last_data[fd] + self._flush_interval,
            since + self._flush_interval * _FLUSH_MAX_AGE,
        )
        now = self._loop.time()
        if now < due:
            self._arm(fd, due - now)
        elif self._pipe_readable(fd):
            self._arm(fd, self._flush_interval)
        else:
            self._loop.call_soon(self._flush, fd, self._received[fd])

    def _flush(self, fd: int, received: int) -> None:
        if fd not in self._open_fds or self.paused:
            return
        if received != self._received[fd]:
            # More data came in after all; it re-armed the timer if still needed.
            if self._pending_since[fd] is not None:
                self._arm(fd, self._flush_interval)
            return
        self._push(OutputBatch(self._splitters[fd].flush()))
        self._pending_since[fd] = None

    def _pipe_readable(self, fd: int) -> bool:
        """True if data (or EOF) is waiting in the pipe, unread."""
        pipe = self.transport.get_pipe_transport(fd) if self.transport is not None else None
        file = pipe.get_extra_info("pipe") if pipe is not None else None
        if file is None:
            return False
        poller = select.poll()
        poller.register(file.fileno(), select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return False

    def _push(self, lines: OutputBatch) -> None:
        if lines:
            self._out.extend(lines)
            self._wake.set()

    def _end_pipe(self, fd: int) -> None:
        if fd not in self._open_fds:
            return
        self._open_fds.discard(fd)
        timer = self._timers.pop(fd, None)
        if timer is not None:
            timer.cancel()
        self._push(OutputBatch(self._splitters[fd].close()))
        if not self._open_fds and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self.transport is None:
            return
        for fd in self._open_fds:
            pipe = self.transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport):
                if paused:
                    pipe.pause_reading()
                else:
                    pipe.resume_reading()
                    if self._pending_since[fd] is not None:
                        self._arm(fd, self._flush_interval)

    def abandon_pipes(self) -> None:
        """Stop reading: close our ends of the pipes and emit what was received."""
        if self.transport is not None:
            for fd in list(self._open_fds):
                pipe = self.transport.get_pipe_transport(fd)
                if pipe is not None:
                    pipe.close()
        for fd in list(self._open_fds):
            self._end_pipe(fd)

    def cancel_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def finish(self) -> None:
        """No more output will come: the writer ends once the sink has the rest."""
        self._finished = True
        self._wake.set()

    async def write_loop(self) -> None:
        """Hand batches to the sink, one call at a time, until :meth:`finish`."""
        while True:
            if not self._out:
                if self._finished:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._out = self._out, OutputBatch()
            self._sinking_bytes, self._queued_bytes = self._queued_bytes, 0
            await self._sink(batch)
            self._sinking_bytes = 0
            if self.paused and self._queued_bytes < self._max_buffer:
                self._set_paused(False)


async def run_process(
    argv: Sequence[str],
    *,
    sink: Sink,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    # The child's time limit, ending in outcome "timed_out"; not a limit on this call.
    timeout: float | None = None,  # noqa: ASYNC109
    grace: float = DEFAULT_GRACE,
    cancel: asyncio.Event | None = None,
    max_line: int = DEFAULT_MAX_LINE,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    max_buffer: int = DEFAULT_MAX_BUFFER,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> ProcessResult:
    """Run ``argv`` to completion, streaming its output to ``sink``.

    ``argv`` is a list; no shell is involved, so its items reach the program
    verbatim. The child runs in a new session (its own process group), with
    stdin on ``/dev/null``, ``env`` as its whole environment (default:
    :func:`default_env`) and ``cwd`` as working directory.

    ``sink`` is awaited with batches of records (each an
    :class:`~runstream.runner.lines.OutputBatch`), never concurrently with
    itself, in order within each stream. While it runs, output keeps being
    read and gathered into the next batch, so a slow sink gets bigger batches
    and does not slow the child down until ``max_buffer`` bytes are waiting;
    then reading pauses (the child blocks on its next write) and nothing is
    dropped. Text without a line end is passed on (as ``partial``) once the
    stream has been quiet for ``flush_interval`` seconds, or after
    5 × ``flush_interval`` if it keeps growing without a line end.

    Ending:

    * the child exits: ``outcome="exited"``. If something it started keeps
      the pipes open, that is waited for at most ``drain_timeout`` seconds.
      Then whatever is left of the process group is killed with SIGKILL:
      background processes do not outlive the run.
    * ``timeout`` seconds pass or ``cancel`` is set: SIGTERM to the group,
      SIGKILL after ``grace`` seconds; ``outcome`` is ``"timed_out"`` or
      ``"cancelled"``.
    * the program cannot be started: ``outcome="failed_to_start"`` with
      ``error`` saying why; nothing is raised.

    When this function returns, the child has been reaped, no process of
    its group is alive, and the sink has received every record.

    Raises :class:`~runstream.errors.ValidationError` for a bad ``argv`` or
    limits. If ``sink`` raises, the group is killed with SIGKILL, the child
    reaped, and the sink's exception re-raised; records not yet handed over
    are lost. If the calling task is cancelled (e.g. runner shutdown), the
    group is killed with SIGKILL (no grace: use ``cancel`` for a graceful
    stop), the child reaped, and :class:`asyncio.CancelledError` re-raised.
    """
    args = _check_argv(argv)
    for name, value in (
        ("grace", grace),
        ("flush_interval", flush_interval),
        ("drain_timeout", drain_timeout),
    ):
        if value < 0:
            raise ValidationError(f"{name} must be >= 0", field=name)
    if timeout is not None and timeout < 0:
        raise ValidationError("timeout must be >= 0", field="timeout")
    if max_buffer < 1:
        raise ValidationError("max_buffer must be >= 1", field="max_buffer")

    loop = asyncio.get_running_loop()
    started = loop.time()
    capture = _Capture(
        sink, max_line=max_line, flush_interval=flush_interval, max_buffer=max_buffer
    )
    child_env = dict(env) if env is not None else default_env()
    problem = resolve_executable(args[0], child_env, cwd)
    if problem is not None:
        return ProcessResult("failed_to_start", None, None, problem, None, loop.time() - started)
    # The guard (see runner.guard) kills the group if this process dies: it watches
    # the read end of a pipe whose only write end we hold until the run is over.
    guard_r, guard_w = os.pipe()
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: capture,
            *guarded_argv(args, guard_r, grace),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=(guard_r,),
        )
    except OSError as exc:
        os.close(guard_w)
        error = _start_error(exc, args[0], cwd)
        return ProcessResult("failed_to_start", None, None, error, None, loop.time() - started)
    finally:
        os.close(guard_r)
    supervisor = _Supervisor(capture, transport, started)
    try:
        return await supervisor.run(
            time_limit=timeout, grace=grace, cancel=cancel, drain_timeout=drain_timeout
        )
    finally:
        capture.cancel_timers()
        transport.close()
        os.close(guard_w)


class _Supervisor:
    """Drives one started child through exit or kill, drain and the last sink call."""

    def __init__(
        self, capture: _Capture, transport: asyncio.SubprocessTransport, started: float
    ) -> None:
        self._capture = capture
        self._transport = transport
        self._started = started
        self._loop = asyncio.get_running_loop()
        pid = transport.get_pid()
        # start_new_session makes the child the leader of a new group: pgid == pid.
        assert pid > 1
        self._pgid = pid

    def _signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the whole group; False if the group is already gone."""
        try:
            os.killpg(self._pgid, signum)
        except ProcessLookupError:
            return False
        except PermissionError:
            # A member changed its credentials (setuid); the others got the signal.
            return True
        return True

    async def _wait(
        self,
        futures: Collection[asyncio.Future[None]],
        writer: asyncio.Task[None],
        seconds: float | None,
    ) -> bool:
        """True once all ``futures`` are done, False after ``seconds``; raises the sink's error."""
        deadline = None if seconds is None else self._loop.time() + seconds
        for fut in futures:
            while not fut.done():
                remaining = None if deadline is None else deadline - self._loop.time()
                if remaining is not None and remaining <= 0:
                    return False
                await asyncio.wait(
                    (fut, writer), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if writer.done():
                    writer.result()  # the sink failed: raise its error
                    raise AssertionError("the writer ended before the output did")
        return True

    async def run(
        self,
        *,
        time_limit: float | None,
        grace: float,
        cancel: asyncio.Event | None,
        drain_timeout: float,
    ) -> ProcessResult:
        capture = self._capture
        writer = asyncio.create_task(capture.write_loop())
        cancel_waiter = asyncio.create_task(cancel.wait()) if cancel is not None else None
        try:
            outcome: Outcome = "exited"
            stop = await self._wait_exit(writer, cancel_waiter, time_limit)
            if stop is not None:
                outcome = stop
                await self._terminate(writer, grace)
            await self._drain(writer, drain_timeout)
            if self._signal_group(signal.SIGKILL):
                await self._wait_group_gone()
            capture.finish()
            await writer
        except BaseException:
            await self._kill_and_reap(writer)
            raise
        finally:
            if cancel_waiter is not None:
                cancel_waiter.cancel()
        returncode = self._transport.get_returncode()
        assert returncode is not None
        return ProcessResult(
            outcome,
            returncode if returncode >= 0 else None,
            -returncode if returncode < 0 else None,
            None,
            self._pgid,
            self._loop.time() - self._started,
        )

    async def _wait_exit(
        self,
        writer: asyncio.Task[None],
        cancel_waiter: asyncio.Task[bool] | None,
        time_limit: float | None,
    ) -> Outcome | None:
        """Wait for the child to exit; return why it must be stopped instead, if so."""
        deadline = None if time_limit is None else self._started + time_limit
        waiting: set[asyncio.Future[Any]] = {self._capture.exited, writer}
        if cancel_waiter is not None:
            waiting.add(cancel_waiter)
        while True:
            if self._capture.exited.done():
                return None
            if writer.done():
                writer.result()
            if cancel_waiter is not None and cancel_waiter.done():
                return "cancelled"
            remaining = None if deadline is None else deadline - self._loop.time()
            if remaining is not None and remaining <= 0:
                return "timed_out"
            await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    async def _terminate(self, writer: asyncio.Task[None], grace: float) -> None:
        """SIGTERM the group; SIGKILL it if the child or a pipe holder outlives ``grace``."""
        self._signal_group(signal.SIGTERM)
        capture = self._capture
        done = await self._wait((capture.exited, capture.pipes_closed), writer, grace)
        if not done:
            self._signal_group(signal.SIGKILL)
        await self._wait((capture.exited,), writer, None)

    async def _drain(self, writer: asyncio.Task[None], drain_timeout: float) -> None:
        """After exit: read the pipes to EOF, however long their last holders take (bounded)."""
        capture = self._capture
        for limit, then_kill in ((drain_timeout, True), (_ABANDON_TIMEOUT, False)):
            while not await self._wait((capture.pipes_closed,), writer, limit):
                # While reading is paused for a slow sink the pipes cannot reach
                # EOF; that is not a grandchild's fault, so keep waiting.
                if not capture.paused:
                    break
            if capture.pipes_closed.done():
                return
            if then_kill:
                self._signal_group(signal.SIGKILL)
        # A process outside the group (it called setsid) still holds a pipe.
        capture.abandon_pipes()

    async def _wait_group_gone(self) -> None:
        # Polling: the kernel offers no notification for "process group empty".
        deadline = self._loop.time() + _GROUP_GONE_TIMEOUT
        while _group_alive(self._pgid) and self._loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_GROUP_POLL)

    async def _kill_and_reap(self, writer: asyncio.Task[None]) -> None:
        """Cleanup on error or cancellation: SIGKILL the group, reap, stop the writer.

        Runs to the end even if the task is cancelled again meanwhile.
        """
        self._signal_group(signal.SIGKILL)
        writer.cancel()
        self._capture.abandon_pipes()
        pending: set[asyncio.Future[None]] = {self._capture.exited, writer}
        deadline = self._loop.time() + _REAP_TIMEOUT
        while pending and self._loop.time() < deadline:
            with contextlib.suppress(asyncio.CancelledError):
                _, pending = await asyncio.wait(pending, timeout=deadline - self._loop.time())
        with contextlib.suppress(asyncio.CancelledError):
            await self._wait_group_gone()
        if writer.done() and not writer.cancelled():
            writer.exception()  # retrieved: the caller gets it re-raised from run()
