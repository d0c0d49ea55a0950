"""Declared tasks: what a run may execute, and the params it accepts.

A task is either a **command** (an argv list, started without a shell) or a
**Python callable** (``"package.module:function"``, an async function or an
async generator receiving a :class:`~runstream.runs.context.RunContext`).

Tasks come from the ``[tasks.NAME]`` tables of ``runstream.toml``
(:meth:`TaskRegistry.from_config`) or from Python::

    registry = TaskRegistry()
    registry.command("hello", ["echo", "hello", "{name}"],
                     params={"name": {"type": "string", "default": "world"}})

    @registry.task("count", params={"n": {"type": "integer", "max": 100}})
    async def count(ctx): ...

Params reach a command in exactly two ways, both decided when the task is
declared, never by the values:

* an argv item that is *exactly* ``"{name}"`` is replaced by the value, as one
  argv item (a value such as ``"; rm -rf /"`` stays one harmless argument);
  ``"{name}"`` inside a longer item is refused with :class:`ConfigError`,
  because string templating is how shell syntax gets built;
* a param declared with ``env = "VAR"`` is passed as the environment variable
  ``VAR``.

A value may still start with ``-``; if the program would read it as an option,
put ``"--"`` before it in the argv or restrict it with ``choices``/``pattern``.

Param declaration keys: ``type`` (``string`` | ``integer`` | ``number`` |
``boolean``, default ``string``), ``default``, ``required`` (default: true
unless a default is given), ``max_length``/``min_length`` (strings), ``min``/
``max`` (numbers), ``choices`` (or ``enum``), ``pattern`` (a regular
expression the whole string must match), ``env``, ``description``.

Task keys: ``command`` xor ``callable``, ``params``, ``timeout`` (seconds; a run
may ask for less, never more), ``concurrency`` (simultaneous runs of this task
per worker pool; default unlimited), ``grace`` (seconds between SIGTERM and
SIGKILL, default 5), ``retries`` (how often a ``lost`` run is queued again,
default 0), ``env`` (extra environment variables), ``inherit_env`` (default
false: the child gets only the minimal environment of
:func:`runstream.runner.process.default_env` — ``PATH``, ``HOME``, locale —
plus ``env`` and the env params; true passes the server's whole environment
except ``RUNSTREAM_*`` variables, which may hold tokens), ``cwd``,
``description``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar, cast

from runstream.errors import ConfigError, InvalidParams, TaskNotFound, ValidationError
from runstream.runs.gates import Gate
from runstream.runs.retention import RunRetention

__all__ = [
    "DEFAULT_GRACE",
    "ParamSpec",
    "ParamType",
    "TaskFunction",
    "TaskRegistry",
    "TaskSpec",
]

ParamType: TypeAlias = Literal["string", "integer", "number", "boolean"]
PARAM_TYPES: tuple[ParamType, ...] = ("string", "integer", "number", "boolean")

TaskFunction: TypeAlias = Callable[..., Any]
"""``async def f(ctx)`` or ``async def f(ctx): ... yield ...``."""

F = TypeVar("F", bound=TaskFunction)

DEFAULT_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL (and, for Python tasks, between setting
``ctx.cancelled`` and cancelling the coroutine)."""

TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CALLABLE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_ENV_PREFIX = "RUNSTREAM_"

