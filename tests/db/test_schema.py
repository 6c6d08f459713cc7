"""The schema has two sources that must agree: `dispatch/sql/schema/` (what a fresh database gets)
and the migrations (what an existing database is brought to). Both are built here, side by side,
and their catalogs compared object by object."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from dispatch.db import CONNECT_KWARGS
from dispatch.migrate import MIGRATIONS_DIR, discover, migrate
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
def two_databases(pg_server: str) -> Iterator[tuple[str, str]]:
    names = [f"s_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for name in names:
            conn.execute(f'CREATE DATABASE "{name}"')
    urls = [pg.database_url(pg_server, name) for name in names]
    yield urls[0], urls[1]
    for url in urls:
        pg.drop_database(pg_server, url)


def build_from_migrations(url: str) -> None:
    """What an existing database goes through: every migration file in order."""
    with psycopg.connect(url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute("CREATE SCHEMA dispatch")
        for m in discover():
            with conn.transaction():
                conn.execute(m.path.read_text())  # type: ignore[call-overload]


def test_schema_and_migrations_build_the_same_catalog(two_databases: tuple[str, str]) -> None:
    from_schema, from_migrations = two_databases
    migrate(from_schema)
    build_from_migrations(from_migrations)
    a, b = catalog(from_schema), catalog(from_migrations)
    # schema_migrations is the migrator's own table, made outside both sources.
    for kind in ("column", "constraint", "index"):
        for side in (a, b):
            side[kind] = {k: v for k, v in side[kind].items() if "schema_migrations" not in k}
    assert a["function"], "the catalog query found no functions"
    for kind in CATALOG:
        assert a[kind].keys() == b[kind].keys(), f"{kind}s differ"
        differ = [name for name in a[kind] if a[kind][name] != b[kind][name]]
        assert not differ, f"{kind}s defined differently: {differ}"


def test_the_migrations_start_with_the_baseline() -> None:
    shipped = discover()
    assert shipped[0].version == 1 and shipped[0].name == "baseline"
    assert [m.path.parent for m in shipped] == [MIGRATIONS_DIR] * len(shipped)
