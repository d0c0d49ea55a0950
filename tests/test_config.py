"""Settings: defaults < runstream.toml < RUNSTREAM_* environment < CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from runstream.config import Settings, is_loopback, load_settings
from runstream.errors import ConfigError

TOML = """
[server]
host = "127.0.0.1"
port = 9000
backend = "memory://"
keepalive = 5
retry_ms = 1500

[auth]
token = "write-token-1"
read_token = "read-token-1"
tokens = [{ token = "another-one", scopes = ["read"] }]

[limits]
max_batch = 10

[tasks.hello]
command = ["echo", "{name}"]
params = { name = { type = "string", default = "world" } }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runstream.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(env={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8787)
    assert s.server.backend == "sqlite:///./.runstream/runstream.db"
    assert s.server.keepalive == 15 and s.server.retry_ms == 2000
    assert s.tokens == () and not s.auth_enabled and s.tasks == {}


def test_file_values_tokens_and_raw_tasks(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, TOML), env={})
    assert s.server.port == 9000 and s.server.keepalive == 5.0 and s.server.retry_ms == 1500
    assert s.limits.max_batch == 10 and s.limits.max_body_bytes == 4 * 1024 * 1024
    assert s.scopes_for("write-token-1") == {"read", "write"}
    assert s.scopes_for("read-token-1") == {"read"}
    assert s.scopes_for("another-one") == {"read"}
    assert s.scopes_for("nope") is None and s.scopes_for(None) is None
    assert s.tasks["hello"]["command"] == ["echo", "{name}"]
    assert "write-token-1" not in repr(s)


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    env = {
        "RUNSTREAM_PORT": "9100",
        "RUNSTREAM_BACKEND": "redis://localhost:6379/0",
        "RUNSTREAM_MAX_BATCH": "7",
        "RUNSTREAM_TOKEN": "env-token-12",
        "RUNSTREAM_KEEPALIVE": "2.5",
    }
    s = load_settings(write(tmp_path, TOML), env=env, port=9200, host=None)
    assert s.server.port == 9200  # flag beats environment
    assert s.server.backend == "redis://localhost:6379/0"
    assert s.server.keepalive == 2.5 and s.limits.max_batch == 7
    assert s.scopes_for("env-token-12") == {"read", "write"}
    assert s.scopes_for("write-token-1") is None  # RUNSTREAM_TOKEN replaces [auth].token


def test_resource_limits_from_file_and_environment(tmp_path: Path) -> None:
    text = "[limits]\nmax_page_bytes = 65536\nheader_timeout = 2.5\nmax_connections = 500\n"
    s = load_settings(write(tmp_path, text), env={"RUNSTREAM_SEND_TIMEOUT": "7"})
    lim = s.limits
    assert (lim.max_page_bytes, lim.header_timeout, lim.max_connections) == (65536, 2.5, 500)
    assert lim.send_timeout == 7.0
    default = load_settings(env={}).limits
    assert default.max_connections is None  # from the open-file limit
    assert default.max_page_bytes == 4 * 1024 * 1024


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, TOML)
    s = load_settings(env={"RUNSTREAM_CONFIG": str(path)})
    assert s.server.port == 9000 and s.source == str(path)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nport = 'x'\n", {}, "server.port: invalid value"),
        ("[server]\nbogus = 1\n", {}, "unknown setting(s) ['bogus']"),
        ("[nope]\n", {}, "unknown section"),
        ("", {"RUNSTREAM_PORT": "eighty"}, "server.port"),
        ("", {"RUNSTREAM_KEEPALIVE": "-1"}, "server.keepalive: invalid value '-1'"),
        ("[auth]\ntoken = 'short'\n", {}, "at least 8 characters"),
        ("[auth]\ntokens = [{ token = 'long-enough', scopes = ['admin'] }]\n", {}, "scopes"),
        ("[server]\nport = 70000\n", {}, "server.port: invalid value 70000"),
        ("[server]\nport = true\n", {}, "server.port: a boolean is not a valid value"),
        ("[limits]\ndefault_page_limit = 2000\n", {}, "default_page_limit must be <="),
        ("[server\n", {}, "cannot read config file"),
        ("[tasks]\nhello = 1\n", {}, "[tasks.hello] must be a table"),
        ("[limits]\nmax_page_bytes = 0\n", {}, "limits.max_page_bytes: invalid value 0"),
        ("", {"RUNSTREAM_SEND_TIMEOUT": "0"}, "limits.send_timeout"),
        ("[limits]\nmax_connections = 0\n", {}, "limits.max_connections: invalid value 0"),
    ],
)
def test_invalid_settings_raise_config_error_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env=env)
    assert message in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", env={})


