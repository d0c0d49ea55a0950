"""run_process against real child processes (CHECKLISTS B)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from runstream.errors import ValidationError
from runstream.runner.lines import OutputBatch, OutputLine, encode_runs
from runstream.runner.process import ProcessResult, default_env, run_process

PY = sys.executable


class Collector:
    """A sink that records every batch and lets a test wait for a condition on the output."""

    def __init__(self) -> None:
        self.batches: list[list[OutputLine]] = []
        self.received_at: list[float] = []
        self.changed = asyncio.Condition()

    async def __call__(self, batch: Sequence[OutputLine]) -> None:
        self.batches.append(list(batch))
        self.received_at.append(time.time())
        async with self.changed:
            self.changed.notify_all()

    @property
    def lines(self) -> list[OutputLine]:
        return [item for batch in self.batches for item in batch]

    def stream(self, name: str) -> list[OutputLine]:
        return [item for item in self.lines if item.stream == name]

    def text(self, name: str) -> str:
        """The stream's text: pieces joined, a newline after each completed line."""
        return "".join(
            item.line + ("" if item.partial else "\r" if item.cr else "\n")
            for item in self.stream(name)
        )

    async def wait_for_text(self, name: str, needle: str, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: needle in self.text(name))


def living_group_members(pgid: int) -> list[int]:
    """Pids of processes of group ``pgid`` that are not zombies."""
    alive = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            alive.append(int(name))
    return alive


def zombie_children() -> list[int]:
    me = os.getpid()
    zombies = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == me:
            zombies.append(int(name))
    return zombies


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def assert_group_gone(result: ProcessResult) -> None:
    assert result.pid is not None
    assert living_group_members(result.pid) == []


def py(code: str) -> list[str]:
    return [PY, "-c", code]


# -- output capture ------------------------------------------------------------------


async def test_stdout_and_stderr_lines_are_labelled() -> None:
    sink = Collector()
    result = await run_process(
        py("import sys\nprint('out 1')\nprint('err 1', file=sys.stderr)\nprint('out 2')"),
        sink=sink,
    )
    assert result.outcome == "exited"
    assert result.exit_code == 0
    assert [item.line for item in sink.stream("stdout")] == ["out 1", "out 2"]
    assert [item.line for item in sink.stream("stderr")] == ["err 1"]


async def test_final_line_without_newline_is_emitted() -> None:
    sink = Collector()
    await run_process(py("import sys; sys.stdout.write('first\\nno newline at end')"), sink=sink)
    assert sink.stream("stdout") == [
        OutputLine("stdout", "first"),
        OutputLine("stdout", "no newline at end"),
    ]


async def test_one_mib_line_without_newline_is_captured_whole_in_partial_pieces() -> None:
    sink = Collector()
    code = "import sys\nsys.stdout.write(''.join(chr(65 + i % 26) for i in range(1 << 20)))"
    result = await run_process(py(code), sink=sink)
    assert result.exit_code == 0
    pieces = sink.stream("stdout")
    assert "".join(item.line for item in pieces) == "".join(
        chr(65 + i % 26) for i in range(1 << 20)
    )
    assert len(pieces) >= 16
    assert all(item.partial for item in pieces[:-1])
    assert not pieces[-1].partial
    assert all(len(item.line) <= 64 * 1024 for item in pieces)


async def test_sink_gets_output_batches_whose_encoding_matches_the_records() -> None:
    code = (
        "import sys\n"
        "for i in range(3000):\n"
        "    print(f'line {i}')\n"
        "    if i % 500 == 0: print(f'ERROR: {i} \"quoted\"', file=sys.stderr)\n"
        "sys.stdout.write('0%\\r50%\\r100%\\rno newline')\n"
    )
    batches: list[Sequence[OutputLine]] = []

    async def sink(batch: Sequence[OutputLine]) -> None:
        batches.append(batch)

    result = await run_process(py(code), sink=sink)
    assert result.exit_code == 0
    assert batches and all(isinstance(batch, OutputBatch) for batch in batches)
    records = [item for batch in batches for item in batch]
    stdout = [item for item in records if item.stream == "stdout"]
    assert [item.line for item in stdout[:3000]] == [f"line {i}" for i in range(3000)]
    assert stdout[3000:] == [
        OutputLine("stdout", "100%", cr=True),
        OutputLine("stdout", "no newline"),
    ]
    stderr = [item for item in records if item.stream == "stderr"]
    assert [(item.line, item.level) for item in stderr] == [
        (f'ERROR: {i} "quoted"', "error") for i in range(0, 3000, 500)
    ]
    encoded = [
        (stream, text) for batch in batches for stream, run in encode_runs(batch) for text in run
    ]
    assert encoded == [(item.stream, item.to_data_json()) for item in records]


