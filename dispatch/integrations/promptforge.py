"""PromptForge: personas and the capabilities their prompts declare."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec

from dispatch.integrations import DEFAULT_TIMEOUT, get_json


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    slug: str
    type: str | None = None
    id: object = None
    name: str | None = None
    latest_version: int | str | None = None
    version: int | str | None = None


class Section(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    content: str = ""


class Content(msgspec.Struct, frozen=True, kw_only=True):
    sections: list[Section] = msgspec.field(default_factory=list)


class PromptVersion(msgspec.Struct, frozen=True, kw_only=True):
    content: Content


def parse_capabilities(text: str) -> list[str]:
    """The `capabilities` section: comma separated, trimmed, lower-cased, de-duplicated."""
    caps = {part.strip().lower() for part in text.split(",")}
    return sorted(c for c in caps if c)


class PromptForgeClient:
    """GET /api/v1/prompts, then each persona's version: persona slug -> capabilities."""

    def __init__(self, url: str, *, timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def personas(self) -> dict[str, list[str]]:
        """Every persona (by slug, the agent id) with its capabilities."""
        prompts = msgspec.convert(await self._get("/api/v1/prompts"), list[Prompt])
        personas = [p for p in prompts if (p.type or "").lower() == "persona"]
        versions = await asyncio.gather(*(self._capabilities(p) for p in personas))
        return {p.slug: caps for p, caps in zip(personas, versions, strict=True)}

    async def _capabilities(self, prompt: Prompt) -> list[str]:
        v = prompt.latest_version if prompt.latest_version is not None else prompt.version
        raw = await self._get(f"/api/v1/prompts/{prompt.slug}/versions/{v or 'latest'}")
        version = msgspec.convert(raw, PromptVersion)
        for section in version.content.sections:
            if section.id.strip().lower() == "capabilities":
                return parse_capabilities(section.content)
        return []

    async def _get(self, path: str) -> Any:
        return await get_json(self._http, "promptforge", path)
