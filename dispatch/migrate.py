"""Applies the forward-only migrations in sql/ in order, under an advisory lock."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from dispatch.db import CONNECT_KWARGS
from dispatch.errors import MigrationError

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).parent / "sql"
# Any constant works; it only has to be the same for every replica.
MIGRATION_LOCK_KEY = 0x44495350  # "DISP"
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """The migrations shipped with this code, in version order."""
    found = []
    for path in sorted(sql_dir.iterdir()):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {sql_dir}")
    return found


def migrate(url: str, sql_dir: Path = SQL_DIR) -> list[int]:
    """Apply pending migrations; return the versions applied (empty when up to date)."""
    migrations = discover(sql_dir)
    latest = migrations[-1].version if migrations else 0
    applied_now: list[int] = []
    with psycopg.connect(url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS dispatch")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS dispatch.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = conn.execute("SELECT version FROM dispatch.schema_migrations").fetchall()
            applied = {row[0] for row in rows}
            newest = max(applied, default=0)
            if newest > latest:
                raise MigrationError(
                    f"database schema is at version {newest}, newer than this code knows "
                    f"({latest}); upgrade dispatch before running it against this database"
                )
            for m in migrations:
                if m.version in applied:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(m.path.read_text())  # type: ignore[call-overload]
                        conn.execute(
                            "INSERT INTO dispatch.schema_migrations (version, name)"
                            " VALUES (%s, %s)",
                            (m.version, m.name),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {m.path.name} failed and was rolled back: {exc}"
                    ) from exc
                log.info("applied migration %03d_%s", m.version, m.name)
                applied_now.append(m.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now
