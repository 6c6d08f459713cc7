"""Flow control's administration: concurrency caps, rate buckets, tenant weights."""

from __future__ import annotations

from datetime import datetime

from dispatch.models import ConcurrencyLimit, RateLimit, TenantWeight
from dispatch.store.base import Conn, Queries, convert


class Flow(Queries):
    async def concurrency_limit_set(
        self, key: str, max_active: int, *, conn: Conn | None = None
    ) -> ConcurrencyLimit:
        async with self._borrow_transaction(conn) as c:  # a delete cannot come in between
            await self._rows("SELECT dispatch.concurrency_limit_set(%s, %s)", (key, max_active), c)
            return (await self.concurrency_limits(key, conn=c))[0]

    async def concurrency_limits(
        self, key: str | None = None, *, conn: Conn | None = None
    ) -> list[ConcurrencyLimit]:
        """Every concurrency limit, or the one of `key`."""
        rows = await self._rows(
            "SELECT * FROM dispatch.concurrency_limit_list()"
            " WHERE %(key)s::text IS NULL OR key = %(key)s", {"key": key}, conn,
        )
        return [convert(r, ConcurrencyLimit) for r in rows]

    async def concurrency_limit_delete(self, key: str, *, conn: Conn | None = None) -> bool:
        rows = await self._rows(
            "SELECT dispatch.concurrency_limit_delete(%s) AS gone", (key,), conn
        )
        return bool(rows[0]["gone"])

    async def rate_limit_set(
        self, key: str, capacity: float, refill_per_second: float, *, conn: Conn | None = None
    ) -> RateLimit:
        async with self._borrow_transaction(conn) as c:  # a delete cannot come in between
            await self._rows("SELECT dispatch.rate_limit_set(%s, %s, %s)",
                             (key, capacity, refill_per_second), c)
            return (await self.rate_limits(key, conn=c))[0]

    async def rate_limits(
        self, key: str | None = None, *, now: datetime | None = None, conn: Conn | None = None
    ) -> list[RateLimit]:
        """Every bucket with the tokens it holds now, or the one of `key`."""
        rows = await self._rows(
            "SELECT * FROM dispatch.rate_limit_list(coalesce(%(now)s::timestamptz, now()))"
            " WHERE %(key)s::text IS NULL OR key = %(key)s", {"key": key, "now": now}, conn,
        )
        return [convert(r, RateLimit) for r in rows]

    async def rate_limit_delete(self, key: str, *, conn: Conn | None = None) -> bool:
        rows = await self._rows("SELECT dispatch.rate_limit_delete(%s) AS gone", (key,), conn)
        return bool(rows[0]["gone"])

    async def tenant_weight_set(
        self, tenant: str, weight: float, *, conn: Conn | None = None
    ) -> TenantWeight:
        rows = await self._rows(
            "SELECT tenant, weight FROM dispatch.tenant_weight_set(%s, %s)", (tenant, weight),
            conn,
        )
        return convert(rows[0], TenantWeight)

    async def tenant_weight(self, tenant: str, *, conn: Conn | None = None) -> TenantWeight:
        """The tenant's weight; weight 1 and `default` when none was set."""
        rows = await self._rows(
            "SELECT %(t)s AS tenant, coalesce(w.weight, 1) AS weight, w.tenant IS NULL AS default"
            " FROM (SELECT 1) one LEFT JOIN dispatch.tenant_weights w ON w.tenant = %(t)s",
            {"t": tenant}, conn,
        )
        return convert(rows[0], TenantWeight)

    async def tenant_weight_delete(self, tenant: str, *, conn: Conn | None = None) -> bool:
        rows = await self._rows(
            "SELECT dispatch.tenant_weight_delete(%s) AS gone", (tenant,), conn
        )
        return bool(rows[0]["gone"])
