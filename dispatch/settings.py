"""Configuration: defaults, then a YAML file, then environment overrides (DISPATCH_<SECTION>_<KEY>,
derived from the tree, and the original service's names as aliases)."""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_origin

import msgspec
import yaml

from dispatch.errors import ConfigError

DEFAULT_PORT = 8600
DEFAULT_METRICS_PORT = 8601
DEFAULT_DATA_DIR = ".dispatch"

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1)]
Url = Annotated[str, msgspec.Meta(max_length=2048)]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerSettings(_Section, frozen=True):
    host: str = "0.0.0.0"
    port: Port = DEFAULT_PORT
    metrics_port: Port = DEFAULT_METRICS_PORT
    admin_token: str = ""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    # A request must arrive whole (headers and body) this soon after its first byte (or after the
    # connection opens); an idle keep-alive connection is closed after keep_alive_ms.
    read_timeout_ms: Annotated[int, msgspec.Meta(ge=100)] = 10000
    keep_alive_ms: Annotated[int, msgspec.Meta(ge=1000)] = 5000
    # Processes of `dispatch serve`, each a full replica sharing the API port; 0: one per CPU.
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    # Set by `serve --workers N` for its workers: the API socket is shared with SO_REUSEPORT.
    reuse_port: bool = False


class DatabaseSettings(_Section, frozen=True):
    url: Url = ""
    # A session URL of the same primary (direct, or a session-mode pooler) for what needs a
    # session of its own: LISTEN, migrations and their lock, the connection plan. "": url.
    listen_url: Url = ""
    # What url's connections are: "session" (a direct connection, or a session-mode pooler:
    # Dispatch sets the session's settings once connected) or "transaction" (a transaction-mode
    # pooler such as PgBouncer's: no SET and no prepared statements on url; the settings must be
    # the server's defaults for the role, checked at start-up; listen_url required).
    pool_mode: Literal["session", "transaction"] = "session"
    # A read replica (a streaming standby of the primary) for the dashboard, stats, the metrics'
    # queue gauges and explain; never the lifecycle. Reads go to the primary while the replica
    # is down or more than read_max_lag_ms behind. "": every read on the primary.
    read_url: Url = ""
    read_max_lag_ms: PositiveMs = 5000
    pool_min: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    pool_max: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    # The connections one `dispatch serve` may hold, all its workers together (each worker: its
    # pool, its LISTEN and its /health probe). 0: at most half of the server's free connections
    # at start-up, after keeping room for psql and other clients (dispatch.preflight).
    max_connections: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    # Bounds of every pooled session (the API and the loops, not LISTEN nor migrations): a row
    # held by a stuck session, a runaway statement or a pool with no free connection is answered
    # 503 with Retry-After instead of a request that hangs.
    lock_timeout_ms: PositiveMs = 2000
    statement_timeout_ms: PositiveMs = 15000
    pool_timeout_ms: PositiveMs = 10000


class ServiceSettings(_Section, frozen=True):
    url: Url = ""
    token: str = ""


class HermesSettings(ServiceSettings, frozen=True):
    # How often the event relay looks for unpublished events when no NOTIFY wakes it.
    poll_interval_ms: PositiveMs = 5000


class AssignmentSettings(_Section, frozen=True):
    tick_interval_ms: PositiveMs = 5000
    wake_timeout_ms: PositiveMs = 30000
    default_timeout_ms: Annotated[int, msgspec.Meta(ge=1000)] = 300000
    max_concurrent_per_agent: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    owner_filter_enabled: bool = True
    retry_backoff_ms: Annotated[int, msgspec.Meta(ge=0)] = 1000
    retry_backoff_max_ms: Annotated[int, msgspec.Meta(ge=0)] = 300000
    unmatched_repeat_ms: PositiveMs = 600000
    # Priority aging: a pending task's effective priority rises one level per aging_ms of waiting
    # (up to 10); 0 turns it off.
    aging_ms: Annotated[int, msgspec.Meta(ge=0, le=2_147_483_647)] = 300000
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100


class DirectorySettings(_Section, frozen=True):
    refresh_ms: PositiveMs = 5000
    stale_ms: PositiveMs = 60000


class RetentionSettings(_Section, frozen=True):
    hours: Annotated[int, msgspec.Meta(ge=1)] = 168


