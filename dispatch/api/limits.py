"""Flow-control administration (admin): concurrency caps, rate-limit buckets and tenant weights.
Each is a plain read or write of one row, so the handlers call the store."""

from typing import Annotated

from litestar import Controller, delete, get, put
from litestar.params import JSONBody, PathParameter
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT

from dispatch.api.auth import ADMIN_SECURITY, require_admin
from dispatch.api.deps import CallerDep
from dispatch.api.errors import ERRORS
from dispatch.errors import NotFound
from dispatch.models import ConcurrencyLimit, RateLimit, TenantWeight
from dispatch.wire import (
    ConcurrencyLimitBody,
    RateLimitBody,
    TenantWeightBody,
    flow_key,
    rate_bucket,
)

KeyPath = Annotated[str, PathParameter(description="The key: 1-256 characters.")]
TenantPath = Annotated[
    str, PathParameter(description="The tenant: a task's owner, else its requester.")
]


class LimitController(Controller):
    path = "/limits"
    tags = ["flow control"]  # noqa: RUF012 - Litestar's own class attribute
    guards = [require_admin]  # noqa: RUF012
    security = ADMIN_SECURITY

    @get("/concurrency", responses=ERRORS, summary="Every concurrency key's cap and active tasks")
    async def concurrency_list(self, caller: CallerDep) -> list[ConcurrencyLimit]:
        return await caller.broker.flow.concurrency_limits()

    @get("/concurrency/{key:str}", responses=ERRORS, summary="A concurrency key's cap")
    async def concurrency_get(self, key: KeyPath, caller: CallerDep) -> ConcurrencyLimit:
        found = await caller.broker.flow.concurrency_limits(flow_key(key, "key"))
        if not found:
            raise NotFound(f"concurrency key {key} has no limit")
        return found[0]

    @put(
        "/concurrency/{key:str}", responses=ERRORS, status_code=HTTP_200_OK,
        summary="Cap the tasks of a concurrency key assigned or running at once",
    )
    async def concurrency_put(
        self, key: KeyPath, caller: CallerDep, data: JSONBody[ConcurrencyLimitBody]
    ) -> ConcurrencyLimit:
        return await caller.broker.flow.concurrency_limit_set(flow_key(key, "key"), data.max_active)

    @delete(
        "/concurrency/{key:str}", responses=ERRORS, status_code=HTTP_204_NO_CONTENT,
        summary="Remove a concurrency key's cap",
    )
    async def concurrency_delete(self, key: KeyPath, caller: CallerDep) -> None:
        if not await caller.broker.flow.concurrency_limit_delete(flow_key(key, "key")):
            raise NotFound(f"concurrency key {key} has no limit")

    @get("/rate", responses=ERRORS, summary="Every rate key's bucket and the tokens left")
    async def rate_list(self, caller: CallerDep) -> list[RateLimit]:
        return await caller.broker.flow.rate_limits()

    @get("/rate/{key:str}", responses=ERRORS, summary="A rate key's bucket and the tokens left")
    async def rate_get(self, key: KeyPath, caller: CallerDep) -> RateLimit:
        found = await caller.broker.flow.rate_limits(flow_key(key, "key"))
        if not found:
            raise NotFound(f"rate key {key} has no limit")
        return found[0]

    @put(
        "/rate/{key:str}", responses=ERRORS, status_code=HTTP_200_OK,
        summary="Set a rate key's token bucket",
    )
    async def rate_put(
        self, key: KeyPath, caller: CallerDep, data: JSONBody[RateLimitBody]
    ) -> RateLimit:
        return await caller.broker.flow.rate_limit_set(flow_key(key, "key"), *rate_bucket(data))

    @delete(
        "/rate/{key:str}", responses=ERRORS, status_code=HTTP_204_NO_CONTENT,
        summary="Remove a rate key's bucket",
    )
    async def rate_delete(self, key: KeyPath, caller: CallerDep) -> None:
        if not await caller.broker.flow.rate_limit_delete(flow_key(key, "key")):
            raise NotFound(f"rate key {key} has no limit")


class TenantController(Controller):
    path = "/tenants"
    tags = ["flow control"]  # noqa: RUF012 - Litestar's own class attribute
    guards = [require_admin]  # noqa: RUF012
    security = ADMIN_SECURITY

    @get("/{tenant:str}/weight", responses=ERRORS, summary="A tenant's fair-share weight")
    async def weight_get(self, tenant: TenantPath, caller: CallerDep) -> TenantWeight:
        return await caller.broker.flow.tenant_weight(flow_key(tenant, "tenant"))

    @put(
        "/{tenant:str}/weight", responses=ERRORS, status_code=HTTP_200_OK,
        summary="Set a tenant's fair-share weight (default 1)",
    )
    async def weight_put(
        self, tenant: TenantPath, caller: CallerDep, data: JSONBody[TenantWeightBody]
    ) -> TenantWeight:
        return await caller.broker.flow.tenant_weight_set(flow_key(tenant, "tenant"), data.weight)

    @delete(
        "/{tenant:str}/weight", responses=ERRORS, status_code=HTTP_204_NO_CONTENT,
        summary="Set a tenant's weight back to the default",
    )
    async def weight_delete(self, tenant: TenantPath, caller: CallerDep) -> None:
        if not await caller.broker.flow.tenant_weight_delete(flow_key(tenant, "tenant")):
            raise NotFound(f"tenant {tenant} has no weight set")
