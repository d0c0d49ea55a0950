"""The shared terminal rendering: output bytes, progress bar, status line, JSON, exit codes."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console

from runstream.cli.render import Renderer, RunOutcome, exit_code_for
from runstream.core.model import Event, Reset


class FakeTTY(io.BytesIO):
    def isatty(self) -> bool:
        return True


def ev(id_: int, type_: str, data: Any) -> Event:
    return Event(id_, type_, data, 0.0)


def make(**kw: Any) -> tuple[Renderer, io.BytesIO, io.BytesIO, io.StringIO]:
    out = kw.pop("out", io.BytesIO())
    err = kw.pop("err", io.BytesIO())
    text = io.StringIO()
    console = Console(file=text, width=60, force_terminal=kw.pop("terminal", False))
    return Renderer(out=out, err=err, console=console, **kw), out, err, text


@pytest.mark.parametrize(
    ("status", "code", "sig", "error", "expected"),
    [
        ("succeeded", 0, None, None, 0),
        ("failed", 3, None, "exited with code 3", 3),
        ("failed", None, 9, "killed by signal SIGKILL (9)", 137),
        ("failed", None, None, "executable not found: x", 127),
        ("failed", None, None, "permission denied: x", 126),
        ("failed", None, None, "ValueError: boom", 1),
        ("failed", 256, None, None, 1),  # never report success for a failure
        ("timed_out", None, 15, None, 124),
        ("cancelled", None, 15, None, 130),
        ("lost", None, None, "worker gone", 1),
    ],
)
def test_exit_codes_follow_shell_conventions(
    status: str, code: int | None, sig: int | None, error: str | None, expected: int
) -> None:
    assert exit_code_for(status, code, sig, error) == expected


def test_output_events_are_written_as_the_program_wrote_them() -> None:
    r, out, err, _ = make(show_status=False)
    items = [
        ev(1, "status", {"status": "running"}),
        ev(2, "stdout", {"line": "\x1b[31mred\x1b[0m"}),
        ev(3, "stdout", {"line": "half ", "partial": True}),
        ev(4, "stderr", {"line": "oops", "level": "error"}),
        ev(5, "stdout", {"line": "and the rest"}),
        ev(6, "stdout", {"line": " 50%", "cr": True}),
        ev(7, "stdout", {"line": "100%"}),
        ev(8, "stdout", {"line": "caf\u00e9 \ufffd"}),
        ev(9, "status", {"status": "succeeded", "exit_code": 0, "duration": 1.5}),
        ev(10, "end", {"status": "succeeded", "reason": None}),
    ]
    for item in items:
        r.item(item)
    assert out.getvalue() == (
        b"\x1b[31mred\x1b[0m\nhalf and the rest\n 50%\r100%\n" + "café \ufffd\n".encode()
    )
    assert err.getvalue() == b"oops\n"
    assert r.outcome == RunOutcome("succeeded", 0, None, None, 1.5)


def test_outcome_takes_exit_code_and_signal_from_the_last_status_event() -> None:
    r, *_ = make()
    r.item(ev(1, "status", {"status": "failed", "signal": 15, "error": "killed by signal"}))
    assert r.outcome is None  # not ended yet
    r.item(ev(2, "end", {"status": "failed", "reason": "killed by signal"}))
    assert r.outcome is not None
    assert r.outcome.process_exit_code == 143


def test_status_line_says_how_the_run_ended() -> None:
    r, _, _, text = make()
    r.item(ev(1, "status", {"status": "failed", "exit_code": 3, "error": "exited with code 3"}))
    r.item(ev(2, "end", {"status": "failed"}))
    r.finish(label="run-x")
    line = text.getvalue().strip()
    assert line.startswith("✘ run-x failed")
    assert "exited with code 3" in line
    assert line.endswith("(exit 3)")


def test_json_mode_prints_one_parseable_object_per_item() -> None:
    r, out, err, text = make(json_mode=True)
    r.item(ev(1, "stdout", {"line": "x"}))
    r.item(Reset("e1", 5, "trimmed", 2))
    r.item(ev(6, "end", {"status": "succeeded"}))
    r.finish()
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["type"] for o in objs] == ["stdout", "reset", "end"]
    assert objs[1]["data"]["after"] == 5
    assert err.getvalue() == b""
    assert text.getvalue() == ""


def test_reset_is_reported_not_skipped() -> None:
    r, _, _, text = make()
    r.item(Reset("e1", 5, "trimmed", 2))
    assert "history lost (trimmed)" in text.getvalue()
    assert r.resets == [Reset("e1", 5, "trimmed", 2)]


def test_progress_bar_is_drawn_on_a_terminal_and_cleared_before_output() -> None:
    err = FakeTTY()
    r, out, _, _ = make(err=err, terminal=True)
    assert r.progress_enabled
    r.item(ev(1, "progress", {"current": 3, "total": 10, "message": "crunching"}))
    drawn = err.getvalue()
    assert drawn.startswith(b"\r\x1b[2K")
    assert b"crunching" in drawn
    assert b"3/10" in drawn
    r.item(ev(2, "stderr", {"line": "a warning"}))
    after = err.getvalue()[len(drawn) :]
    # The bar line is erased, the output written, then the bar drawn again below it.
    assert after.startswith(b"\r\x1b[2Ka warning\n\r\x1b[2K")
    assert b"3/10" in after
    r.item(ev(3, "stderr", {"line": "no end yet", "partial": True}))
    tail = err.getvalue()
    assert tail.endswith(b"no end yet")  # no bar while a line is unfinished
    r.finish()
    assert out.getvalue() == b""


def test_no_progress_bar_when_not_a_terminal() -> None:
    r, _, err, text = make()
    assert not r.progress_enabled
    r.item(ev(1, "progress", {"current": 1, "total": 2}))
    assert err.getvalue() == b""
    assert text.getvalue() == ""


def test_a_python_tasks_result_and_items_are_json_lines_on_stdout() -> None:
    r, out, err, _ = make()
    r.item(ev(1, "item", {"n": 1}))
    r.item(ev(2, "result", {"summary": "café", "ok": True}))
    r.item(ev(3, "custom", {"ignored": True}))  # other types: only in --json
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"n": 1},
        {"summary": "café", "ok": True},
    ]
    assert err.getvalue() == b""