class AuthSettings(_Section, frozen=True):
    # open: X-Agent-ID is trusted (the original service's model). tokens: every /api/v1 request
    # carries the admin token or a token issued to its X-Agent-ID, and tasks are visible only to
    # those involved in them.
    mode: Literal["open", "tokens"] = "open"
    # How long a replica trusts a verified agent token without asking the database again: the
    # bound on how late a revocation takes effect on a replica that missed its NOTIFY.
    token_cache_ms: Annotated[int, msgspec.Meta(ge=0, le=300000)] = 5000


class UiSettings(_Section, frozen=True):
    # The dashboard at /ui on the API port (sign-in with the admin token).
    enabled: bool = True
    # Live updates: at most one refresh of what the open dashboards show per refresh_ms, however
    # many notifications arrive, and one every tick_ms without any (charts and ages move on).
    refresh_ms: Annotated[int, msgspec.Meta(ge=100, le=60000)] = 1000
    tick_ms: Annotated[int, msgspec.Meta(ge=1000, le=600000)] = 5000
    # How long a sign-in lasts.
    session_hours: Annotated[int, msgspec.Meta(ge=1, le=24 * 365)] = 12
    # Wrong admin tokens at the sign-in, per client address: this many at once, then this many a
    # minute (429 with Retry-After meanwhile); and for the whole process, from all addresses.
    sign_in_burst: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 10
    sign_in_per_minute: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 6
    sign_in_global_burst: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 100
    sign_in_global_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1000000)] = 60