async def test_order_is_kept_within_each_stream() -> None:
    code = (
        "import sys\n"
        "for i in range(20000):\n"
        "    print(f'o{i}')\n"
        "    if i % 3 == 0: print(f'e{i}', file=sys.stderr)\n"
    )
    sink = Collector()
    await run_process(py(code), sink=sink)
    assert [item.line for item in sink.stream("stdout")] == [f"o{i}" for i in range(20000)]
    assert [item.line for item in sink.stream("stderr")] == [f"e{i}" for i in range(0, 20000, 3)]


async def test_ten_mib_on_stderr_before_stdout_does_not_deadlock() -> None:
    code = (
        "import sys\n"
        "sys.stderr.write(('x' * 1023 + '\\n') * 10240)\n"
        "sys.stderr.flush()\n"
        "print('stdout after')\n"
    )
    sink = Collector()
    result = await asyncio.wait_for(run_process(py(code), sink=sink), 30)
    assert result.exit_code == 0
    stderr = sink.stream("stderr")
    assert len(stderr) == 10240
    assert all(item.line == "x" * 1023 for item in stderr)
    assert [item.line for item in sink.stream("stdout")] == ["stdout after"]


async def test_invalid_utf8_is_replaced_and_ansi_codes_are_kept() -> None:
    code = (
        "import sys\n"
        "sys.stdout.buffer.write(b'bad \\xff\\xfe end\\n\\x1b[31mred\\x1b[0m \\xe2\\x82\\xac\\n')\n"
    )
    sink = Collector()
    await run_process(py(code), sink=sink)
    assert [item.line for item in sink.stream("stdout")] == [
        "bad \ufffd\ufffd end",
        "\x1b[31mred\x1b[0m €",
    ]


async def test_multibyte_character_split_across_writes_decodes() -> None:
    # Two separate writes with a pause: the halves arrive in different reads.
    code = (
        "import sys, time\n"
        "out = sys.stdout.buffer\n"
        "out.write('€'.encode()[:2]); out.flush(); time.sleep(0.3)\n"
        "out.write('€'.encode()[2:] + b'\\n'); out.flush()\n"
    )
    sink = Collector()
    await run_process(py(code), sink=sink, flush_interval=0.05)
    assert [item.line for item in sink.stream("stdout")] == ["€"]


async def test_cr_progress_bar_is_bounded_in_events() -> None:
    code = (
        "import sys\n"
        "sys.stdout.write(''.join(f'\\r{i:6d}/100000' for i in range(1, 100001)))\n"
        "sys.stdout.write('\\ndone\\n')\n"
    )
    sink = Collector()
    await run_process(py(code), sink=sink)
    lines = sink.stream("stdout")
    assert len(lines) < 200  # about one per read, not one per update
    assert [item.line for item in lines[-2:]] == ["100000/100000", "done"]
    assert all(item.cr for item in lines[:-2])


async def test_output_without_newline_is_visible_while_child_sleeps() -> None:
    # A Python child using plain print() (no flush): PYTHONUNBUFFERED from the
    # default env plus the flush timer make it visible within a second.
    code = "import time\nprint(f'{time.time():.3f} waiting', end='')\ntime.sleep(60)\n"
    sink = Collector()
    cancel = asyncio.Event()
    task = asyncio.create_task(run_process(py(code), sink=sink, cancel=cancel, grace=1))
    await sink.wait_for_text("stdout", "waiting")
    cancel.set()
    result = await task
    assert result.outcome == "cancelled"
    first = sink.stream("stdout")[0]
    assert first.partial
    written_at = float(first.line.split()[0])
    # Flushed after one quiet flush interval (0.2 s); a second is the target, the rest is
    # slack for a loaded CI machine. Without the timer nothing would arrive before exit.
    assert sink.received_at[0] - written_at < 2.0


