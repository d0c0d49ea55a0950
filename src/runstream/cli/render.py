"""Showing a run in the terminal: output, progress, status, exit codes, ``--json``.

Every command that prints a run's events (``run``, ``tail``, ``demo``) goes
through :class:`Renderer`, so they look and behave the same:

* ``stdout`` events go to standard output and ``stderr`` events to standard
  error, as the UTF-8 bytes of the line. ANSI colour codes are passed through
  untouched; a ``partial`` piece is written without a line end (the rest of
  the line follows); a ``cr`` segment ends with ``"\\r"`` as the program wrote
  it. Each stream is flushed after every event, so the order within stdout
  and within stderr is the order of the log, and a terminal showing both sees
  them interleaved as they happened.
* ``progress`` events drive a one-line Rich progress bar on standard error,
  only when standard error is a terminal. The bar is cleared before any output
  is written and drawn again once the output is back at the start of a line,
  so it never mixes with the program's text.
* ``result`` and ``item`` events (a Python task's return value and yielded
  values) are written to standard output as one JSON document per line.
* ``status`` events and the end of the run are reported on standard error
  (dim, or coloured for the final line) unless the caller turns that off.
* With ``json_mode`` every item is written as one JSON object per line on
  standard output and nothing else is printed there.

:func:`exit_code_for` maps a finished run to the process exit code the CLI
returns (the shell's conventions: 128+N for a death by signal N, 124 for a
timeout, 130 for an interrupt).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import IO, Any, NoReturn

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from runstream.core.model import Event, Reset
from runstream.errors import RunstreamError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CANCELLED",
    "EXIT_ERROR",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_SIGNAL_BASE",
    "EXIT_TIMED_OUT",
    "Renderer",
    "RunOutcome",
    "error_console",
    "exit_code_for",
    "print_error",
    "run_command",
    "status_style",
]

EXIT_ERROR = 1
"""A run that failed without an exit code, a lost run, or runstream itself failing."""
EXIT_TIMED_OUT = 124
"""Like coreutils ``timeout``."""
EXIT_CANCELLED = 130
"""Like a shell whose command was interrupted with Ctrl-C (128 + SIGINT)."""
EXIT_SIGNAL_BASE = 128
"""A command killed by signal N exits with 128 + N, as in a shell."""
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
"""A shell's codes for a command that exists but cannot run / does not exist."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a writer whose reader went away (``| head``)."""

_STYLES = {
    "succeeded": "bold green",
    "failed": "bold red",
    "timed_out": "bold red",
    "lost": "bold red",
    "cancelled": "bold yellow",
    "running": "cyan",
    "queued": "dim",
}
_MARKS = {"succeeded": "✔", "cancelled": "■", "queued": "…", "running": "▶"}

_CLEAR_LINE = b"\r\x1b[2K"
_VALUE_TYPES = frozenset({"result", "item"})
_PIPE_WIDTH = 250


