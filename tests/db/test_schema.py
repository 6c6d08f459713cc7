"""The schema has two paths that must agree: `dispatch/sql/schema/` (what a fresh database gets)
and the baseline plus the migrations (what an existing database is brought to). The baseline is
`migrations/001_baseline.sql` once the first release froze it, and until then `schema/` itself.
Both paths are built here, side by side, and their catalogs compared object by object."""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from dispatch.db import CONNECT_KWARGS
from dispatch.errors import MigrationError
from dispatch.migrate import (
    BASELINE_FILE,
    MIGRATIONS_DIR,
    SCHEMA_DIR,
    discover,
    freeze_baseline,
    migrate,
    schema_files,
)
from tests import pg

# Each query returns (kind, name, definition) rows for one kind of object of schema `dispatch`.
CATALOG = {
    "function": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid)
        FROM pg_proc p WHERE p.pronamespace = 'dispatch'::regnamespace""",
    "column": """
        SELECT c.relname || '.' || a.attname,
               format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null'
                                                       ELSE '' END
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'dispatch'::regnamespace AND c.relkind IN ('r', 'v')
          AND a.attnum > 0 AND NOT a.attisdropped""",
    "constraint": """
        SELECT conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'dispatch'::regnamespace""",
    "index": """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
        WHERE c.relnamespace = 'dispatch'::regnamespace""",
    "trigger": """
        SELECT tgrelid::regclass::text || '.' || tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal AND tgrelid IN (
            SELECT oid FROM pg_class WHERE relnamespace = 'dispatch'::regnamespace)""",
    "view": """
        SELECT c.oid::regclass::text, pg_get_viewdef(c.oid)
        FROM pg_class c WHERE c.relnamespace = 'dispatch'::regnamespace AND c.relkind = 'v'""",
    "type": """
        SELECT t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        WHERE t.typnamespace = 'dispatch'::regnamespace GROUP BY t.typname""",
    "config row": "SELECT 'config', row_to_json(c)::jsonb - 'updated_at' FROM dispatch.config c",
}


def catalog(url: str) -> dict[str, dict[str, str]]:
    with psycopg.connect(url) as conn:
        return {
            kind: {str(name): str(definition) for name, definition in conn.execute(query)}
            for kind, query in CATALOG.items()
        }


@pytest.fixture
def new_database(pg_server: str) -> Iterator[Callable[[], str]]:
    """Makes empty databases, dropped after the test."""
    urls: list[str] = []

    def make() -> str:
        name = f"s_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        urls.append(pg.database_url(pg_server, name))
        return urls[-1]

    yield make
    for url in urls:
        pg.drop_database(pg_server, url)


def build_from_migrations(
    url: str, migrations_dir: Path = MIGRATIONS_DIR, schema_dir: Path = SCHEMA_DIR
) -> None:
    """What an existing database goes through: the baseline, then every migration file in order."""
    with psycopg.connect(url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute("CREATE SCHEMA dispatch")
        for m in discover(migrations_dir):
            for path in [m.path] if m.path else schema_files(schema_dir):
                with conn.transaction():
                    conn.execute(path.read_text())  # type: ignore[call-overload]


def differences(
    new_database: Callable[[], str],
    migrations_dir: Path = MIGRATIONS_DIR,
    schema_dir: Path = SCHEMA_DIR,
) -> list[str]:
    """How the catalog built from schema_dir differs from the one built by the migrations."""
    from_schema, from_migrations = new_database(), new_database()
    migrate(from_schema, migrations_dir, schema_dir)
    build_from_migrations(from_migrations, migrations_dir, schema_dir)
    a, b = catalog(from_schema), catalog(from_migrations)
    # schema_migrations is the migrator's own table, made outside both sources.
    for kind in ("column", "constraint", "index"):
        for side in (a, b):
            side[kind] = {k: v for k, v in side[kind].items() if "schema_migrations" not in k}
    assert a["function"], "the catalog query found no functions"
    found = []
    for kind in CATALOG:
        ours, theirs = a[kind], b[kind]
        found += [f"{kind} {name} only in schema/" for name in ours.keys() - theirs.keys()]
        found += [f"{kind} {name} only in the migrations" for name in theirs.keys() - ours.keys()]
        found += [
            f"{kind} {name} defined differently"
            for name in ours.keys() & theirs.keys()
            if ours[name] != theirs[name]
        ]
    return sorted(found)


def test_schema_and_migrations_build_the_same_catalog(new_database: Callable[[], str]) -> None:
    assert differences(new_database) == []


def test_the_comparison_catches_drift(new_database: Callable[[], str], tmp_path: Path) -> None:
    """After a release: a frozen baseline, and one change made on one path only, then on both."""
    schema, migrations = tmp_path / "schema", tmp_path / "migrations"
    shutil.copytree(SCHEMA_DIR, schema)
    migrations.mkdir()
    freeze_baseline("test", schema, migrations)
    add_note = "ALTER TABLE dispatch.tasks ADD COLUMN note text;\n"
    (migrations / "002_note.sql").write_text(add_note)
    assert differences(new_database, migrations, schema) == [
        "column tasks.note only in the migrations"
    ]
    last = schema_files(schema)[-1]
    last.write_text(last.read_text() + "\n" + add_note)
    assert differences(new_database, migrations, schema) == []
    # A function changed in schema/ without its migration.
    tickets = next(p for p in schema_files(schema) if "flow_tickets()" in p.read_text())
    before = tickets.read_text()
    after = re.sub(r"(flow_tickets\(\) RETURNS integer\n[^$]*\$\$ SELECT )(\d+)",
                   lambda m: m.group(1) + str(int(m.group(2)) + 1), before)
    assert after != before
    tickets.write_text(after)
    assert differences(new_database, migrations, schema) == [
        "function dispatch.flow_tickets() defined differently"
    ]


def test_the_migrations_start_with_the_baseline() -> None:
    shipped = discover()
    assert shipped[0].version == 1 and shipped[0].name == "baseline"
    assert shipped[0].path in (None, MIGRATIONS_DIR / BASELINE_FILE)
    assert [m.path.parent for m in shipped if m.path] == [MIGRATIONS_DIR] * len(shipped[1:])


def test_no_migration_ships_before_the_baseline_is_frozen(tmp_path: Path) -> None:
    shipped = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))
    if BASELINE_FILE not in shipped:
        assert shipped == [], "a migration needs the frozen baseline first"
    (tmp_path / "002_note.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match=r"ships 002_note\.sql but no frozen baseline"):
        discover(tmp_path)


def test_each_schema_file_uses_only_what_comes_before_it() -> None:
    """Read top to bottom, file after file, the schema names nothing before defining it (so that
    each file can be read, and reviewed, on what precedes it). Comments and string literals (the
    settings `dispatch.via` and the like) are left out."""
    defined = {"schema_migrations"}  # made by the migrator before the schema files run
    early = []
    for path in schema_files():
        text = re.sub(r"'(?:[^']|'')*'", "''", re.sub(r"--[^\n]*", "", path.read_text()))
        found = [
            (m.start(), m.group(1), True)
            for m in re.finditer(
                r"CREATE (?:UNIQUE )?(?:FUNCTION|TABLE|TYPE|VIEW|INDEX|TRIGGER) "
                r"(?:dispatch\.)?(\w+)",
                text,
            )
        ] + [(m.start(), m.group(1), False) for m in re.finditer(r"dispatch\.(\w+)", text)]
        for at, name, creates in sorted(found):
            if creates:
                defined.add(name)
            elif name not in defined:
                early.append(f"{path.name}:{text.count(chr(10), 0, at) + 1} {name}")
    assert early == []
