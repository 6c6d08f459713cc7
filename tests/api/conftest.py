"""An in-process API app over a real broker on this test's own database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from dispatch.api.app import create_app
from dispatch.broker import Broker
from dispatch.settings import ServerSettings, Settings

ADMIN_TOKEN = "admin-secret"
MAX_BODY = 64 * 1024


def agent(agent_id: str = "alice") -> dict[str, str]:
    return {"X-Agent-ID": agent_id}


def admin(agent_id: str = "ops") -> dict[str, str]:
    return {"X-Agent-ID": agent_id, "Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def app(broker: Broker) -> Litestar:
    settings = Settings(server=ServerSettings(admin_token=ADMIN_TOKEN, max_body_bytes=MAX_BODY))
    return create_app(settings, broker)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with AsyncTestClient(app=app) as c:
        yield c


async def register(client: httpx.AsyncClient, *agent_ids: str, **body: Any) -> None:
    """Agents register themselves before they claim (a claim is not a registration)."""
    for agent_id in agent_ids:
        r = await client.put(f"/api/v1/agents/{agent_id}", json=body, headers=agent(agent_id))
        assert r.status_code == 200, r.text


def counts(sql: psycopg.Connection[dict[str, Any]]) -> tuple[int, int, int]:
    """Rows of tasks, task_events and agents: a bad request must change none of them."""
    row = sql.execute(
        "SELECT (SELECT count(*) FROM dispatch.tasks) AS t,"
        " (SELECT count(*) FROM dispatch.task_events) AS e,"
        " (SELECT count(*) FROM dispatch.agents) AS a"
    ).fetchone()
    assert row is not None
    return int(row["t"]), int(row["e"]), int(row["a"])