class LoggingSettings(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: readable text on a terminal, JSON lines otherwise (a file, a pipe, a log collector).
    format: Literal["auto", "json", "text"] = "auto"


class TracingSettings(_Section, frozen=True):
    # OpenTelemetry spans (the tracing extra): each API request, transition, assignment and
    # relay batch, one trace per task from its create to its agent (dispatch.tracing).
    enabled: bool = False
    # otlp: OTLP over HTTP to endpoint; console: printed on stdout; none: made and propagated,
    # not exported.
    exporter: Literal["otlp", "console", "none"] = "otlp"
    # The OTLP/HTTP traces URL (http://collector:4318/v1/traces); "": OpenTelemetry's own
    # (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318).
    endpoint: Url = ""
    service_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "dispatch"
    # The share of new traces kept; a trace its caller started keeps the caller's decision.
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0


class Settings(_Section, frozen=True):
    """Everything `dispatch` reads from its configuration, built once and passed explicitly."""

    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    hermes: HermesSettings = HermesSettings()
    warren: ServiceSettings = ServiceSettings()
    promptforge: ServiceSettings = ServiceSettings()
    alexandria: ServiceSettings = ServiceSettings()
    assignment: AssignmentSettings = AssignmentSettings()
    directory: DirectorySettings = DirectorySettings()
    retention: RetentionSettings = RetentionSettings()
    auth: AuthSettings = AuthSettings()
    logging: LoggingSettings = LoggingSettings()
    ui: UiSettings = UiSettings()
    tracing: TracingSettings = TracingSettings()
    data_dir: str = DEFAULT_DATA_DIR


ENV_PREFIX = "DISPATCH_"


def _env_names(
    kind: type[msgspec.Struct], path: tuple[str, ...] = ()
) -> dict[str, tuple[str, ...]]:
    """DISPATCH_<SECTION>_<KEY> for every setting of the tree (DISPATCH_ASSIGNMENT_BATCH_SIZE)."""
    names: dict[str, tuple[str, ...]] = {}
    for field in msgspec.structs.fields(kind):
        here = (*path, field.name)
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            names.update(_env_names(field.type, here))
        else:
            names[ENV_PREFIX + "_".join(here).upper()] = here
    return names


ENV_NAMES: Mapping[str, tuple[str, ...]] = _env_names(Settings)

# The names the original service documents, kept as aliases of the derived ones.
ENV_KEYS: Mapping[str, tuple[str, ...]] = {
    "DISPATCH_PORT": ("server", "port"),
    "DISPATCH_METRICS_PORT": ("server", "metrics_port"),
    "DISPATCH_HOST": ("server", "host"),
    "DISPATCH_ADMIN_TOKEN": ("server", "admin_token"),
    "DISPATCH_DATABASE_URL": ("database", "url"),
    "DISPATCH_HERMES_URL": ("hermes", "url"),
    "DISPATCH_WARREN_URL": ("warren", "url"),
    "DISPATCH_WARREN_TOKEN": ("warren", "token"),
    "DISPATCH_FORGE_URL": ("promptforge", "url"),
    "DISPATCH_ALEXANDRIA_URL": ("alexandria", "url"),
    "DISPATCH_TICK_INTERVAL_MS": ("assignment", "tick_interval_ms"),
    "DISPATCH_WAKE_TIMEOUT_MS": ("assignment", "wake_timeout_ms"),
    "DISPATCH_DEFAULT_TIMEOUT_MS": ("assignment", "default_timeout_ms"),
    "DISPATCH_MAX_CONCURRENT_PER_AGENT": ("assignment", "max_concurrent_per_agent"),
    "DISPATCH_OWNER_FILTER_ENABLED": ("assignment", "owner_filter_enabled"),
    "DISPATCH_RETRY_BACKOFF_MS": ("assignment", "retry_backoff_ms"),
    "DISPATCH_RETRY_BACKOFF_MAX_MS": ("assignment", "retry_backoff_max_ms"),
    "DISPATCH_UNMATCHED_REPEAT_MS": ("assignment", "unmatched_repeat_ms"),
    "DISPATCH_DIRECTORY_REFRESH_MS": ("directory", "refresh_ms"),
    "DISPATCH_DIRECTORY_STALE_MS": ("directory", "stale_ms"),
    "DISPATCH_RETENTION_HOURS": ("retention", "hours"),
    "DISPATCH_LOG_LEVEL": ("logging", "level"),
    "DISPATCH_LOG_FORMAT": ("logging", "format"),
    "DISPATCH_DATA_DIR": ("data_dir",),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _leaf_type(keys: tuple[str, ...]) -> object:
    kind: object = Settings
    for key in keys:
        assert isinstance(kind, type) and issubclass(kind, msgspec.Struct)
        kind = next(f.type for f in msgspec.structs.fields(kind) if f.name == key)
    return kind


def _env_value(name: str, keys: tuple[str, ...], raw: str) -> object:
    kind = _leaf_type(keys)
    lowered = raw.strip().lower()
    if kind is bool:
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{name}: expected true or false, got {raw!r}")
    if get_origin(kind) is Literal:
        return lowered
    return raw


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings; raise ConfigError naming the key of the first invalid value."""
    env = os.environ if environ is None else environ
    path = path or env.get("DISPATCH_CONFIG") or None
    tree: dict[str, object] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    # The aliases first, so that a derived name set as well wins.
    for name, keys in [*ENV_KEYS.items(), *ENV_NAMES.items()]:
        if name not in env:
            continue
        node = tree
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[:-1])}: must be a mapping")
            node = child
        node[keys[-1]] = _env_value(name, keys, env[name])
    try:
        return msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_name_key(str(exc))}") from exc


def _name_key(message: str) -> str:
    """Turn msgspec's `... - at `$.a.b`` into `a.b: ...`, with the likely fix: the closest key
    to an unknown one, the allowed values of a choice."""
    text, sep, where = message.rpartition(" - at `$.")
    path = where.rstrip("`").split(".") if sep else []
    if not sep:
        text = message
    return (f"{'.'.join(path)}: " if path else "") + text + _hint(text, path)


def _hint(text: str, path: list[str]) -> str:
    node: object = Settings
    for key in path:  # the struct (or field type) the message is about
        if not (isinstance(node, type) and issubclass(node, msgspec.Struct)):
            return ""
        fields = {f.name: f.type for f in msgspec.structs.fields(node)}
        if key not in fields:
            return ""
        node = fields[key]
    unknown = re.search(r"unknown field `([^`]*)`", text)
    if unknown and isinstance(node, type) and issubclass(node, msgspec.Struct):
        close = difflib.get_close_matches(
            unknown.group(1), [f.name for f in msgspec.structs.fields(node)], n=1
        )
        return f" (did you mean `{close[0]}`?)" if close else ""
    choices = typing.get_args(node) if typing.get_origin(node) is typing.Literal else ()
    if choices and "Invalid enum value" in text:
        return " (one of: " + ", ".join(str(c) for c in choices) + ")"
    return ""