async def test_line_that_keeps_growing_is_flushed_within_a_second() -> None:
    # A dot every 50 ms: the pipe is never quiet for a whole flush interval,
    # so the age bound (5 intervals) has to pass the text on.
    code = (
        "import sys, time\n"
        "sys.stdout.write(f'{time.time():.3f} ')\n"
        "while True:\n"
        "    sys.stdout.write('.')\n"
        "    time.sleep(0.05)\n"
    )
    sink = Collector()
    cancel = asyncio.Event()
    task = asyncio.create_task(run_process(py(code), sink=sink, cancel=cancel, grace=1))
    await sink.wait_for_text("stdout", ".")
    cancel.set()
    await task
    first = sink.stream("stdout")[0]
    assert first.partial
    # The age bound is 5 flush intervals (1.0 s); the rest is slack for a loaded CI machine.
    # Without the bound, nothing would arrive until the process ended.
    assert sink.received_at[0] - float(first.line.split()[0]) < 4.0


async def test_stdin_is_dev_null() -> None:
    code = (
        "import os, sys\n"
        "print(os.path.realpath('/proc/self/fd/0'))\n"
        "print(repr(sys.stdin.read()))\n"
    )
    sink = Collector()
    result = await asyncio.wait_for(run_process(py(code), sink=sink), 20)
    assert result.exit_code == 0
    assert [item.line for item in sink.stream("stdout")] == ["/dev/null", "''"]


# -- environment and argv ---------------------------------------------------------------


async def test_default_env_is_minimal_and_unbuffered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNSTREAM_TEST_SECRET", "do-not-leak")
    code = "import os, json\nprint(json.dumps(sorted(os.environ)))\n"
    sink = Collector()
    await run_process(py(code), sink=sink)
    names = set(eval(sink.stream("stdout")[0].line))
    assert "RUNSTREAM_TEST_SECRET" not in names
    assert "PYTHONUNBUFFERED" in names
    assert names <= set(default_env())
    assert default_env({"EXTRA": "1"})["EXTRA"] == "1"


async def test_explicit_env_is_passed_exactly() -> None:
    code = "import os, json\nprint(json.dumps(dict(os.environ)))\n"
    sink = Collector()
    await run_process(py(code), sink=sink, env={"ONLY": "this"})
    env = eval(sink.stream("stdout")[0].line)
    env.pop("LC_CTYPE", None)  # Python's C locale coercion may add this one
    assert env == {"ONLY": "this"}


async def test_argv_items_never_reach_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}); `touch {marker}` | touch {marker} ; '\"*"
    sink = Collector()
    result = await run_process([PY, "-c", "import sys; print(sys.argv[1])", hostile], sink=sink)
    assert result.exit_code == 0
    assert [item.line for item in sink.stream("stdout")] == [hostile]
    assert not marker.exists()


async def test_string_argv_is_rejected() -> None:
    with pytest.raises(ValidationError):
        await run_process("echo hi", sink=Collector())
    with pytest.raises(ValidationError):
        await run_process([], sink=Collector())


async def test_cwd_is_used(tmp_path: Path) -> None:
    sink = Collector()
    await run_process(py("import os; print(os.getcwd())"), sink=sink, cwd=str(tmp_path))
    assert sink.stream("stdout")[0].line == str(tmp_path)


# -- exit status ------------------------------------------------------------------------


async def test_exit_code_is_kept() -> None:
    result = await run_process(py("raise SystemExit(42)"), sink=Collector())
    assert (result.outcome, result.exit_code, result.signal, result.error) == (
        "exited",
        42,
        None,
        None,
    )
    assert result.pid is not None
    assert result.duration > 0


async def test_signal_death_is_reported_as_a_signal() -> None:
    code = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    result = await run_process(py(code), sink=Collector())
    assert result.outcome == "exited"
    assert result.exit_code is None
    assert result.signal == signal.SIGSEGV


async def test_missing_executable_fails_to_start_without_raising() -> None:
    result = await run_process(["runstream-no-such-program", "x"], sink=Collector())
    assert result.outcome == "failed_to_start"
    assert result.error == "executable not found: runstream-no-such-program"
    assert (result.exit_code, result.signal, result.pid) == (None, None, None)


