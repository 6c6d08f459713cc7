"""The benchmark's PostgreSQL: a fresh embedded server with default durability, one database per
system under test, and the cost counters (commits, WAL) read from outside the measured database."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Shown in BENCHMARKS.md: what decides commit cost and plan choice.
REPORTED_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "autovacuum",
    "autovacuum_naptime",
    "jit",
    "max_connections",
    "listen_addresses",
)


def database_url(server_url: str, dbname: str) -> str:
    params = conninfo_to_dict(server_url)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


@dataclass
class Cluster:
    """A running Postgres; `admin_url` points at the `postgres` database."""

    admin_url: str
    pgdata: Path | None
    build: str = "external"
    made: list[str] = field(default_factory=list)  # the database create_database made last

    @property
    def postmaster(self) -> int | None:
        """For CPU accounting: the server's postmaster, when it runs on this machine."""
        from bench.cpu import postmaster_pid

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            backend = int(row[0]) if row else None
            # The backend must be ours to look up: a server elsewhere has other pids.
            host = conn.info.host
            local = host in ("127.0.0.1", "localhost", "::1") or host.startswith("/")
        return postmaster_pid(self.pgdata, backend if local else None)

    def create_database(self, name: str) -> str:
        """A new database for a phase; the one made before it (its phase is over) is dropped.
        The WAL, full-page images and Postgres CPU of a phase are read for the whole server, and
        autovacuum working through an earlier phase's tables would land in them."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for old in {*self.made, name}:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(old)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.made = [name]
        return database_url(self.admin_url, name)

    def settings(self) -> dict[str, str]:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            out: dict[str, str] = {}
            for name in REPORTED_SETTINGS:
                row = conn.execute(
                    "SELECT current_setting(%s, true)", (name,)
                ).fetchone()
                out[name] = str(row[0]) if row and row[0] is not None else "?"
            return out

    def checkpoint(self) -> None:
        """Start each measured phase from the same WAL state (full-page images follow it)."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")


@contextlib.contextmanager
def cluster(external_url: str | None = None, build: str = "embedded") -> Iterator[Cluster]:
    """BENCH_DATABASE_URL when given (a superuser URL); else a throwaway cluster of the build
    BENCH_PG names with its default settings (fsync, synchronous_commit and full_page_writes on):
    `embedded` (pgserver's PostgreSQL 16, no JIT) or `distribution` (the machine's packaged
    PostgreSQL, e.g. Debian's 15, JIT on)."""
    if external_url:
        yield Cluster(external_url, None)
        return
    if build == "distribution":
        from tests import pgdist

        with pgdist.cluster(durable=True) as url:
            yield Cluster(url, None, "distribution")
        return
    if build != "embedded":
        raise ValueError(f"BENCH_PG must be embedded or distribution, not {build!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    root = Path(tempfile.mkdtemp(prefix="dispatch-bench-pg-"))
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    try:
        yield Cluster(server.get_uri(), root / "pg", "embedded")
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Counters:
    commits: int
    wal_lsn: str
    wal_fpi: int
    next_xid: int


@dataclass(frozen=True)
class Cost:
    commits: int
    wal_bytes: int
    wal_fpi: int
    xids: int  # write transactions, cluster-wide (transaction ids assigned)
    wal_span: tuple[str, str] = ("", "")  # the WAL positions it was read between (bench.wal)

    def per(self, n: int) -> tuple[float, float]:
        """(commits, WAL bytes) per task."""
        return (self.commits / n, self.wal_bytes / n) if n else (0.0, 0.0)


def read_counters(admin_url: str, dbname: str) -> Counters:
    """Read from the `postgres` database, so the reading itself is not counted in `dbname`."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = %s),"
            " pg_current_wal_lsn()::text, (SELECT wal_fpi FROM pg_stat_wal),"
            " pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            (dbname,),
        ).fetchone()
        assert row is not None
        return Counters(int(row[0] or 0), str(row[1]), int(row[2] or 0), int(row[3]))


def cost_between(admin_url: str, before: Counters, after: Counters) -> Cost:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint",
            (after.wal_lsn, before.wal_lsn),
        ).fetchone()
        assert row is not None
        wal = int(row[0])
    return Cost(
        after.commits - before.commits, wal, after.wal_fpi - before.wal_fpi,
        after.next_xid - before.next_xid, (before.wal_lsn, after.wal_lsn),
    )


def prepare_dispatch(url: str) -> None:
    """Migrate a fresh Dispatch database."""
    from dispatch.migrate import migrate

    migrate(url)
