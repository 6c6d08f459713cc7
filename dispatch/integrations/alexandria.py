"""Alexandria: device ownership, for the owner filter."""

from __future__ import annotations

import httpx
import msgspec

from dispatch.integrations import DEFAULT_TIMEOUT, IntegrationError


class Device(msgspec.Struct, frozen=True, kw_only=True):
    id: object = None
    name: str | None = None
    device_type: str | None = None
    owner_id: str | None = None
    identifier: str | None = None


class Devices(msgspec.Struct, frozen=True, kw_only=True):
    data: list[Device]


class AlexandriaClient:
    """GET /api/v1/devices (as X-Agent-ID: dispatch)."""

    def __init__(self, url: str, *, timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers={"X-Agent-ID": "dispatch"}, timeout=timeout
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def ownership(self) -> list[dict[str, str]]:
        """{agent_id, owner} pairs: an agent belongs to O when a device of O has the agent's id as
        its name or identifier."""
        r = await self._http.get("/api/v1/devices")
        r.raise_for_status()
        try:
            devices = msgspec.json.decode(r.content, type=Devices).data
        except msgspec.DecodeError as exc:
            raise IntegrationError("alexandria", f"unexpected devices response: {exc}") from exc
        pairs = set()
        for d in devices:
            if not d.owner_id:
                continue
            for agent_id in (d.name, d.identifier):
                if agent_id:
                    pairs.add((agent_id, d.owner_id))
        return [{"agent_id": a, "owner": o} for a, o in sorted(pairs)]
