"""The API's docs work without internet: the Swagger UI page loads its files from this server."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import httpx


async def test_the_swagger_page_loads_only_files_this_server_serves(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/schema/swagger")
    assert r.status_code == 200
    page = r.text
    refs = re.findall(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["']([^"']+)["']""", page)
    assert len(refs) >= 4, page  # the bundle, the preset, the stylesheet, the icon
    for ref in refs:
        assert not urlsplit(ref).netloc, f"{ref} is on another host"
    assert "cdn." not in page and "unpkg" not in page
    kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
    for ref in refs:
        asset = await client.get(ref)
        assert asset.status_code == 200, ref
        kind = next(v for k, v in kinds.items() if ref.endswith(k))
        assert kind in asset.headers["content-type"], (ref, asset.headers["content-type"])
    bundle = await client.get("/schema/assets/swagger-ui-bundle.js")
    assert len(bundle.content) > 500_000  # the real Swagger UI, not a stub


async def test_the_root_points_at_docs_that_work_offline(client: httpx.AsyncClient) -> None:
    r = await client.get("/", headers={"Accept": "application/json"})
    assert r.json()["docs"] == "/schema/swagger"
    assert (await client.get(r.json()["docs"])).status_code == 200