async def test_not_executable_file_fails_to_start(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    result = await run_process([str(script)], sink=Collector())
    assert result.outcome == "failed_to_start"
    assert result.error == f"permission denied: {script}"


async def test_missing_cwd_fails_to_start(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    result = await run_process(py("print(1)"), sink=Collector(), cwd=missing)
    assert result.outcome == "failed_to_start"
    assert result.error is not None
    assert missing in result.error


# -- stopping -----------------------------------------------------------------------------


async def test_timeout_ends_in_timed_out_and_kills_the_group() -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    sink = Collector()
    result = await run_process(py(code), sink=sink, timeout=1.0, grace=2)
    assert result.outcome == "timed_out"
    assert result.signal == signal.SIGTERM
    assert result.exit_code is None
    assert 0.9 < result.duration < 10
    grandchild = int(sink.stream("stdout")[0].line)
    assert not pid_alive(grandchild)
    assert_group_gone(result)


async def test_cancel_event_ends_in_cancelled() -> None:
    sink = Collector()
    cancel = asyncio.Event()
    task = asyncio.create_task(
        run_process(
            py("import time\nprint('ready', flush=True)\ntime.sleep(60)"),
            sink=sink,
            cancel=cancel,
            timeout=60,
        )
    )
    await sink.wait_for_text("stdout", "ready\n")
    cancel.set()
    result = await task
    assert result.outcome == "cancelled"
    assert result.signal == signal.SIGTERM
    assert_group_gone(result)


async def test_cancel_event_already_set_stops_at_once() -> None:
    cancel = asyncio.Event()
    cancel.set()
    result = await run_process(py("import time; time.sleep(60)"), sink=Collector(), cancel=cancel)
    assert result.outcome == "cancelled"
    assert result.duration < 10


async def test_child_trapping_sigterm_is_killed_after_grace() -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('got TERM, ignoring', flush=True))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    sink = Collector()
    cancel = asyncio.Event()
    task = asyncio.create_task(run_process(py(code), sink=sink, cancel=cancel, grace=0.5))
    await sink.wait_for_text("stdout", "ready\n")
    started = time.monotonic()
    cancel.set()
    result = await task
    assert time.monotonic() - started >= 0.5
    assert result.outcome == "cancelled"
    assert result.signal == signal.SIGKILL
    assert "got TERM, ignoring" in sink.text("stdout")
    assert_group_gone(result)


async def test_child_exiting_cleanly_on_sigterm_keeps_its_exit_code() -> None:
    code = (
        "import signal, sys, time\n"
        "def stop(*a):\n"
        "    print('cleaning up', flush=True)\n"
        "    sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    sink = Collector()
    result = await run_process(py(code), sink=sink, timeout=1.0, grace=10)
    assert result.outcome == "timed_out"
    assert (result.exit_code, result.signal) == (3, None)
    assert result.duration < 8
    assert sink.text("stdout") == "ready\ncleaning up\n"


async def test_grandchild_holding_the_pipe_does_not_keep_the_run_open() -> None:
    sink = Collector()
    started = time.monotonic()
    result = await run_process(["sh", "-c", "sleep 100 & echo hi"], sink=sink, drain_timeout=0.5)
    assert time.monotonic() - started < 5
    assert result.outcome == "exited"
    assert result.exit_code == 0
    assert sink.text("stdout") == "hi\n"
    assert_group_gone(result)


async def test_background_process_without_pipes_does_not_outlive_the_run() -> None:
    sink = Collector()
    result = await run_process(
        ["sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $!"], sink=sink, drain_timeout=0.5
    )
    assert result.exit_code == 0
    assert not pid_alive(int(sink.stream("stdout")[0].line))
    assert_group_gone(result)


async def test_process_that_left_the_group_and_holds_the_pipe_is_abandoned() -> None:
    # setsid puts the sleeper in another group: it cannot be killed with ours,
    # so the run must stop reading its pipe rather than wait for it.
    sink = Collector()
    started = time.monotonic()
    result = await run_process(
        py(
            "import subprocess\n"
            "p = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
            "print(p.pid, flush=True)\n"
        ),
        sink=sink,
        drain_timeout=0.3,
    )
    escaped = int(sink.stream("stdout")[0].line)
    try:
        assert time.monotonic() - started < 6
        assert result.outcome == "exited"
        assert result.exit_code == 0
    finally:
        os.kill(escaped, signal.SIGKILL)


async def test_cancelling_the_task_kills_the_whole_group_and_reraises() -> None:
    code = (
        "import subprocess, sys, time\n"
        "signal_ignorer = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(60)'\n"
        "child = subprocess.Popen([sys.executable, '-c', signal_ignorer])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    sink = Collector()
    task = asyncio.create_task(run_process(py(code), sink=sink, grace=30))
    await sink.wait_for_text("stdout", "\n")
    grandchild = int(sink.stream("stdout")[0].line)
    pgid = os.getpgid(grandchild)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 10  # no grace on shutdown
    assert not pid_alive(grandchild)
    assert living_group_members(pgid) == []
    # Zombies of killed group members belong to whoever reaps orphans (PID 1
    # here, which does so lazily): wait for the group to vanish completely.
    deadline = time.monotonic() + 15
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "process group still exists"
        await asyncio.sleep(0.05)


async def test_sink_error_kills_the_group_and_is_reraised() -> None:
    class SinkFailed(Exception):
        pass

    pids: list[int] = []

    async def failing_sink(batch: Sequence[OutputLine]) -> None:
        pids.extend(int(item.line) for item in batch if item.line.isdigit())
        raise SinkFailed("backend down")

    code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    started = time.monotonic()
    with pytest.raises(SinkFailed):
        await run_process(py(code), sink=failing_sink, grace=30)
    assert time.monotonic() - started < 10
    assert pids
    assert not pid_alive(pids[0])
    assert living_group_members(pids[0]) == []


# -- buffering --------------------------------------------------------------------------------


async def test_slow_sink_gets_bigger_batches_and_does_not_block_the_child() -> None:
    code = (
        "import sys, time\n"
        "start = time.monotonic()\n"
        "for i in range(20000):\n"
        "    print(f'line {i}')\n"
        "print(f'wrote in {time.monotonic() - start:.3f}', file=sys.stderr)\n"
    )
    calls = 0

    async def slow_sink(batch: Sequence[OutputLine]) -> None:
        nonlocal calls
        calls += 1
        await collector(batch)
        await asyncio.sleep(0.5)  # a slow backend

    collector = Collector()
    result = await run_process(py(code), sink=slow_sink)
    assert result.exit_code == 0
    assert [item.line for item in collector.stream("stdout")] == [f"line {i}" for i in range(20000)]
    # 20,000 print() calls with PYTHONUNBUFFERED: one write each, so one
    # batch per line if the sink were called per read. It is called a few times.
    assert calls < 10
    wrote_in = float(collector.stream("stderr")[0].line.split()[-1])
    assert wrote_in < 2.0  # the child never waited for the 0.5 s sink calls


async def test_busy_event_loop_does_not_split_lines_by_timer() -> None:
    # A sink that hogs the loop (as building thousands of events does) makes
    # the unfinished tail of the last read look old. The child was not quiet,
    # we were busy: the pipe is full, so the timer must not emit partials.
    code = (
        "import sys\n"
        "for block in range(6):\n"
        "    sys.stdout.write(''.join(f'{block:02d} {i:05d} ' + 'z' * 60 + '\\n'"
        " for i in range(2000)))\n"
    )
    got: list[OutputLine] = []

    async def hogging_sink(batch: Sequence[OutputLine]) -> None:
        got.extend(batch)
        time.sleep(0.25)  # noqa: ASYNC251 - deliberately blocks the event loop

    result = await run_process(py(code), sink=hogging_sink, flush_interval=0.05)
    assert result.exit_code == 0
    assert not [item for item in got if item.partial]
    assert len(got) == 12000


async def test_backpressure_pauses_the_child_without_dropping_output(tmp_path: Path) -> None:
    marker = tmp_path / "finished-writing"
    code = (
        "import sys\n"
        "for i in range(64):\n"
        "    sys.stdout.write(f'{i:05d}' + 'y' * 65530 + '\\n')\n"
        f"open({str(marker)!r}, 'w').close()\n"
    )
    gate = asyncio.Event()
    first_call = asyncio.Event()
    got: list[OutputLine] = []

    async def gated_sink(batch: Sequence[OutputLine]) -> None:
        first_call.set()
        await gate.wait()
        got.extend(batch)

    task = asyncio.create_task(
        run_process(py(code), sink=gated_sink, max_buffer=256 * 1024, max_line=1 << 20)
    )
    await asyncio.wait_for(first_call.wait(), 10)
    # 4 MiB cannot fit in 256 KiB of buffer plus the pipes' capacity: the
    # child must stay blocked in write() while the sink does not return.
    await asyncio.sleep(1.0)
    assert not marker.exists()
    gate.set()
    result = await asyncio.wait_for(task, 30)
    assert result.exit_code == 0
    assert marker.exists()
    assert [item.line[:5] for item in got] == [f"{i:05d}" for i in range(64)]
    assert all(len(item.line) == 65535 and not item.partial for item in got)


# -- reaping ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_thousand_runs_leave_no_zombies() -> None:
    semaphore = asyncio.Semaphore(8)
    results: list[ProcessResult] = []

    async def one(i: int) -> None:
        async with semaphore:
            results.append(await run_process(["sh", "-c", f"echo {i}"], sink=Collector()))

    await asyncio.gather(*(one(i) for i in range(1000)))
    assert len(results) == 1000
    assert all(r.outcome == "exited" and r.exit_code == 0 for r in results)
    assert zombie_children() == []
