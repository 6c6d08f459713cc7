"""/health's own probe of the database tells a database that is full from one that is down."""

from __future__ import annotations

import uuid

import psycopg

from dispatch.db import HealthProbe
from tests.serve import free_port


async def test_the_probe_tells_full_from_down(db_url: str, pg_server: str) -> None:
    assert await HealthProbe(db_url).status() == "ok"
    dead = HealthProbe(f"postgresql://nobody@127.0.0.1:{free_port()}/x", timeout=1)
    assert await dead.status() == "down"
    role = f"full_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        # No connection slot left for this role: the refusal a full server gives (53300).
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
        try:
            full = HealthProbe(psycopg.conninfo.make_conninfo(db_url, user=role))
            assert await full.status() == "too many clients"
            assert not await full.check()
        finally:
            admin.execute(f"DROP ROLE {role}")
