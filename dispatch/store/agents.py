"""Agents and their tokens: registration, heartbeats, drain and stop, the directory sync."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from psycopg.types.json import Jsonb

from dispatch.errors import NotFound
from dispatch.models import Agent, AgentStatus
from dispatch.store.base import Conn, Queries, convert

# An agent as the API shows it: its own cap or the default, and its active tasks.
_COLUMNS = """
a.agent_id, a.capabilities, a.owner, a.status, a.policy,
coalesce(a.max_concurrent, c.max_concurrent_per_agent) AS max_concurrent,
dispatch.agent_active(a.agent_id) AS active_tasks, a.drained, a.source, a.last_assigned_at,
a.last_seen_at, a.updated_at
"""


class Agents(Queries):
    async def _agent(self, source: str, params: Sequence[object], conn: Conn | None) -> Agent:
        query = f"SELECT {_COLUMNS} FROM {source} a CROSS JOIN dispatch.config c"
        rows = await self._rows(query, params, conn)
        return convert(rows[0], Agent)

    async def upsert(
        self,
        agent_id: str,
        *,
        capabilities: Sequence[str] | None = None,
        owner: str | None = None,
        max_concurrent: int | None = None,
        status: AgentStatus | None = None,
        policy: str | None = None,
        source: str = "registry",
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Agent:
        """Register an agent or update it; unset fields keep their current value."""
        return await self._agent(
            "dispatch.agent_upsert(%s, %s, %s, %s, %s, %s, %s, coalesce(%s, now()))",
            (
                agent_id,
                list(capabilities) if capabilities is not None else None,
                owner,
                max_concurrent,
                str(status) if status else None,
                policy,
                source,
                now,
            ),
            conn,
        )

    async def heartbeat(
        self,
        agent_id: str,
        status: AgentStatus | None = None,
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Agent:
        return await self._agent(
            "dispatch.agent_heartbeat(%s, %s, coalesce(%s, now()))",
            (agent_id, str(status) if status else None, now),
            conn,
        )

    async def drain(
        self,
        agent_id: str,
        drained: bool = True,
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Agent:
        return await self._agent(
            "dispatch.agent_drain(%s, %s, coalesce(%s, now()))", (agent_id, drained, now), conn
        )

    async def stop(
        self, agent_id: str, *, now: datetime | None = None, conn: Conn | None = None
    ) -> int:
        """The agent stopped: its active tasks go back to pending, no attempt counted. Returns how
        many."""
        return await self._count(
            "SELECT dispatch.agent_stop(%s, coalesce(%s, now())) AS n", (agent_id, now), conn
        )

    async def delete(self, agent_id: str, *, conn: Conn | None = None) -> None:
        """Remove the agent and its tokens; Conflict while it holds active tasks."""
        await self._rows("SELECT dispatch.agent_delete(%s)", (agent_id,), conn)

    async def get(self, agent_id: str, *, conn: Conn | None = None) -> Agent:
        """The agent; NotFound when there is none."""
        rows = await self._rows(
            f"SELECT {_COLUMNS} FROM dispatch.agents a CROSS JOIN dispatch.config c"
            " WHERE a.agent_id = %s",
            (agent_id,),
            conn,
        )
        if not rows:
            raise NotFound(f"agent {agent_id} not found")
        return convert(rows[0], Agent)

    async def all(self, *, conn: Conn | None = None) -> list[Agent]:
        rows = await self._rows(
            f"SELECT {_COLUMNS} FROM dispatch.agents a CROSS JOIN dispatch.config c"
            " ORDER BY a.agent_id",
            (),
            conn,
        )
        return [convert(r, Agent) for r in rows]

    async def sync(
        self,
        entries: Sequence[Mapping[str, object]],
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> int:
        return await self._count(
            "SELECT dispatch.agent_sync(%s, coalesce(%s, now())) AS n",
            (Jsonb(list(entries)), now),
            conn,
        )

    async def owners_sync(
        self,
        pairs: Sequence[Mapping[str, str]],
        source: str,
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> int:
        return await self._count(
            "SELECT dispatch.agent_owners_sync(%s, %s, coalesce(%s, now())) AS n",
            (Jsonb(list(pairs)), source, now),
            conn,
        )

    async def mark_stale(
        self, stale_ms: int, *, now: datetime | None = None, conn: Conn | None = None
    ) -> int:
        """Agents not refreshed for stale_ms become unknown; returns how many."""
        return await self._count(
            "SELECT dispatch.agent_mark_stale(%s, coalesce(%s, now())) AS n", (stale_ms, now), conn
        )

    # -- tokens ----------------------------------------------------------------------------------

    async def token_issue(self, agent_id: str, *, conn: Conn | None = None) -> str:
        """A new token for agent_id; only its hash is stored, so this is the one time it is seen."""
        rows = await self._rows(
            "SELECT dispatch.agent_token_issue(%s) AS token", (agent_id,), conn
        )
        token: str = rows[0]["token"]
        return token

    async def token_agent(self, token: str, *, conn: Conn | None = None) -> str | None:
        """The identity the token is good for; None when it is unknown or revoked."""
        rows = await self._rows("SELECT dispatch.agent_token_agent(%s) AS agent_id", (token,), conn)
        agent_id: str | None = rows[0]["agent_id"]
        return agent_id

    async def token_revoke(self, agent_id: str, *, conn: Conn | None = None) -> int:
        """Revoke every token of agent_id; returns how many there were."""
        return await self._count(
            "SELECT dispatch.agent_token_revoke(%s) AS n", (agent_id,), conn
        )
