"""Fixtures of the chaos suite: a Postgres of the test's own that it may stop and start again, on
the build the suite runs on (embedded pgserver, or the distribution's with
DISPATCH_TEST_PG=distribution)."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.natsfix import nats_server

__all__ = ["nats_server"]


class Restartable(Protocol):
    url: str  # a superuser URL to its `postgres` database

    def stop(self) -> None: ...

    def start(self) -> None: ...


@dataclass
class _Embedded:
    """A pgserver cluster: stop is `pg_ctl stop -m fast`, start brings it back as pgserver does."""

    pgdata: Path

    def __post_init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        self.server = pgserver.get_server(self.pgdata, cleanup_mode="delete")
        self.url = self.server.get_uri()

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()


@pytest.fixture
def restartable_postgres() -> Iterator[Restartable]:
    if os.environ.get("DISPATCH_TEST_DATABASE_URL"):
        pytest.skip("stopping Postgres needs a cluster of the test's own, not an external URL")
    if os.environ.get("DISPATCH_TEST_PG") == "distribution":
        from tests import pgdist

        with pgdist.running() as cluster:
            yield cluster
        return
    embedded = _Embedded(Path(tempfile.mkdtemp(prefix="dispatch-chaos-pg-")) / "pg")
    try:
        yield embedded
    finally:
        embedded.server.cleanup()
