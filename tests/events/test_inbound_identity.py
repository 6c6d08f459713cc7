"""NATS inbound under the identity rules: an agent announcing itself never sets its own owner
(as over REST), and ids with a `.` or `..` segment are refused."""

from __future__ import annotations

from typing import Any

import psycopg
from nats.aio.client import Client

from dispatch.broker import Broker
from dispatch.events.inbound import NatsInbound
from tests.events.test_inbound import ask

Sql = psycopg.Connection[dict[str, Any]]


def agents(sql: Sql) -> list[dict[str, Any]]:
    return sql.execute("SELECT * FROM dispatch.agents ORDER BY agent_id").fetchall()


async def test_an_announcement_cannot_set_the_agents_owner(
    inbound: NatsInbound, broker: Broker, client: Client, sql: Sql
) -> None:
    reply = await ask(client, "swarm.agent.worker-1.ready", {"owner": "alice"})
    assert reply["status"] == 403 and reply["detail"] == {"field": "owner"}
    assert agents(sql) == []  # not registered either

    agent = await ask(client, "swarm.agent.worker-1.ready", {"capabilities": ["code"]})
    assert agent["agent_id"] == "worker-1" and agent["owner"] is None
    before = agents(sql)
    for state in ("ready", "busy", "stopped"):
        reply = await ask(
            client, f"swarm.agent.worker-1.{state}", {"owner": "alice", "capabilities": ["x"]}
        )
        assert reply["status"] == 403
    assert agents(sql) == before

    # The admin's way (REST, or the directory) is untouched; announcements then keep it.
    await broker.agents.upsert("worker-1", owner="alice")
    agent = await ask(client, "swarm.agent.worker-1.busy", {"capabilities": ["code"]})
    assert agent["owner"] == "alice" and agent["status"] == "busy"


async def test_dot_segment_requesters_are_refused_on_nats(
    inbound: NatsInbound, client: Client, sql: Sql
) -> None:
    # (An agent subject cannot carry such an id: its dots would make empty subject tokens.)
    for requester in (".", "..", "a/..", "../b"):
        reply = await ask(client, "swarm.task.request", {"title": "t", "requester": requester})
        assert reply["status"] == 400, (requester, reply)
    assert agents(sql) == []
    assert sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone() == {"n": 0}
