"""Where the test suite's Postgres comes from, in order: DISPATCH_TEST_DATABASE_URL; with
DISPATCH_TEST_PG=distribution, a throwaway cluster from the machine's distribution binaries (stock
settings, JIT on: `make test-distribution`); a testcontainers Postgres when a Docker engine
answers; an embedded pgserver Postgres."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dispatch.migrate import migrate

TEMPLATE = "dispatch_template"


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """An admin URL (to the `postgres` database) of a server the tests may create databases on."""
    url = os.environ.get("DISPATCH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if os.environ.get("DISPATCH_TEST_PG") == "distribution":
        from tests import pgdist

        with pgdist.cluster() as url:
            yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    with embedded_server() as url:
        yield url


@contextlib.contextmanager
def embedded_server(max_connections: int = 400) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        from pgserver._commands import pg_ctl

    root = Path(tempfile.mkdtemp(prefix="dispatch-test-pg-"))
    pgdata = root / "pg"
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    # A throwaway cluster: durability off for speed, room for multi-process tests.
    server.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
        "ALTER SYSTEM SET full_page_writes = off;"
        f"ALTER SYSTEM SET max_connections = {max_connections};"
    )
    pg_ctl(["-w", "restart"], pgdata=pgdata, user=server.system_user)
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def database_url(server: str, dbname: str) -> str:
    params = conninfo_to_dict(server)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


def create_template(server: str) -> str:
    """Create and migrate the template every test database is cloned from."""
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    url = database_url(server, TEMPLATE)
    migrate(url)
    return url


def clone_database(server: str) -> str:
    """A fresh, migrated database of its own; drop it with drop_database."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}" STRATEGY FILE_COPY')
    return database_url(server, name)


def drop_database(server: str, url: str) -> None:
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
