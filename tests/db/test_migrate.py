"""`dispatch migrate`: the schema onto a fresh database, migrations onto an old one, in order, once,
under a lock, and never onto a newer or a foreign schema."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from dispatch.errors import MigrationError
from dispatch.migrate import BASELINE_FILE, discover, freeze_baseline, migrate
from tests import pg


@pytest.fixture
def empty_db(pg_server: str) -> str:
    name = "m_" + __import__("uuid").uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg.database_url(pg_server, name)
    yield url  # type: ignore[misc]
    pg.drop_database(pg_server, url)


def _released(migrations_dir: Path) -> Path:
    """The shipped migrations as they are once the first release has frozen the baseline."""
    for m in discover():
        if m.path:
            (migrations_dir / m.path.name).write_text(m.path.read_text())
    if not (migrations_dir / BASELINE_FILE).exists():
        freeze_baseline("test", migrations_dir=migrations_dir)
    return migrations_dir


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [
            r[0]
            for r in conn.execute("SELECT version FROM dispatch.schema_migrations ORDER BY version")
        ]


def test_applies_everything_once_and_is_idempotent(empty_db: str) -> None:
    shipped = [m.version for m in discover()]
    assert shipped == sorted(shipped) and shipped[0] == 1
    assert migrate(empty_db) == shipped
    assert migrate(empty_db) == []
    assert _versions(empty_db) == shipped


def test_concurrent_migrators_apply_each_version_once(empty_db: str) -> None:
    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(migrate(empty_db))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    applied = sorted(v for r in results for v in r)
    assert applied == [m.version for m in discover()]


def test_refuses_a_database_ahead_of_the_code(empty_db: str) -> None:
    migrate(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dispatch.schema_migrations (version, name) VALUES (999, 'future')"
        )
    with pytest.raises(MigrationError, match="newer than this code"):
        migrate(empty_db)


def test_refuses_a_database_made_by_another_build(empty_db: str) -> None:
    """Applied migrations that this build does not ship (a pre-release schema, or a fork's)."""
    migrate(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("INSERT INTO dispatch.schema_migrations (version, name) VALUES (0, 'fork')")
    with pytest.raises(MigrationError, match=r"does not ship: 000_fork"):
        migrate(empty_db)


def test_an_old_database_gets_the_missing_migrations(empty_db: str, tmp_path: Path) -> None:
    migrate(empty_db)  # at the baseline
    _released(tmp_path)
    (tmp_path / "002_note.sql").write_text("ALTER TABLE dispatch.tasks ADD COLUMN note text;")
    assert migrate(empty_db, tmp_path) == [2]
    assert migrate(empty_db, tmp_path) == []
    assert _versions(empty_db) == [1, 2]
    with psycopg.connect(empty_db) as conn:
        conn.execute("SELECT note FROM dispatch.tasks")


def test_a_failing_migration_leaves_nothing_half_applied(empty_db: str, tmp_path: Path) -> None:
    migrate(empty_db)
    _released(tmp_path)
    (tmp_path / "900_broken.sql").write_text(
        "CREATE TABLE dispatch.half_done (x int);\nSELECT no_such_function();\n"
    )
    with pytest.raises(MigrationError, match=r"900_broken\.sql failed and was rolled back"):
        migrate(empty_db, tmp_path)
    with psycopg.connect(empty_db) as conn:
        exists = conn.execute("SELECT to_regclass('dispatch.half_done')").fetchone()
    assert exists == (None,)
    assert 900 not in _versions(empty_db)


def test_cli_migrate_reports_and_refuses(empty_db: str) -> None:
    env = {"DISPATCH_DATABASE_URL": empty_db, "PATH": "/usr/bin:/bin"}
    first = subprocess.run(
        [sys.executable, "-m", "dispatch", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0 and "applied" in first.stdout
    second = subprocess.run(
        [sys.executable, "-m", "dispatch", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0 and "up to date" in second.stdout
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("INSERT INTO dispatch.schema_migrations (version, name) VALUES (999, 'x')")
    third = subprocess.run(
        [sys.executable, "-m", "dispatch", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert third.returncode == 1
    assert "newer than this code" in third.stderr
