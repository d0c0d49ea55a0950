"""Task declarations, param validation and substitution (never through a shell)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from runstream.config import load_settings
from runstream.errors import ConfigError, InvalidParams, TaskNotFound
from runstream.runs.context import RunContext
from runstream.runs.tasks import ParamSpec, TaskRegistry, TaskSpec

SPEC_EXAMPLE: dict[str, Any] = {
    "hello": {
        "command": ["python", "-u", "-c", "import sys; print('hello', sys.argv[1])", "{name}"],
        "params": {"name": {"type": "string", "default": "world", "max_length": 100}},
        "timeout": 600,
        "concurrency": 4,
        "grace": 5,
    },
    "summarize": {"callable": "myapp.tasks:summarize"},
}


def test_registry_reads_the_spec_example() -> None:
    registry = TaskRegistry.from_config(SPEC_EXAMPLE)
    hello = registry.get("hello")
    assert hello.kind == "command"
    assert hello.timeout == 600
    assert hello.concurrency == 4
    assert hello.grace == 5.0
    assert hello.retries == 0
    assert hello.param("name") == ParamSpec(
        name="name", type="string", default="world", required=False, max_length=100
    )
    summarize = registry.get("summarize")
    assert summarize.kind == "python"
    assert summarize.callable_name == "myapp.tasks:summarize"
    assert registry.names() == ["hello", "summarize"]


def test_unknown_task_raises_task_not_found() -> None:
    with pytest.raises(TaskNotFound) as info:
        TaskRegistry().get("nope")
    assert info.value.http_status == 404


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"command": "echo hi"}, "never a shell string"),
        ({"command": []}, "non-empty argv"),
        ({"command": ["echo"], "callable": "a:b"}, "exactly one"),
        ({}, "exactly one"),
        ({"callable": "not a path"}, "package.module:function"),
        ({"command": ["echo"], "timeout": 0}, "timeout must be > 0"),
        ({"command": ["echo"], "concurrency": 1.5}, "concurrency must be an integer"),
        ({"command": ["echo"], "retries": -1}, "retries must be >= 0"),
        ({"command": ["echo"], "colour": "red"}, "unknown key"),
        ({"command": ["echo"], "env": {"1X": "a"}}, "not a variable name"),
        ({"command": ["echo", "{who}"]}, "no param 'who' is declared"),
        ({"command": ["echo"], "params": {"n": {"type": "float"}}}, "type must be one of"),
        ({"command": ["echo"], "params": {"n": {"type": "integer", "max_length": 3}}}, "strings"),
        ({"command": ["echo"], "params": {"s": {"min": 3}}}, "integer and number"),
        ({"command": ["echo"], "params": {"n": {"type": "integer", "default": "x"}}}, "integer"),
        ({"command": ["echo"], "params": {"c": {"choices": ["a", 1]}}}, "must be a string"),
        ({"command": ["echo"], "params": {"bad-name": {}}}, "identifiers"),
        ({"command": ["echo"], "params": {"p": {"pattern": "("}}}, "invalid pattern"),
    ],
)
def test_invalid_declaration_raises_config_error(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TaskSpec.from_config("t", table)


@pytest.mark.parametrize("item", ["--name={name}", "hello {name}", "{name}{name}", "x{name}"])
def test_placeholder_inside_a_longer_argv_item_is_refused(item: str) -> None:
    with pytest.raises(ConfigError, match="whole argv item"):
        TaskSpec.build("t", command=["echo", item], params={"name": {"type": "string"}})


def test_braces_that_name_no_param_are_literal() -> None:
    task = TaskSpec.build(
        "t", command=["python", "-c", "print({'a': 1}, '{other}')"], params={"name": "string"}
    )
    assert task.build_argv({"name": "x"}) == ["python", "-c", "print({'a': 1}, '{other}')"]


def test_invalid_task_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="invalid task name"):
        TaskSpec.build("has space", command=["echo"])


def test_duplicate_task_is_refused() -> None:
    registry = TaskRegistry()
    registry.command("a", ["echo"])
    with pytest.raises(ConfigError, match="declared twice"):
        registry.command("a", ["true"])


# -- params -----------------------------------------------------------------------

PARAMS: dict[str, Any] = {
    "name": {"type": "string", "max_length": 5, "min_length": 1},
    "count": {"type": "integer", "min": 1, "max": 10, "default": 3},
    "ratio": {"type": "number", "min": 0, "max": 1, "required": False},
    "loud": {"type": "boolean", "default": False},
    "colour": {"choices": ["red", "green"], "default": "red"},
    "mode": {"enum": [1, 2], "type": "integer", "default": 1},
    "tag": {"pattern": "[a-z]+", "required": False},
}


@pytest.fixture
def task() -> TaskSpec:
    return TaskSpec.build("t", command=["echo"], params=PARAMS)


def test_defaults_fill_in_and_optional_params_stay_absent(task: TaskSpec) -> None:
    assert task.validate_params({"name": "ab"}) == {
        "name": "ab",
        "count": 3,
        "loud": False,
        "colour": "red",
        "mode": 1,
    }


def test_strings_are_converted_for_typed_params(task: TaskSpec) -> None:
    got = task.validate_params(
        {"name": "a", "count": "7", "ratio": "0.5", "loud": "yes", "mode": "2"}
    )
    assert got["count"] == 7
    assert got["ratio"] == 0.5
    assert got["loud"] is True
    assert got["mode"] == 2


def test_integral_float_is_an_integer(task: TaskSpec) -> None:
    assert task.validate_params({"name": "a", "count": 4.0})["count"] == 4


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "toolong"}, "name"),
        ({"name": 5}, "name"),
        ({"name": "a\0b"}, "name"),
        ({"name": "a", "count": 0}, "count"),
        ({"name": "a", "count": 11}, "count"),
        ({"name": "a", "count": 2.5}, "count"),
        ({"name": "a", "count": True}, "count"),
        ({"name": "a", "count": "many"}, "count"),
        ({"name": "a", "ratio": 1.5}, "ratio"),
        ({"name": "a", "ratio": float("nan")}, "ratio"),
        ({"name": "a", "loud": "maybe"}, "loud"),
        ({"name": "a", "loud": 1}, "loud"),
        ({"name": "a", "colour": "blue"}, "colour"),
        ({"name": "a", "mode": 3}, "mode"),
        ({"name": "a", "tag": "ABC"}, "tag"),
        ({"name": "a", "surprise": 1}, "surprise"),
    ],
)
def test_bad_params_raise_validation_error_naming_the_field(
    task: TaskSpec, params: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidParams) as info:
        task.validate_params(params)
    assert info.value.field == field
    assert info.value.http_status == 422


def test_params_must_be_an_object(task: TaskSpec) -> None:
    with pytest.raises(InvalidParams) as info:
        task.validate_params(["name"])  # type: ignore[arg-type]
    assert info.value.field == "params"


def test_run_timeout_may_be_lower_never_higher() -> None:
    task = TaskSpec.build("t", command=["echo"], timeout=60)
    assert task.check_timeout(None) == 60
    assert task.check_timeout(5) == 5.0
    for bad in (61, 0, -1, "5", float("inf")):
        with pytest.raises(InvalidParams) as info:
            task.check_timeout(bad)  # type: ignore[arg-type]
        assert info.value.field == "timeout"
    assert TaskSpec.build("u", command=["echo"]).check_timeout(1e6) == 1e6


# -- substitution -------------------------------------------------------------------

HOSTILE = ["; rm -rf /", "$(id)", "`id`", "a b\tc", "'\"", "|| true", "-rf", "{name}", "\n"]


@pytest.mark.parametrize("value", HOSTILE)
def test_whole_item_substitution_keeps_the_value_as_one_argv_item(value: str) -> None:
    task = TaskSpec.build(
        "t", command=["printf", "%s", "{name}", "end"], params={"name": {"type": "string"}}
    )
    assert task.build_argv(task.validate_params({"name": value})) == ["printf", "%s", value, "end"]


def test_absent_optional_param_drops_its_argv_item() -> None:
    task = TaskSpec.build("t", command=["ls", "{path}", "-l"], params={"path": {"required": False}})
    assert task.build_argv(task.validate_params({})) == ["ls", "-l"]


def test_typed_values_are_rendered_as_text() -> None:
    task = TaskSpec.build(
        "t",
        command=["x", "{n}", "{f}", "{b}"],
        params={"n": "integer", "f": "number", "b": "boolean"},
    )
    assert task.build_argv({"n": 3, "f": 0.5, "b": True}) == ["x", "3", "0.5", "true"]


def test_env_params_and_task_env_reach_the_environment_only() -> None:
    task = TaskSpec.build(
        "t",
        command=["env"],
        params={"token": {"env": "API_KEY"}},
        env={"MODE": "fast"},
    )
    env = task.build_env({"token": "$(id)"})
    assert env["API_KEY"] == "$(id)"
    assert env["MODE"] == "fast"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert task.build_argv({"token": "$(id)"}) == ["env"]


def test_server_secrets_never_reach_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNSTREAM_TOKEN", "secret-token")
    monkeypatch.setenv("SOME_SETTING", "x")
    minimal = TaskSpec.build("t", command=["env"]).build_env({})
    assert "RUNSTREAM_TOKEN" not in minimal
    assert "SOME_SETTING" not in minimal
    assert "PATH" in minimal
    inherited = TaskSpec.build("t", command=["env"], inherit_env=True).build_env({})
    assert "RUNSTREAM_TOKEN" not in inherited
    assert inherited["SOME_SETTING"] == "x"


# -- Python tasks -------------------------------------------------------------------------


async def sample_task(ctx: RunContext) -> int:
    return len(ctx.params)


def test_decorator_registers_an_async_function() -> None:
    registry = TaskRegistry()

    @registry.task("count", params={"n": {"type": "integer", "default": 1}})
    async def count(ctx: RunContext) -> None:
        await asyncio.sleep(0)

    task = registry.get("count")
    assert task.resolve() is count
    assert task.to_json()["kind"] == "python"


def test_sync_function_is_refused() -> None:
    def plain(ctx: RunContext) -> None:
        return None

    with pytest.raises(ConfigError, match="async"):
        TaskRegistry().python("plain", plain)


def test_callable_string_is_imported_on_resolve() -> None:
    task = TaskSpec.build("t", callable=f"{__name__}:sample_task")
    assert task.resolve() is sample_task
    missing = TaskSpec.build("m", callable="no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match="cannot import"):
        missing.resolve()


def test_to_json_never_shows_env() -> None:
    task = TaskSpec.build(
        "t", command=[sys.executable, "{a}"], params={"a": "string"}, env={"SECRET": "s3cr3t"}
    )
    shown = task.to_json()
    assert "s3cr3t" not in repr(shown)
    assert shown["params"] == {"a": {"type": "string", "required": True}}
    assert shown["command"] == [sys.executable, "{a}"]


SPEC_TOML = """
[server]
host = "127.0.0.1"
port = 8787
backend = "sqlite:///./.runstream/runstream.db"