def test_public_bind_needs_a_token() -> None:
    open_public = Settings().replace(host="0.0.0.0")
    with pytest.raises(ConfigError, match="without an access token"):
        open_public.check_bind()
    Settings().check_bind()  # loopback is fine without a token
    load_settings(env={"RUNSTREAM_TOKEN": "long-token-1"}, host="0.0.0.0").check_bind()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_host_and_origin_lists_from_file_and_environment(tmp_path: Path) -> None:
    text = (
        "[server]\nallowed_hosts = ['runs.example.com', '*.internal']\n"
        "cors_origins = ['https://app.example.com']\n"
    )
    s = load_settings(write(tmp_path, text), env={})
    assert s.server.allowed_hosts == ("runs.example.com", "*.internal")
    assert s.server.cors_origins == ("https://app.example.com",)
    env = {"RUNSTREAM_CORS_ORIGINS": " https://a.example , http://localhost:3000,"}
    s = load_settings(write(tmp_path, text), env=env)
    assert s.server.cors_origins == ("https://a.example", "http://localhost:3000")
    assert load_settings(env={}).server.allowed_hosts == ()
    with pytest.raises(ConfigError, match=r"server\.allowed_hosts\[0\]: invalid value 1"):
        load_settings(write(tmp_path, "[server]\nallowed_hosts = [1]\n"), env={})


def test_any_cors_origin_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="cors_origins"):
        load_settings(env={"RUNSTREAM_CORS_ORIGINS": "*"})
    s = load_settings(env={"RUNSTREAM_CORS_ORIGINS": "*", "RUNSTREAM_TOKEN": "long-token-1"})
    assert s.server.cors_origins == ("*",)


def test_repr_masks_the_backend_password() -> None:
    s = load_settings(env={"RUNSTREAM_BACKEND": "redis://user:hunter22@db:6379/0"})
    assert s.server.backend == "redis://user:hunter22@db:6379/0"
    assert "hunter22" not in repr(s) and "redis://user:***@db:6379/0" in repr(s)


def test_retention_storage_and_gates_from_file_and_section_named_environment(
    tmp_path: Path,
) -> None:
    config = tmp_path / "runstream.toml"
    config.write_text(
        "[retention]\nmax_age = 86400\nmax_runs = 50\n"
        "[storage]\nmin_free_disk = 0\n"
        "[gates]\nmin_free_memory = 1073741824\nmax_load = 1.5\n"
    )
    env = {"RUNSTREAM_RETENTION_MAX_RUNS": "10", "RUNSTREAM_GATES_MIN_FREE_DISK": "5"}
    settings = load_settings(config, env=env)
    assert (settings.retention.max_age, settings.retention.max_runs) == (86400.0, 10)
    assert settings.retention.stream_max_idle is None and settings.retention.interval == 300
    assert settings.storage.min_free_disk == 0
    assert settings.gates.min_free_memory == 2**30
    assert (settings.gates.min_free_disk, settings.gates.max_load) == (5, 1.5)
    assert Settings().storage.min_free_disk == 256 * 2**20


def test_the_retention_duty_cycle_defaults_to_a_hundredth_and_is_set_like_the_others() -> None:
    assert Settings().retention.duty_cycle == 0.01
    env = {"RUNSTREAM_RETENTION_DUTY_CYCLE": "1"}
    assert load_settings(env=env).retention.duty_cycle == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "[retention]\nmax_age = -1\n",
        "[retention]\nkeep = 1\n",
        "[retention]\nduty_cycle = 0\n",
        "[retention]\nduty_cycle = 1.5\n",
        "[gates]\nmax_load = 0\n",
    ],
)
def test_invalid_retention_and_gates_name_the_key(tmp_path: Path, text: str) -> None:
    config = tmp_path / "runstream.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"retention|gates"):
        load_settings(config, env={})
