"""RunContext: what a Python task writes to its run's stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from runstream.backends.memory.log import MemoryEventLog
from runstream.errors import ValidationError
from runstream.runs.context import RunContext


@pytest.fixture
async def ctx() -> AsyncIterator[RunContext]:
    async with MemoryEventLog() as log:
        yield RunContext(run_id="run-ctx", task="t", params={"a": 1}, log=log, attempt=2)


async def read(ctx: RunContext) -> list[tuple[str, object]]:
    page = await ctx._log.read(ctx.run_id, 0, 100)
    return [(e.type, e.data) for e in page.events]


async def test_emit_returns_the_event_id_and_counts(ctx: RunContext) -> None:
    assert await ctx.emit("chunk", {"text": "a"}) == 1
    assert await ctx.emit("chunk") == 2
    assert ctx.events_emitted == 2
    assert await read(ctx) == [("chunk", {"text": "a"}), ("chunk", None)]


@pytest.mark.parametrize("reserved", ["status", "end", "reset"])
async def test_reserved_types_are_refused(ctx: RunContext, reserved: str) -> None:
    with pytest.raises(ValidationError) as info:
        await ctx.emit(reserved, {})
    assert info.value.field == "type"
    assert ctx.events_emitted == 0


async def test_non_json_data_is_refused(ctx: RunContext) -> None:
    with pytest.raises(ValidationError):
        await ctx.emit("x", {1, 2})


async def test_progress_sends_only_the_given_fields(ctx: RunContext) -> None:
    await ctx.progress(current=3)
    await ctx.progress(total=10, message="m")
    assert await read(ctx) == [
        ("progress", {"current": 3}),
        ("progress", {"total": 10, "message": "m"}),
    ]


@pytest.mark.parametrize(
    ("level", "stream", "norm"),
    [("debug", "stdout", "debug"), ("INFO", "stdout", "info"), ("warn", "stderr", "warning"),
     ("error", "stderr", "error"), ("fatal", "stderr", "critical")],
)  # fmt: skip
async def test_log_lines_carry_a_level(ctx: RunContext, level: str, stream: str, norm: str) -> None:
    await ctx.log(level, "one\ntwo")
    assert await read(ctx) == [
        (stream, {"line": "one", "level": norm}),
        (stream, {"line": "two", "level": norm}),
    ]


async def test_unknown_log_level_is_refused(ctx: RunContext) -> None:
    with pytest.raises(ValidationError) as info:
        await ctx.log("loud", "x")
    assert info.value.field == "level"


async def test_context_exposes_the_run(ctx: RunContext) -> None:
    assert (ctx.run_id, ctx.task, dict(ctx.params), ctx.attempt) == ("run-ctx", "t", {"a": 1}, 2)
    assert not ctx.cancelled.is_set()