[tasks.hello]
command = ["python", "-u", "-c", "import sys; print('hello', sys.argv[1])", "{name}"]
params = { name = { type = "string", default = "world", max_length = 100 } }
timeout = 600          # seconds; per-run override allowed up to this
concurrency = 4        # max simultaneous runs of this task
grace = 5              # seconds between SIGTERM and SIGKILL

[tasks.summarize]
callable = "myapp.tasks:summarize"
"""


def test_spec_config_file_loads_through_settings(tmp_path: Path) -> None:
    path = tmp_path / "runstream.toml"
    path.write_text(SPEC_TOML)
    registry = TaskRegistry.from_config(load_settings(path, env={}).tasks)
    assert registry.names() == ["hello", "summarize"]
    hello = registry.get("hello")
    assert hello.build_argv(hello.validate_params({})) == [
        "python", "-u", "-c", "import sys; print('hello', sys.argv[1])", "world",
    ]  # fmt: skip


def test_config_with_templated_argv_fails_at_load(tmp_path: Path) -> None:
    path = tmp_path / "runstream.toml"
    path.write_text('[tasks.bad]\ncommand = ["sh", "-c", "echo {name}"]\nparams = { name = {} }\n')
    with pytest.raises(ConfigError, match=r"\[tasks.bad\].*whole argv item"):
        TaskRegistry.from_config(load_settings(path, env={}).tasks)
