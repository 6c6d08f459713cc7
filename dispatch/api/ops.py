"""The ops app on the metrics port: GET /health and GET /metrics."""

from __future__ import annotations

from typing import Protocol

from litestar import Litestar, Response, get


class HealthSource(Protocol):
    async def health(self) -> tuple[bool, dict[str, object]]: ...


def create_ops_app(service: HealthSource) -> Litestar:
    @get("/health", sync_to_thread=False)
    async def health() -> Response[dict[str, object]]:
        ok, report = await service.health()
        return Response(report, status_code=200 if ok else 503)

    return Litestar(route_handlers=[health], openapi_config=None)