_PARAM_KEYS = frozenset(
    {
        "type",
        "default",
        "required",
        "max_length",
        "min_length",
        "min",
        "max",
        "choices",
        "enum",
        "pattern",
        "env",
        "description",
    }
)
_TASK_KEYS = frozenset(
    {
        "command",
        "callable",
        "params",
        "timeout",
        "concurrency",
        "grace",
        "retries",
        "env",
        "inherit_env",
        "cwd",
        "description",
        "retention",
        "gate",
    }
)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """Declaration of one task param. Build it with :meth:`from_config` to get checks."""

    name: str
    type: ParamType = "string"
    default: Any = MISSING
    required: bool = True
    max_length: int | None = None
    min_length: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    env: str | None = None
    description: str = ""

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING

    @classmethod
    def from_config(cls, task: str, name: str, table: Mapping[str, Any] | str) -> ParamSpec:
        """Parse ``name = { type = ..., ... }`` (or the short form ``name = "integer"``).

        Raises :class:`ConfigError` naming the task and param.
        """
        where = f"[tasks.{task}].params.{name}"
        if not isinstance(name, str) or not PARAM_NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: param names are identifiers (letters, digits, _)")
        if isinstance(table, str):
            table = {"type": table}
        if not isinstance(table, Mapping):
            raise ConfigError(f'{where}: expected a table such as {{ type = "string" }}')
        unknown = set(table) - _PARAM_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_PARAM_KEYS)}"
            )
        ptype = table.get("type", "string")
        if ptype not in PARAM_TYPES:
            raise ConfigError(f"{where}: type must be one of {', '.join(PARAM_TYPES)}")
        if "choices" in table and "enum" in table:
            raise ConfigError(f"{where}: give either choices or enum, not both")
        choices_raw = table.get("choices", table.get("enum"))
        choices: tuple[Any, ...] | None = None
        if choices_raw is not None:
            if not isinstance(choices_raw, list | tuple) or not choices_raw:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            choices = tuple(choices_raw)
        env = table.get("env")
        if env is not None and (not isinstance(env, str) or not ENV_NAME_RE.fullmatch(env)):
            raise ConfigError(f"{where}: env must be an environment variable name")

        def number(key: str) -> float | None:
            value = table.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: {key} must be a number")
            return float(value) if isinstance(value, float) else value

        def count(key: str) -> int | None:
            value = table.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {key} must be a non-negative integer")
            return value

        pattern = table.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ConfigError(f"{where}: pattern must be a string")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{where}: invalid pattern: {exc}") from exc
        description = table.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"{where}: description must be a string")
        required = table.get("required")
        if required is not None and not isinstance(required, bool):
            raise ConfigError(f"{where}: required must be true or false")
        has_default = "default" in table
        spec = cls(
            name=name,
            type=cast(ParamType, ptype),
            default=MISSING,
            required=(not has_default) if required is None else required,
            max_length=count("max_length"),
            min_length=count("min_length"),
            minimum=number("min"),
            maximum=number("max"),
            choices=None,
            pattern=pattern,
            env=env,
            description=description,
        )
        if spec.type != "string" and any(
            x is not None for x in (spec.max_length, spec.min_length, spec.pattern)
        ):
            raise ConfigError(f"{where}: max_length, min_length and pattern apply to strings only")
        if spec.type not in ("integer", "number") and (
            spec.minimum is not None or spec.maximum is not None
        ):
            raise ConfigError(f"{where}: min and max apply to integer and number params only")
        # Choices and the default must themselves be valid values of the declared type.
        try:
            if choices is not None:
                checked = tuple(spec._check_value(c, coerce=False) for c in choices)
                spec = _replace_param(spec, choices=checked)
            if has_default:
                spec = _replace_param(spec, default=spec.check(table["default"]))
        except ValidationError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return spec

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to the declared type, or raise :class:`InvalidParams`.

        Strings are accepted for integer, number and boolean params (the CLI
        sends ``--param n=5``) and converted; anything else must already have
        the right JSON type. ``field`` of the error is the param name.
        """
        value = self._check_value(value, coerce=True)
        if self.choices is not None and value not in self.choices:
            shown = ", ".join(repr(c) for c in self.choices)
            raise InvalidParams(f"param {self.name!r} must be one of {shown}", field=self.name)
        return value

    def _check_value(self, value: Any, *, coerce: bool) -> Any:
        name = self.name
        if self.type == "string":
            if not isinstance(value, str):
                raise InvalidParams(f"param {name!r} must be a string", field=name)
            if "\0" in value:
                # No argv item or environment value can carry a NUL byte.
                raise InvalidParams(f"param {name!r} must not contain NUL", field=name)
            if self.max_length is not None and len(value) > self.max_length:
                raise InvalidParams(
                    f"param {name!r} is longer than {self.max_length} characters", field=name
                )
            if self.min_length is not None and len(value) < self.min_length:
                raise InvalidParams(
                    f"param {name!r} is shorter than {self.min_length} characters", field=name
                )
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                raise InvalidParams(
                    f"param {name!r} does not match the pattern {self.pattern!r}", field=name
                )
            return value
        if self.type == "boolean":
            if isinstance(value, bool):
                return value
            if coerce and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise InvalidParams(f"param {name!r} must be true or false", field=name)
        number: int | float
        if isinstance(value, bool):
            raise InvalidParams(f"param {name!r} must be a {self.type}", field=name)
        if isinstance(value, str) and coerce:
            try:
                number = int(value) if self.type == "integer" else float(value)
            except ValueError:
                raise InvalidParams(f"param {name!r} must be a {self.type}", field=name) from None
        elif isinstance(value, int | float):
            number = value
        else:
            raise InvalidParams(f"param {name!r} must be a {self.type}", field=name)
        if isinstance(number, float) and not math.isfinite(number):
            raise InvalidParams(f"param {name!r} must be a finite number", field=name)
        if self.type == "integer" and isinstance(number, float):
            if not number.is_integer():
                raise InvalidParams(f"param {name!r} must be an integer", field=name)
            number = int(number)
        if self.minimum is not None and number < self.minimum:
            raise InvalidParams(f"param {name!r} must be >= {self.minimum:g}", field=name)
        if self.maximum is not None and number > self.maximum:
            raise InvalidParams(f"param {name!r} must be <= {self.maximum:g}", field=name)
        return number

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "required": self.required}
        if self.has_default:
            out["default"] = self.default
        for key, value in (
            ("max_length", self.max_length),
            ("min_length", self.min_length),
            ("min", self.minimum),
            ("max", self.maximum),
            ("choices", list(self.choices) if self.choices is not None else None),
            ("pattern", self.pattern),
            ("env", self.env),
        ):
            if value is not None:
                out[key] = value
        if self.description:
            out["description"] = self.description
        return out


def _replace_param(spec: ParamSpec, **changes: Any) -> ParamSpec:
    return dataclasses.replace(spec, **changes)


def _positive(where: str, key: str, value: Any, *, integer: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key} must be a number")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer")
    if (key == "retries" and value < 0) or (key != "retries" and value <= 0):
        raise ConfigError(f"{where}: {key} must be {'>= 0' if key == 'retries' else '> 0'}")
    return value


def _argv_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A declared task. Immutable; build it with :meth:`from_config` or a :class:`TaskRegistry`.

    Exactly one of ``command`` (argv) and ``callable`` (``"pkg.module:function"``
    or the function object itself) is set.
    """

    name: str
    command: tuple[str, ...] | None = None
    callable: str | TaskFunction | None = None
    params: tuple[ParamSpec, ...] = ()
    timeout: float | None = None
    concurrency: int | None = None
    grace: float = DEFAULT_GRACE
    retries: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    inherit_env: bool = False
    cwd: str | None = None
    description: str = ""
    retention: RunRetention | None = None
    """Overrides ``[retention]`` max_age / max_runs for this task's runs."""
    gate: Gate | None = None
    """Resources this task's runs need free before they start (on top of ``[gates]``)."""

    @property
    def kind(self) -> Literal["command", "python"]:
        return "command" if self.command is not None else "python"

    @property
    def callable_name(self) -> str | None:
        fn = self.callable
        if fn is None:
            return None
        if isinstance(fn, str):
            return fn
        return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_config(cls, name: str, table: Mapping[str, Any]) -> TaskSpec:
        """Parse one ``[tasks.NAME]`` table. Raises :class:`ConfigError` naming the key."""
        where = f"[tasks.{name}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        unknown = set(table) - _TASK_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_TASK_KEYS)}"
            )
        params_raw = table.get("params", {})
        if not isinstance(params_raw, Mapping):
            raise ConfigError(f"{where}: params must be a table of declarations")
        env_raw = table.get("env", {})
        if not isinstance(env_raw, Mapping):
            raise ConfigError(f"{where}: env must be a table of strings")
        command = table.get("command")
        if command is not None and (
            not isinstance(command, list) or not all(isinstance(a, str) for a in command)
        ):
            raise ConfigError(
                f"{where}: command must be a list of strings (an argv, never a shell string), "
                'e.g. command = ["python", "-u", "script.py", "{name}"]'
            )
        return cls.build(
            name,
            command=command,
            callable=table.get("callable"),
            params=params_raw,
            timeout=table.get("timeout"),
            concurrency=table.get("concurrency"),
            grace=table.get("grace", DEFAULT_GRACE),
            retries=table.get("retries", 0),
            env=env_raw,
            inherit_env=table.get("inherit_env", False),
            cwd=table.get("cwd"),
            description=table.get("description", ""),
            retention=None
            if table.get("retention") is None
            else RunRetention.from_config(where, table["retention"]),
            gate=None if table.get("gate") is None else Gate.from_config(where, table["gate"]),
        )

    @classmethod
    def build(
        cls,
        name: str,
        *,
        command: Sequence[str] | None = None,
        callable: str | TaskFunction | None = None,
        params: Mapping[str, Mapping[str, Any] | ParamSpec | str] | Iterable[ParamSpec] = (),
        timeout: float | None = None,
        concurrency: int | None = None,
        grace: float = DEFAULT_GRACE,
        retries: int = 0,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = False,
        cwd: str | os.PathLike[str] | None = None,
        description: str = "",
        retention: RunRetention | None = None,
        gate: Gate | None = None,
    ) -> TaskSpec:
        """Check everything and build a task. Raises :class:`ConfigError`."""
        where = f"[tasks.{name}]"
        if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"invalid task name {name!r}: 1-100 characters from A-Z a-z 0-9 . _ - "
                "starting with a letter or digit"
            )
        if (command is None) == (callable is None):
            raise ConfigError(f"{where}: give exactly one of command (argv list) or callable")
        specs: list[ParamSpec] = []
        if isinstance(params, Mapping):
            for pname, decl in params.items():
                if isinstance(decl, ParamSpec):
                    if decl.name != pname:
                        raise ConfigError(f"{where}: param {pname!r} is declared as {decl.name!r}")
                    specs.append(decl)
                else:
                    specs.append(ParamSpec.from_config(name, pname, decl))
        else:
            specs.extend(params)
        names = [p.name for p in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: duplicate param names")
        env_names = [p.env for p in specs if p.env is not None]
        if len(set(env_names)) != len(env_names):
            raise ConfigError(f"{where}: two params use the same env variable")
        argv: tuple[str, ...] | None = None
        if command is not None:
            if isinstance(command, str) or not command:
                raise ConfigError(
                    f"{where}: command must be a non-empty argv list, never a shell string"
                )
            argv = tuple(command)
            _check_placeholders(where, argv, set(names))
        if callable is not None:
            if isinstance(callable, str):
                if not CALLABLE_RE.fullmatch(callable):
                    raise ConfigError(
                        f"{where}: callable must look like 'package.module:function' "
                        f"(got {callable!r})"
                    )
            else:
                _check_function(where, callable)
        env_map: dict[str, str] = {}
        for key, value in (env or {}).items():
            if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
                raise ConfigError(f"{where}: env key {key!r} is not a variable name")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ConfigError(f"{where}: env.{key} must be a string")
            env_map[key] = str(value)
        if not isinstance(inherit_env, bool):
            raise ConfigError(f"{where}: inherit_env must be true or false")
        if not isinstance(description, str):
            raise ConfigError(f"{where}: description must be a string")
        if cwd is not None and not isinstance(cwd, str | os.PathLike):
            raise ConfigError(f"{where}: cwd must be a path")
        grace_value = _positive(where, "grace", grace)
        return cls(
            name=name,
            command=argv,
            callable=callable,
            params=tuple(specs),
            timeout=_positive(where, "timeout", timeout),
            concurrency=_positive(where, "concurrency", concurrency, integer=True),
            grace=DEFAULT_GRACE if grace_value is None else float(grace_value),
            retries=_positive(where, "retries", retries, integer=True) or 0,
            env=env_map,
            inherit_env=inherit_env,
            cwd=os.fspath(cwd) if cwd is not None else None,
            description=description,
            retention=retention,
            gate=gate,
        )

    # -- use -------------------------------------------------------------------

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check ``params`` against the declaration; return them with defaults filled in.

        Raises :class:`InvalidParams` (HTTP 422) whose ``field`` is the
        offending param name: unknown name, missing required value, wrong type
        or a value outside its limits.
        """
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise InvalidParams("params must be an object", field="params")
        declared = {p.name: p for p in self.params}
        for key in params:
            if key not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise InvalidParams(
                    f"task {self.name!r} has no param {key!r} (declared: {known})", field=str(key)
                )
        out: dict[str, Any] = {}
        for spec in self.params:
            if spec.name in params and params[spec.name] is not None:
                out[spec.name] = spec.check(params[spec.name])
            elif spec.has_default:
                out[spec.name] = spec.default
            elif spec.required:
                raise InvalidParams(f"param {spec.name!r} is required", field=spec.name)
        return out

    def check_timeout(self, timeout: float | None) -> float | None:
        """The effective timeout of a run asking for ``timeout`` (``None`` = the task's).

        Raises :class:`InvalidParams` (``field="timeout"``) if it is not a
        positive number or exceeds the task's timeout.
        """
        if timeout is None:
            return self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise InvalidParams("timeout must be a number of seconds", field="timeout")
        if not math.isfinite(timeout) or timeout <= 0:
            raise InvalidParams("timeout must be a positive number of seconds", field="timeout")
        if self.timeout is not None and timeout > self.timeout:
            raise InvalidParams(
                f"timeout {timeout:g}s exceeds task {self.name!r}'s limit of {self.timeout:g}s",
                field="timeout",
            )
        return float(timeout)

    def build_argv(self, params: Mapping[str, Any]) -> list[str]:
        """The argv for validated ``params``: each ``"{name}"`` item becomes the value, verbatim.

        An optional param without a value drops its item.
        """
        if self.command is None:
            raise ConfigError(f"task {self.name!r} is not a command task")
        argv: list[str] = []
        for item in self.command:
            m = _PLACEHOLDER_RE.fullmatch(item)
            if m is None:
                argv.append(item)
            elif m.group(1) in params:
                argv.append(_argv_value(params[m.group(1)]))
        return argv

    def build_env(
        self, params: Mapping[str, Any], base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The child's complete environment for validated ``params``.

        Starts from :func:`~runstream.runner.process.default_env` (a minimal
        copy of this process's environment, with ``PYTHONUNBUFFERED=1``), or
        with ``inherit_env`` from ``base`` (default ``os.environ``) minus any
        ``RUNSTREAM_*`` variable; then the task's ``env``, then the params
        declared with ``env``.
        """
        from runstream.runner.process import default_env

        env = default_env()
        if self.inherit_env:
            source = os.environ if base is None else base
            env.update({k: v for k, v in source.items() if not k.startswith(_SECRET_ENV_PREFIX)})
        env.update(self.env)
        for spec in self.params:
            if spec.env is not None and spec.name in params:
                env[spec.env] = _argv_value(params[spec.name])
        return env

    def resolve(self) -> TaskFunction:
        """Import and return the Python function. Raises :class:`ConfigError` if impossible."""
        fn = self.callable
        if fn is None:
            raise ConfigError(f"task {self.name!r} is a command task, not a Python callable")
        if not isinstance(fn, str):
            return fn
        module_name, _, attr = fn.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"task {self.name!r}: cannot import {fn!r}: {exc}") from exc
        _check_function(f"[tasks.{self.name}]", obj)
        return cast(TaskFunction, obj)

    def to_json(self) -> dict[str, Any]:
        """The public description (``GET /v1/tasks``). The task's ``env`` is never shown."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "params": {p.name: p.to_json() for p in self.params},
            "timeout": self.timeout,
            "concurrency": self.concurrency,
            "grace": self.grace,
            "retries": self.retries,
            "description": self.description,
        }
        if self.retention is not None:
            out["retention"] = self.retention.to_json()
        if self.gate is not None:
            out["gate"] = self.gate.to_json()
        if self.command is not None:
            out["command"] = list(self.command)
        else:
            out["callable"] = self.callable_name
        return out


def _check_placeholders(where: str, argv: Sequence[str], names: set[str]) -> None:
    for i, item in enumerate(argv):
        whole = _PLACEHOLDER_RE.fullmatch(item)
        if whole is not None:
            if whole.group(1) not in names:
                raise ConfigError(
                    f"{where}: command[{i}] is {item!r} but no param {whole.group(1)!r} is declared"
                )
            continue
        for m in _PLACEHOLDER_RE.finditer(item):
            if m.group(1) in names:
                raise ConfigError(
                    f"{where}: command[{i}] {item!r} embeds {{{m.group(1)}}} inside a longer "
                    'string; a param may only be a whole argv item ("{'
                    f"{m.group(1)}"
                    '}") or an environment variable (env = "VAR"), so that no value can '
                    "build shell syntax"
                )


def _check_function(where: str, fn: Any) -> None:
    if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
        raise ConfigError(
            f"{where}: {fn!r} must be an async function (async def) or an async generator"
        )


class TaskRegistry:
    """The set of declared tasks, by name. Build it once at startup; then only read it."""

    def __init__(self, tasks: Iterable[TaskSpec] = ()) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        for task in tasks:
            self.add(task)

    @classmethod
    def from_config(cls, tasks: Mapping[str, Mapping[str, Any]]) -> TaskRegistry:
        """Build from the raw ``[tasks.*]`` tables (``Settings.tasks``); raises ConfigError."""
        if not isinstance(tasks, Mapping):
            raise ConfigError("[tasks] must be a table of task tables")
        return cls(TaskSpec.from_config(name, table) for name, table in tasks.items())

    def add(self, task: TaskSpec) -> TaskSpec:
        if task.name in self._tasks:
            raise ConfigError(f"task {task.name!r} is declared twice")
        self._tasks[task.name] = task
        return task

    def command(self, name: str, argv: Sequence[str], **options: Any) -> TaskSpec:
        """Declare a command task; ``options`` are the :meth:`TaskSpec.build` keywords."""
        return self.add(TaskSpec.build(name, command=argv, **options))

    def python(self, name: str, func: str | TaskFunction, **options: Any) -> TaskSpec:
        """Declare a Python task: ``func`` is an async function/generator or ``"pkg.mod:fn"``."""
        return self.add(TaskSpec.build(name, callable=func, **options))

    def task(self, name: str | None = None, **options: Any) -> Callable[[F], F]:
        """Decorator form of :meth:`python`; the name defaults to the function's name."""

        def decorate(fn: F) -> F:
            self.python(name or fn.__name__, fn, **options)
            return fn

        return decorate

    def get(self, name: str) -> TaskSpec:
        """The task, or :class:`TaskNotFound` (HTTP 404)."""
        try:
            return self._tasks[name]
        except KeyError:
            raise TaskNotFound(f"no task named {name!r} is declared") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return sorted(self._tasks)
