"""Warren: agent availability (state, policy) and waking sleeping agents."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from dispatch.integrations import DEFAULT_TIMEOUT, get_json

WARREN_STATES = frozenset({"ready", "sleeping", "busy", "degraded", "stopped"})


class WarrenAgent(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    state: str
    policy: str | None = None


class WarrenClient:
    """GET /admin/agents, POST /admin/agents/{id}/wake."""

    def __init__(
        self, url: str, token: str = "", *, timeout: httpx.Timeout = DEFAULT_TIMEOUT
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def agents(self) -> list[WarrenAgent]:
        return msgspec.convert(await self._get("/admin/agents"), list[WarrenAgent])

    async def wake(self, agent_id: str) -> None:
        r = await self._http.post(f"/admin/agents/{agent_id}/wake")
        r.raise_for_status()

    async def _get(self, path: str) -> Any:
        return await get_json(self._http, "warren", path)


def agent_status(state: str) -> str:
    """Warren's state as a directory status; anything unexpected is `unknown` (not eligible)."""
    s = state.strip().lower()
    return s if s in WARREN_STATES else "unknown"
