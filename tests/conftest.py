"""Shared fixtures: a real Postgres, a migrated template, and a fresh database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.db import CONNECT_KWARGS, create_pool
from dispatch.settings import AssignmentSettings
from dispatch.store import Store
from tests import pg


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with pg.server_url() as url:
        pg.create_template(url)
        yield url


@pytest.fixture
def db_url(pg_server: str) -> Iterator[str]:
    """A migrated database of this test's own."""
    url = pg.clone_database(pg_server)
    yield url
    pg.drop_database(pg_server, url)


@pytest.fixture
def sql(db_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A plain autocommit connection for raw SQL, as a DBA in psql would use it."""
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        yield conn


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p = create_pool(db_url, min_size=1, max_size=10)
    await p.open(wait=True)
    yield p
    await p.close()


@pytest.fixture
def assignment_settings() -> AssignmentSettings:
    """The defaults `dispatch serve` runs with; a test that needs others overrides this."""
    return AssignmentSettings()


@pytest.fixture
async def broker(pool: AsyncConnectionPool[Any], assignment_settings: AssignmentSettings) -> Broker:
    b = Broker(Store(pool), assignment=assignment_settings)
    await b.apply_config()
    return b
