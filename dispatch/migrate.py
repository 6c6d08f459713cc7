"""Brings a database to this code's schema, under an advisory lock.

`sql/schema/` is the one definition of the schema: every object as it is now, one file per topic,
run in order (each file uses only what the files before it define). A fresh database gets it as it
is, with every shipped migration recorded as applied. A database made by an earlier release gets
the shipped migrations it lacks, `sql/migrations/NNN_name.sql`, in order, each in its own
transaction. A database whose applied migrations are not the shipped ones (newer, or from another
build) is refused.

Version 1, `baseline`, is the schema of the first release. Until that release it has no file: the
baseline is `schema/` itself, so a database made by any earlier commit (it has 1 `baseline`
recorded) counts as up to date, and no later migration may ship, since an upgrade would have no
fixed schema to start from (`discover` refuses one). A database made before the release from an
older `schema/` is not brought forward: make it again. The release commit freezes the baseline:
`freeze_baseline` writes `migrations/001_baseline.sql` from `schema/`. From then on that file
never changes, every schema change is a migration `002_...` *and* the same edit of `schema/`, and
tests/db/test_schema.py checks that both paths build the same catalog. (sql/migrations/README.md
says the same for whoever opens that directory.)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from dispatch.db import LINK_KWARGS
from dispatch.errors import MigrationError

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).parent / "sql"
SCHEMA_DIR = SQL_DIR / "schema"
MIGRATIONS_DIR = SQL_DIR / "migrations"
# A migration runs as long as it needs (it may rewrite a large table, or wait for the locks it
# takes): no lock or statement bound from a server or role default cuts it short. The pooled
# sessions of the replicas that keep serving meanwhile have theirs, so they answer 503 rather than
# queue behind it without end.
MIGRATE_SETTINGS = {"TimeZone": "UTC", "lock_timeout": "0", "statement_timeout": "0"}
# Any constant works; it only has to be the same for every replica.
MIGRATION_LOCK_KEY = 0x44495350  # "DISP"
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
BASELINE_FILE = "001_baseline.sql"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    # None for the baseline before it is frozen: `schema/` is the baseline.
    path: Path | None


def discover(migrations_dir: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations shipped with this code, in version order, the baseline first."""
    found = []
    for path in sorted(migrations_dir.iterdir()):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {migrations_dir}")
    if 1 in versions:
        return found
    if found:
        raise MigrationError(
            f"{migrations_dir} ships {', '.join(m.path.name for m in found if m.path)} but no "
            f"frozen baseline ({BASELINE_FILE}): before the first release the schema changes "
            "in schema/ alone; freeze the baseline first (see migrations/README.md)"
        )
    return [Migration(1, "baseline", None)]


def baseline_sql(release: str, schema_dir: Path = SCHEMA_DIR) -> str:
    """The text of the frozen baseline: the schema files in order, each under a line naming it."""
    parts = [
        f"-- The baseline: the schema of release {release}, frozen from schema/. Never edit this\n"
        "-- file: a change to the schema is a new migration here and the same change in\n"
        "-- ../schema/, and tests/db/test_schema.py checks that the two build the same catalog.\n"
    ]
    for path in schema_files(schema_dir):
        parts.append(f"\n-- ---- schema/{path.name} at {release}\n\n{path.read_text()}")
    return "".join(parts)


def freeze_baseline(
    release: str, schema_dir: Path = SCHEMA_DIR, migrations_dir: Path = MIGRATIONS_DIR
) -> Path:
    """Writes migrations/001_baseline.sql from schema/: done once, by the commit of the first
    release."""
    path = migrations_dir / BASELINE_FILE
    if path.exists():
        raise MigrationError(f"{path} exists: the baseline is frozen already")
    path.write_text(baseline_sql(release, schema_dir))
    return path


def schema_files(schema_dir: Path = SCHEMA_DIR) -> list[Path]:
    """The current schema, in the order its files must run."""
    return sorted(p for p in schema_dir.iterdir() if p.suffix == ".sql")


def migrate(
    url: str, migrations_dir: Path = MIGRATIONS_DIR, schema_dir: Path = SCHEMA_DIR
) -> list[int]:
    """Bring the database to this code's schema; return the versions recorded (empty when it was
    up to date)."""
    migrations = discover(migrations_dir)
    with psycopg.connect(url, **LINK_KWARGS) as conn:  # type: ignore[arg-type]
        for name, value in MIGRATE_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS dispatch")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS dispatch.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = conn.execute("SELECT version, name FROM dispatch.schema_migrations").fetchall()
            applied = {int(version): str(name) for version, name in rows}
            _refuse_drift(applied, migrations)
            if not applied:
                return _create(conn, migrations, schema_dir)
            return _upgrade(conn, [m for m in migrations if m.version not in applied])
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _refuse_drift(applied: dict[int, str], migrations: list[Migration]) -> None:
    shipped = {m.version: m.name for m in migrations}
    latest = max(shipped, default=0)
    newest = max(applied, default=0)
    if newest > latest:
        raise MigrationError(
            f"database schema is at version {newest}, newer than this code knows "
            f"({latest}); upgrade dispatch before running it against this database"
        )
    foreign = [f"{v:03d}_{n}" for v, n in sorted(applied.items()) if shipped.get(v) != n]
    if foreign:
        raise MigrationError(
            "database has migrations this build of dispatch does not ship: "
            f"{', '.join(foreign)} (shipped: "
            f"{', '.join(f'{m.version:03d}_{m.name}' for m in migrations)}); it was made by "
            "another build, so its schema cannot be trusted: run the build that made it, or "
            "start from a new database"
        )


def _create(
    conn: psycopg.Connection[tuple[object, ...]], migrations: list[Migration], schema_dir: Path
) -> list[int]:
    """A fresh database: the current schema in one transaction, every migration recorded."""
    with conn.transaction():
        for path in schema_files(schema_dir):
            try:
                with conn.transaction():
                    conn.execute(path.read_text())  # type: ignore[call-overload]
            except psycopg.Error as exc:
                raise MigrationError(
                    f"schema file {path.name} failed and nothing was created: {exc}"
                ) from exc
        for m in migrations:
            conn.execute(
                "INSERT INTO dispatch.schema_migrations (version, name) VALUES (%s, %s)",
                (m.version, m.name),
            )
    log.info("created the schema (%d files)", len(schema_files(schema_dir)))
    return [m.version for m in migrations]


def _upgrade(conn: psycopg.Connection[tuple[object, ...]], pending: list[Migration]) -> list[int]:
    applied_now: list[int] = []
    for m in pending:
        if m.path is None:  # an unfrozen baseline ships alone: such a database was refused
            raise MigrationError("database has migrations recorded but not the baseline")
        try:
            with conn.transaction():
                conn.execute(m.path.read_text())  # type: ignore[call-overload]
                conn.execute(
                    "INSERT INTO dispatch.schema_migrations (version, name) VALUES (%s, %s)",
                    (m.version, m.name),
                )
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration {m.path.name} failed and was rolled back: {exc}"
            ) from exc
        log.info("applied migration %03d_%s", m.version, m.name)
        applied_now.append(m.version)
    return applied_now
