"""Agent directory endpoints and the admin statistics."""

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.params import JSONBody, PathParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from dispatch.api.auth import ADMIN_SECURITY, Authenticator, require_admin
from dispatch.api.deps import Caller, CallerDep
from dispatch.api.errors import ERRORS
from dispatch.errors import Forbidden, InvalidInput
from dispatch.models import Agent, Stats
from dispatch.wire import AGENT_ID_RE, AgentRegistration, Heartbeat

AgentIdPath = Annotated[
    str,
    PathParameter(
        description="The agent id: 1-128 of [A-Za-z0-9._:@/-], no /-separated segment . or ..",
    ),
]


class IssuedToken(msgspec.Struct, frozen=True, kw_only=True):
    """A new agent token: shown this once (only its hash is stored)."""

    agent_id: str
    token: str


def checked_agent_id(raw: str) -> str:
    if not AGENT_ID_RE.match(raw):
        raise InvalidInput(
            "agent id must be 1 to 128 characters of [A-Za-z0-9._:@/-], no segment . or ..",
            field="agent_id",
        )
    return raw


def require_self_or_admin(agent_id: str, caller: Caller) -> None:
    if caller.agent_id != agent_id and not caller.admin:
        raise Forbidden(
            f"{caller.agent_id} may not act for agent {agent_id} (only itself or an admin)"
        )


class AgentController(Controller):
    path = "/agents"
    tags = ["agents"]  # noqa: RUF012 - Litestar's own class attribute

    @put(
        "/{agent_id:str}",
        responses=ERRORS,
        summary="Register or update an agent (itself, or an admin)",
    )
    async def register(
        self,
        agent_id: AgentIdPath,
        caller: CallerDep,
        data: JSONBody[AgentRegistration | None] = None,
    ) -> Agent:
        agent_id = checked_agent_id(agent_id)
        require_self_or_admin(agent_id, caller)
        body = data or AgentRegistration()
        if body.owner is not None and not caller.admin:
            # Ownership decides whose tasks an agent is given: an agent naming its own owner
            # could take anyone's work. Only an admin or the directory (Alexandria) sets it.
            raise Forbidden(
                "owner is set by an admin or the directory (Alexandria), not by the agent"
            )
        return await caller.broker.agents.upsert(
            agent_id,
            capabilities=body.capabilities,
            owner=body.owner,
            max_concurrent=body.max_concurrent,
            status=body.status,
        )

    @get(
        "/",
        responses=ERRORS,
        summary="Admin: the capability map",
        guards=[require_admin],
        security=ADMIN_SECURITY,
    )
    async def list_agents(self, caller: CallerDep) -> list[Agent]:
        return await caller.broker.agents.all()

    @delete(
        "/{agent_id:str}",
        responses=ERRORS,
        status_code=HTTP_204_NO_CONTENT,
        summary="Remove an agent with no active tasks (409 naming them otherwise), its tokens too",
    )
    async def delete_agent(
        self, agent_id: AgentIdPath, caller: CallerDep, request: Request[Any, Any, Any]
    ) -> None:
        agent_id = checked_agent_id(agent_id)
        require_self_or_admin(agent_id, caller)
        await caller.broker.agents.delete(agent_id)
        auth: Authenticator = request.app.state.auth
        auth.forget(agent_id)

    @post(
        "/{agent_id:str}/heartbeat",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="An agent is alive",
    )
    async def heartbeat(
        self,
        agent_id: AgentIdPath,
        caller: CallerDep,
        data: JSONBody[Heartbeat | None] = None,
    ) -> Agent:
        agent_id = checked_agent_id(agent_id)
        require_self_or_admin(agent_id, caller)
        return await caller.broker.agents.heartbeat(agent_id, (data or Heartbeat()).status)

    @post(
        "/{agent_id:str}/drain",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Admin: no new tasks for this agent",
        guards=[require_admin],
        security=ADMIN_SECURITY,
    )
    async def drain(self, agent_id: AgentIdPath, caller: CallerDep) -> Agent:
        return await caller.broker.agents.drain(checked_agent_id(agent_id), True)

    @post(
        "/{agent_id:str}/undrain",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Admin: the agent takes tasks again",
        guards=[require_admin],
        security=ADMIN_SECURITY,
    )
    async def undrain(self, agent_id: AgentIdPath, caller: CallerDep) -> Agent:
        return await caller.broker.agents.drain(checked_agent_id(agent_id), False)

    @post(
        "/{agent_id:str}/tokens",
        responses=ERRORS,
        status_code=HTTP_201_CREATED,
        summary="Admin: issue a token for this agent (shown once)",
        description=(
            "The agent sends it as Authorization: Bearer <token> with X-Agent-ID: <agent id>."
            " Its earlier tokens stay valid until revoked."
        ),
        guards=[require_admin],
        security=ADMIN_SECURITY,
    )
    async def issue_token(
        self, agent_id: AgentIdPath, request: Request[Any, Any, Any]
    ) -> IssuedToken:
        agent_id = checked_agent_id(agent_id)
        auth: Authenticator = request.app.state.auth
        return IssuedToken(agent_id=agent_id, token=await auth.issue(agent_id))

    @delete(
        "/{agent_id:str}/tokens",
        responses=ERRORS,
        status_code=HTTP_204_NO_CONTENT,
        summary="Admin: revoke every token of this agent",
        guards=[require_admin],
        security=ADMIN_SECURITY,
    )
    async def revoke_tokens(self, agent_id: AgentIdPath, request: Request[Any, Any, Any]) -> None:
        auth: Authenticator = request.app.state.auth
        await auth.revoke(checked_agent_id(agent_id))


@get(
    "/stats",
    responses=ERRORS,
    summary="Admin: queue statistics",
    tags=["admin"],
    guards=[require_admin],
    security=ADMIN_SECURITY,
)
async def stats(caller: CallerDep) -> Stats:
    return await caller.broker.reads.insights.stats()
