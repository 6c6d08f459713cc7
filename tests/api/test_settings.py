"""Configuration: defaults, YAML, environment overrides, errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.errors import ConfigError
from dispatch.settings import ENV_KEYS, ENV_NAMES, Settings, load_settings


def test_defaults_are_the_spec_defaults() -> None:
    s = load_settings(None, {})
    assert (s.server.port, s.server.metrics_port, s.server.admin_token) == (8600, 8601, "")
    assert s.database.url == "" and s.hermes.url == "" and s.warren.url == ""
    a = s.assignment
    assert (a.tick_interval_ms, a.wake_timeout_ms, a.default_timeout_ms) == (5000, 30000, 300000)
    assert (a.max_concurrent_per_agent, a.owner_filter_enabled) == (3, True)
    assert (a.retry_backoff_ms, a.retry_backoff_max_ms, a.unmatched_repeat_ms) == (
        1000, 300000, 600000,
    )
    assert (s.directory.refresh_ms, s.directory.stale_ms, s.retention.hours) == (5000, 60000, 168)
    assert (s.logging.level, s.logging.format) == ("info", "auto")


def test_yaml_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "dispatch.yaml"
    config.write_text(
        "server:\n  port: 9000\n  admin_token: from-file\n"
        "assignment:\n  owner_filter_enabled: true\n  tick_interval_ms: 100\n"
        "warren:\n  url: http://warren\n  token: w\n"
        "logging:\n  level: debug\n"
    )
    s = load_settings(config, {"DISPATCH_ADMIN_TOKEN": "from-env",
                               "DISPATCH_OWNER_FILTER_ENABLED": "false",
                               "DISPATCH_LOG_FORMAT": "TEXT"})
    assert s.server.port == 9000 and s.server.admin_token == "from-env"
    assert s.assignment.owner_filter_enabled is False
    assert s.assignment.tick_interval_ms == 100
    assert (s.warren.url, s.warren.token) == ("http://warren", "w")
    assert (s.logging.level, s.logging.format) == ("debug", "text")
    same = load_settings(None, {"DISPATCH_CONFIG": str(config)})
    assert same.server.port == 9000


def test_every_spec_environment_variable_is_read() -> None:
    spec = {"DISPATCH_PORT", "DISPATCH_METRICS_PORT", "DISPATCH_ADMIN_TOKEN",
            "DISPATCH_DATABASE_URL", "DISPATCH_HERMES_URL", "DISPATCH_WARREN_URL",
            "DISPATCH_WARREN_TOKEN", "DISPATCH_FORGE_URL", "DISPATCH_TICK_INTERVAL_MS",
            "DISPATCH_OWNER_FILTER_ENABLED", "DISPATCH_LOG_LEVEL", "DISPATCH_DATA_DIR",
            "DISPATCH_ALEXANDRIA_URL", "DISPATCH_WAKE_TIMEOUT_MS", "DISPATCH_DEFAULT_TIMEOUT_MS",
            "DISPATCH_MAX_CONCURRENT_PER_AGENT", "DISPATCH_LOG_FORMAT"}
    assert spec <= set(ENV_KEYS)
    s = load_settings(None, {"DISPATCH_FORGE_URL": "http://forge",
                             "DISPATCH_MAX_CONCURRENT_PER_AGENT": "7",
                             "DISPATCH_DATA_DIR": "/var/lib/dispatch"})
    assert s.promptforge.url == "http://forge"
    assert s.assignment.max_concurrent_per_agent == 7
    assert s.data_dir == "/var/lib/dispatch"


def test_every_setting_has_an_environment_name_derived_from_the_tree() -> None:
    assert ENV_NAMES["DISPATCH_ASSIGNMENT_TICK_INTERVAL_MS"] == ("assignment", "tick_interval_ms")
    assert ENV_NAMES["DISPATCH_HERMES_POLL_INTERVAL_MS"] == ("hermes", "poll_interval_ms")
    assert set(ENV_KEYS.values()) <= set(ENV_NAMES.values())
    s = load_settings(None, {"DISPATCH_ASSIGNMENT_BATCH_SIZE": "7",
                             "DISPATCH_ASSIGNMENT_OWNER_FILTER_ENABLED": "off",
                             "DISPATCH_LOGGING_LEVEL": "WARNING",
                             "DISPATCH_HERMES_POLL_INTERVAL_MS": "250",
                             "DISPATCH_TICK_INTERVAL_MS": "100",
                             "DISPATCH_ASSIGNMENT_TICK_INTERVAL_MS": "200"})
    assert (s.assignment.batch_size, s.assignment.owner_filter_enabled) == (7, False)
    assert (s.logging.level, s.hermes.poll_interval_ms) == ("warning", 250)
    assert s.assignment.tick_interval_ms == 200  # the derived name wins over its alias
    s = load_settings(None, {"DISPATCH_DATABASE_LOCK_TIMEOUT_MS": "500",
                             "DISPATCH_DATABASE_STATEMENT_TIMEOUT_MS": "4000",
                             "DISPATCH_DATABASE_POOL_TIMEOUT_MS": "3000"})
    assert (s.database.lock_timeout_ms, s.database.statement_timeout_ms,
            s.database.pool_timeout_ms) == (500, 4000, 3000)


def test_the_relay_polls_on_its_own_setting_not_the_tick() -> None:
    s = load_settings(None, {"DISPATCH_TICK_INTERVAL_MS": "100"})
    assert (s.assignment.tick_interval_ms, s.hermes.poll_interval_ms) == (100, 5000)


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"DISPATCH_PORT": "eighty"}, "server.port"),
        ({"DISPATCH_PORT": "70000"}, "server.port"),
        ({"DISPATCH_TICK_INTERVAL_MS": "0"}, "assignment.tick_interval_ms"),
        ({"DISPATCH_OWNER_FILTER_ENABLED": "maybe"}, "DISPATCH_OWNER_FILTER_ENABLED"),
        ({"DISPATCH_LOG_LEVEL": "loud"}, "logging.level"),
        ({"DISPATCH_LOG_FORMAT": "xml"}, "logging.format"),
        ({"DISPATCH_MAX_CONCURRENT_PER_AGENT": "-1"}, "assignment.max_concurrent_per_agent"),
        ({"DISPATCH_DATABASE_LOCK_TIMEOUT_MS": "0"}, "database.lock_timeout_ms"),
        ({"DISPATCH_DATABASE_STATEMENT_TIMEOUT_MS": "soon"}, "database.statement_timeout_ms"),
    ],
)
def test_an_invalid_value_names_its_key(environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ)
    assert key in error.value.message


def test_unknown_and_invalid_file_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "dispatch.yaml"
    config.write_text("server:\n  prot: 9000\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config, {})
    assert error.value.message.endswith(
        "server: Object contains unknown field `prot` (did you mean `port`?)")
    config.write_text("servr:\n  port: 9000\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config, {})
    assert error.value.message.endswith("(did you mean `server`?)")
    config.write_text("auth:\n  mode: token\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config, {})
    assert error.value.message.endswith(
        "auth.mode: Invalid enum value 'token' (one of: open, tokens)")
    config.write_text("retention:\n  hours: soon\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config, {})
    assert "retention.hours" in error.value.message


def test_serve_refuses_to_start_on_a_bad_value(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env |= {"DISPATCH_PORT": "not-a-port", "DISPATCH_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "dispatch", "serve"], env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "server.port" in done.stderr
    assert not (tmp_path / "pg").exists()  # stopped before touching anything


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.server.port = 1  # type: ignore[misc]