def status_style(status: str) -> str:
    """The Rich style used for a run status everywhere in the CLI."""
    return _STYLES.get(status, "")


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended, as far as the CLI needs it."""

    status: str
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    duration: float | None = None

    @property
    def process_exit_code(self) -> int:
        return exit_code_for(self.status, self.exit_code, self.signal, self.error)


def exit_code_for(
    status: str, exit_code: int | None, signal: int | None = None, error: str | None = None
) -> int:
    """The CLI's exit code for a run that ended with ``status``.

    ``succeeded`` → 0; ``failed`` → the command's exit code, 128+N when signal
    N killed it, 127/126 when the program was not found / not executable, else
    1; ``timed_out`` → 124; ``cancelled`` → 130; ``lost`` or anything else → 1.
    """
    if status == "succeeded":
        return 0
    if status == "timed_out":
        return EXIT_TIMED_OUT
    if status == "cancelled":
        return EXIT_CANCELLED
    if status == "failed":
        if signal is not None:
            return EXIT_SIGNAL_BASE + signal
        if exit_code is not None and exit_code != 0:
            return exit_code & 0xFF or EXIT_ERROR
        if error is not None:
            if error.startswith("executable not found"):
                return EXIT_NOT_FOUND
            if error.startswith("permission denied"):
                return EXIT_NOT_EXECUTABLE
    return EXIT_ERROR


def _binary(stream: IO[str]) -> IO[bytes]:
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # pragma: no cover - a text-only replacement (e.g. some test runners)
        raise TypeError(f"{stream!r} has no binary buffer")
    return buffer  # type: ignore[no-any-return]


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Renderer:
    """Writes the items of one run's stream to the terminal (or as JSON lines).

    Feed it every item with :meth:`item` in order, then call :meth:`finish`
    once. ``out``/``err`` are binary streams (default: the process's standard
    output and error). ``progress`` forces the progress bar on or off (default:
    on when ``err`` is a terminal). ``show_status`` prints ``status`` changes
    and the final line; ``json_mode`` prints every item as JSON instead.

    After the end event, :attr:`outcome` says how the run ended (from the
    last ``status`` event, completed by the end event's status).
    """

    def __init__(
        self,
        *,
        out: IO[bytes] | None = None,
        err: IO[bytes] | None = None,
        console: Console | None = None,
        json_mode: bool = False,
        show_status: bool = True,
        progress: bool | None = None,
        on_broken_pipe: Callable[[], None] | None = None,
    ) -> None:
        self.out = out if out is not None else _binary(sys.stdout)
        self.err = err if err is not None else _binary(sys.stderr)
        self.console = console if console is not None else error_console()
        self.json_mode = json_mode
        self.show_status = show_status
        self.progress_enabled = (
            progress if progress is not None else (not json_mode and _isatty(self.err))
        )
        # Whether each stream's last write ended a line: the bar is drawn only then.
        self._at_line_start = {"stdout": True, "stderr": True}
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._bar_visible = False
        self.last_status: dict[str, Any] = {}
        self.end: Event | None = None
        self.events = 0
        self.resets: list[Reset] = []
        self.broken_pipe = False
        self._on_broken_pipe = on_broken_pipe
        self._unflushed: IO[bytes] | None = None
        self._flush_scheduled = False

    # -- feeding ------------------------------------------------------------------

    def item(self, item: Event | Reset) -> None:
        """Show one item from the follower (an event or a reset)."""
        if isinstance(item, Reset):
            self.resets.append(item)
            if self.json_mode:
                self._json({"type": "reset", "data": item.to_json()})
            else:
                self.message(
                    f"[yellow]history lost ({item.reason}): events up to {item.after} "
                    f"are gone; continuing after {item.after}[/]"
                )
            return
        self.events += 1
        if item.is_end:
            self.end = item
        elif item.type == "status" and isinstance(item.data, dict):
            self.last_status = dict(item.data)
        if self.json_mode:
            self._json(item.to_json())
            return
        data = item.data if isinstance(item.data, dict) else {}
        if item.type in ("stdout", "stderr"):
            self._output(item.type, data)
        elif item.type == "progress":
            self._on_progress(data)
        elif item.type == "status":
            self._on_status(data)
        elif item.type in _VALUE_TYPES:
            # A Python task's return value / yielded items are its output: one JSON
            # document per line on stdout, ready for `| jq`.
            self._output("stdout", {"line": json.dumps(item.data, ensure_ascii=False)})

    def message(self, markup: str) -> None:
        """A line of Rich markup on standard error (the bar is kept out of its way)."""
        self.flush()
        self._hide_bar()
        if not self._at_line_start["stderr"]:
            self.err.write(b"\n")
            self._at_line_start["stderr"] = True
        self.err.flush()
        self.console.print(markup, highlight=False)
        self.console.file.flush()
        self._maybe_show_bar()

    def finish(self, outcome: RunOutcome | None = None, *, label: str = "") -> None:
        """Remove the bar, end an unfinished line and print the final status line.

        ``outcome`` defaults to :attr:`outcome`; nothing is printed in JSON
        mode or when ``show_status`` is off.
        """
        self.flush()
        self._hide_bar()
        for name, stream in (("stdout", self.out), ("stderr", self.err)):
            if not self._at_line_start[name] and not self.json_mode and _isatty(stream):
                # The program's last line had no newline: keep the shell prompt off it
                # (on a terminal only; piped output stays byte for byte what was written).
                stream.write(b"\n")
                stream.flush()
                self._at_line_start[name] = True
        outcome = outcome or self.outcome
        if outcome is None or self.json_mode or not self.show_status:
            return
        self.console.print(self.status_line(outcome, label=label), highlight=False)

    @property
    def outcome(self) -> RunOutcome | None:
        """How the run ended, once its end event was seen."""
        if self.end is None:
            return None
        end_data = self.end.data if isinstance(self.end.data, dict) else {}
        status = str(end_data.get("status") or self.last_status.get("status") or "lost")
        last = self.last_status if self.last_status.get("status") == status else {}
        error = last.get("error") or end_data.get("reason")
        return RunOutcome(
            status=status,
            exit_code=_int_or_none(last.get("exit_code")),
            signal=_int_or_none(last.get("signal")),
            error=str(error) if error else None,
            duration=_float_or_none(last.get("duration")),
        )

    @staticmethod
    def status_line(outcome: RunOutcome, *, label: str = "") -> Text:
        """``✔ run-… succeeded in 1.2s`` / ``✘ run-… failed: exited with code 3`` (exit 3)."""
        mark = _MARKS.get(outcome.status, "✘")
        text = Text(f"{mark} ", style=status_style(outcome.status))
        if label:
            text.append(f"{label} ", style="bold")
        text.append(outcome.status, style=status_style(outcome.status))
        if outcome.duration is not None:
            text.append(f" in {outcome.duration:.1f}s")
        if outcome.error and outcome.status != "succeeded":
            text.append(f": {outcome.error}")
        text.append(f" (exit {outcome.process_exit_code})", style="dim")
        return text

    # -- output lines -------------------------------------------------------------------

    def _output(self, stream: str, data: dict[str, Any]) -> None:
        line = data.get("line")
        text = line if isinstance(line, str) else ("" if line is None else str(line))
        if data.get("partial"):
            end = ""
        elif data.get("cr"):
            end = "\r"
        else:
            end = "\n"
        target = self.out if stream == "stdout" else self.err
        self._hide_bar()
        # The log holds what the program's bytes decoded to (invalid bytes already
        # replaced); encoding it again reproduces them, escape codes included.
        if not self._write(target, (text + end).encode("utf-8", "surrogateescape")):
            return
        if end:
            self._at_line_start[stream] = True
        elif text:
            self._at_line_start[stream] = False
        self._maybe_show_bar()

    def _json(self, obj: dict[str, Any]) -> None:
        self._write(self.out, json.dumps(obj, ensure_ascii=False).encode() + b"\n")

    def _write(self, stream: IO[bytes], data: bytes) -> bool:
        """Write ``data``; on a closed pipe (``... | head``) stop writing and say so once.

        Flushing is deferred to the next turn of the event loop, so a burst of
        lines costs one system call, yet a line shows as soon as the reader
        waits for more. Switching between stdout and stderr flushes the other
        stream first, keeping their interleaving on a shared terminal.
        """
        if self.broken_pipe:
            return False
        try:
            if self._unflushed is not None and self._unflushed is not stream:
                self._unflushed.flush()
                self._unflushed = None
            stream.write(data)
        except BrokenPipeError:
            self._broke(stream)
            return False
        if self._unflushed is None:
            self._unflushed = stream
            self._flush_soon()
        return True

    def flush(self) -> None:
        """Flush what was written and not yet flushed."""
        stream, self._unflushed = self._unflushed, None
        if stream is None or self.broken_pipe:
            return
        try:
            stream.flush()
        except BrokenPipeError:
            self._broke(stream)

    def _flush_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def _broke(self, stream: IO[bytes]) -> None:
        self.broken_pipe = True
        self._unflushed = None
        _silence(stream)
        if self._on_broken_pipe is not None:
            self._on_broken_pipe()

    def _on_status(self, data: dict[str, Any]) -> None:
        status = str(data.get("status", ""))
        if not self.show_status or status not in ("queued", "running"):
            return  # the final status is reported by finish()
        details = []
        if status == "running" and data.get("attempt", 1) != 1:
            details.append(f"attempt {data['attempt']}")
        if data.get("retry"):
            details.append("retry")
        extra = f" ({', '.join(details)})" if details else ""
        self.message(f"[{status_style(status)}]{status}{extra}[/]")

    # -- progress bar -----------------------------------------------------------------

    def _on_progress(self, data: dict[str, Any]) -> None:
        if not self.progress_enabled:
            return
        current = _float_or_none(data.get("current"))
        total = _float_or_none(data.get("total"))
        message = data.get("message")
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                auto_refresh=False,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._progress.add_task(
                str(message or "progress"), total=total, completed=0
            )
        assert self._task is not None
        changes: dict[str, Any] = {}
        if total is not None:
            changes["total"] = total
        if current is not None:
            changes["completed"] = current
        if message is not None:
            changes["description"] = str(message)
        self._progress.update(self._task, **changes)
        self._hide_bar()
        self._maybe_show_bar()

    def render_bar(self) -> str:
        """The bar as one line of terminal text (empty before any progress event)."""
        if self._progress is None:
            return ""
        width = max(20, self.console.width - 1)  # never let the terminal wrap the line
        with self.console.capture() as capture:
            self.console.print(self._progress.get_renderable(), width=width, crop=True)
        lines = capture.get().splitlines()
        return lines[0] if lines else ""

    def _maybe_show_bar(self) -> None:
        if (
            not self.progress_enabled
            or self._progress is None
            or self._bar_visible
            or not all(self._at_line_start.values())
        ):
            return
        line = self.render_bar()
        if not line:
            return
        self.flush()  # the program's output first, then the bar below it
        self.err.write(_CLEAR_LINE + line.encode("utf-8", "replace"))
        self.err.flush()
        self._bar_visible = True

    def _hide_bar(self) -> None:
        if self._bar_visible:
            self.err.write(_CLEAR_LINE)
            self.err.flush()
            self._bar_visible = False


def _silence(stream: IO[bytes]) -> None:
    """Point a stream whose reader went away at /dev/null, so no later flush can fail."""
    import os

    try:
        fd = stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _float_or_none(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# -- shared by every command ---------------------------------------------------------------


def error_console() -> Console:
    """A Rich console on standard error (colours only when it is a terminal).

    Not a terminal: lines are not wrapped at Rich's assumed 80 columns.
    """
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, highlight=False, width=_PIPE_WIDTH)
    return console


def print_error(message: str) -> None:
    """``runstream: <message>`` in red on standard error."""
    error_console().print(Text("runstream: ", style="bold red") + Text(message))


def run_command(main: Coroutine[Any, Any, int]) -> NoReturn:
    """Run a command's coroutine and exit with the code it returns.

    A :class:`~runstream.errors.RunstreamError` escaping from it is printed as
    one line (no traceback) and exits with :data:`EXIT_ERROR`.
    """
    try:
        code = asyncio.run(main)
    except RunstreamError as exc:
        print_error(str(exc))
        code = EXIT_ERROR
    except KeyboardInterrupt:
        # Ctrl-C before the command installed its own handler (e.g. while starting up).
        code = EXIT_CANCELLED
    sys.stdout.flush()
    sys.exit(code)
