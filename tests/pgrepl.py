"""A primary and its asynchronous streaming hot standby, for failover tests on the distribution's
PostgreSQL (tests/pgdist.py, tests/pgstandby.py), with a migrated database. The standby can be
left behind on purpose: freezing the primary's walsender (SIGSTOP) stops the WAL on its way while
the primary goes on committing; crashing the primary then loses exactly what it wrote meanwhile,
as an asynchronous standby a few seconds behind loses it in production."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import psycopg

from dispatch.db import CONNECT_KWARGS
from dispatch.migrate import migrate
from tests import pgdist
from tests.pgstandby import Standby, multi_host_url


def _one(url: str, query: str) -> object:
    with psycopg.connect(url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _flushed_lsn(url: str) -> str:
    """A WAL position past every commit the primary has answered so far, flushed there, which the
    standby's replay reaches once it has them all. The test clusters commit with synchronous_commit
    off, so a commit already answered may still sit in the WAL buffers (past pg_current_wal_lsn()
    and the flush position): a transaction that writes WAL and commits synchronously flushes the
    WAL up to its own commit record, past every commit before it. (One that only took a
    transaction id would write no WAL of its own, and Postgres commits that one asynchronously.)"""
    with (psycopg.connect(url, **CONNECT_KWARGS) as conn,  # type: ignore[arg-type]
          conn.transaction()):
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'dispatch-tests', 'flush')")
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


class Pair:
    """A running primary and its streaming standby; `url` names both (libpq takes the writable
    one)."""

    def __init__(self, primary: pgdist.Cluster, standby: Standby, dbname: str) -> None:
        self.primary = primary
        self.standby = standby
        self.dbname = dbname
        self.url = multi_host_url(primary, standby, dbname)
        self.primary_url = primary.url.rsplit("/", 1)[0] + f"/{dbname}"
        self.standby_url = standby.url(dbname)

    def walsender(self) -> int:
        """The pid of the primary's walsender that streams to the standby."""
        pid = _one(self.primary.url,
                   "SELECT pid FROM pg_stat_replication WHERE state = 'streaming'")
        assert isinstance(pid, int)
        return pid

    def wait_streaming(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while _one(self.primary.url, "SELECT count(*) FROM pg_stat_replication"
                                     " WHERE state = 'streaming'") != 1:
            assert time.monotonic() < deadline, "the standby never started streaming"
            time.sleep(0.05)

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Until the standby has replayed everything the primary has committed so far."""
        target = _flushed_lsn(self.primary.url)
        deadline = time.monotonic() + timeout
        while not _one(self.standby_url,
                       f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"):
            assert time.monotonic() < deadline, "the standby never caught up"
            time.sleep(0.05)

    def behind(self) -> bool:
        """Whether the primary has committed WAL the standby has not replayed."""
        written = _flushed_lsn(self.primary.url)
        return not _one(self.standby_url, f"SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn")

    @contextlib.contextmanager
    def frozen_walsender(self) -> Iterator[int]:
        """SIGSTOP the walsender: the primary commits, the standby gets nothing. SIGCONT on the way
        out, unless crash_primary() killed it."""
        pid = self.walsender()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def crash_primary(self) -> None:
        """Stop the primary as a crash does (pg_ctl stop -m immediate), sending nothing more to the
        standby. A stopped walsender would hold the shutdown until the postmaster's SIGKILL: it is
        killed once the postmaster is shutting down (before that, its death would be a crash to
        recover from, and the standby might reconnect and catch up)."""
        frozen = None
        with contextlib.suppress(psycopg.Error, AssertionError):
            frozen = self.walsender()
        postmaster = int((self.primary.data / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGQUIT)  # what pg_ctl stop -m immediate sends
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
        self.primary.stop("immediate")  # waits until it is gone

    def promote(self) -> None:
        self.standby.promote()


@contextlib.contextmanager
def async_pair(dbname: str = "dispatch", settings: dict[str, str] | None = None) -> Iterator[Pair]:
    """A primary with a migrated database `dbname` and an asynchronous streaming hot standby of it,
    streaming; both stopped and deleted at the end."""
    with pgdist.running(settings=settings) as primary:
        with psycopg.connect(primary.url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            conn.execute(f"CREATE DATABASE {dbname}")
        migrate(primary.url.rsplit("/", 1)[0] + f"/{dbname}")
        standby = Standby(primary)
        standby.start()
        try:
            pair = Pair(primary, standby, dbname)
            pair.wait_streaming()
            yield pair
        finally:
            standby.stop("immediate")
