"""A streaming hot standby of a throwaway distribution cluster (tests/pgdist.py): made with
pg_basebackup -R, on a port of its own, with the primary's settings (a standby needs
max_connections and the like at least as high). It can pause and resume replay, stop, start and
be promoted."""

from __future__ import annotations

import subprocess

import psycopg
from psycopg.conninfo import make_conninfo

from dispatch.db import CONNECT_KWARGS
from tests import pgdist
from tests.serve import free_port


def _port(cluster: pgdist.Cluster) -> int:
    return int(cluster.url.rsplit(":", 1)[1].split("/", 1)[0])


class Standby:
    def __init__(self, primary: pgdist.Cluster) -> None:
        self.bin = primary.bin
        self.data = primary.root / "standby"
        self.log = primary.root / "standby.log"
        self.port = free_port()
        primary_port = _port(primary)
        subprocess.run(
            pgdist._as_owner([str(self.bin / "pg_basebackup"), "-D", str(self.data), "-R",
                              "-X", "stream", "-c", "fast", "-h", "127.0.0.1",
                              "-p", str(primary_port), "-U", "postgres"]),
            check=True, capture_output=True,
        )
        self.flags = primary.flags.replace(f"-c port={primary_port} ", f"-c port={self.port} ")
        assert self.flags != primary.flags

    def url(self, dbname: str = "postgres") -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            pgdist._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), *args]),
            check=check, capture_output=True,
        )

    def start(self) -> None:
        self._ctl("-w", "-t", "60", "-l", str(self.log), "-o", self.flags, "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-w", "-m", mode, "stop", check=False)

    def promote(self) -> None:
        self._ctl("-w", "-t", "60", "promote")

    def replay(self, dbname: str, paused: bool) -> None:
        with psycopg.connect(self.url(dbname), **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            conn.execute(f"SELECT pg_wal_replay_{'pause' if paused else 'resume'}()")


def multi_host_url(primary: pgdist.Cluster, standby: Standby, dbname: str) -> str:
    """One URL naming both servers: libpq connects to whichever accepts writes."""
    return (f"postgresql://postgres@127.0.0.1:{_port(primary)},127.0.0.1:{standby.port}"
            f"/{dbname}?target_session_attrs=read-write")
