"""Who is calling: X-Agent-ID on every /api/v1 request, and the Bearer token that vouches for it.

auth.mode `open` trusts X-Agent-ID; a Bearer token is optional there, and when one is sent it must
be the admin token or a live token of that X-Agent-ID (so agents can get their tokens before the
switch to `tokens`). auth.mode `tokens` requires one of the two on every request. Either way a
missing or malformed credential is 401 and a token that is wrong, revoked or another caller's is
403; the admin token may act under any X-Agent-ID.

Authentication runs before Litestar parses parameters and bodies, so an unauthenticated request
gets its 401/403 whatever else is wrong with it: in the API router's before-request hook
(`content.admit`), first thing on the hot routes' lanes (`lane`), or first thing in the admin
routes' guard, which runs before that hook. Not
as a router guard: Litestar copies the route handler (some seventy attributes) for each guard on
each request, which cost more than authenticating. Guards are coroutines: Litestar runs a sync
guard in a thread.
"""

import hashlib
import hmac
import time
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from dispatch.api.deps import Caller
from dispatch.errors import Forbidden, Unauthorized
from dispatch.settings import AuthSettings
from dispatch.store import Agents
from dispatch.wire import AGENT_ID_RE

AGENT_HEADER = "x-agent-id"
# OpenAPI: the admin endpoints' security requirement (the scheme is declared by the app).
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"BearerToken": []}]
# Issued tokens are 68 characters; anything much longer is not worth hashing and looking up.
MAX_TOKEN_LENGTH = 256
# Verified tokens kept per replica; past this the cache starts over (it only saves lookups).
MAX_CACHED_TOKENS = 10_000


class Authenticator:
    """Verifies agent tokens against dispatch.agent_tokens, remembering each verified one for
    auth.token_cache_ms so that the hot path does not pay a query per request. A revocation
    through this replica takes effect here at once, and on the others when its NOTIFY arrives
    (`forget`), at the latest after token_cache_ms."""

    def __init__(self, agents: Agents, settings: AuthSettings, admin_token: str) -> None:
        self.agents = agents
        self.mode = settings.mode
        self.admin_token = admin_token
        self._ttl = settings.token_cache_ms / 1000
        self._verified: dict[bytes, tuple[str, float]] = {}
        # Bumped by every forget: a lookup that started before one must not cache its answer.
        self._generation = 0

    def is_admin_token(self, token: str) -> bool:
        expected = self.admin_token
        return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())

    async def agent_of(self, token: str) -> str | None:
        """The identity a live token is good for; None for an unknown or revoked one."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._verified.get(key)
        if hit is not None and now - hit[1] < self._ttl:
            return hit[0]
        generation = self._generation
        agent_id = await self.agents.token_agent(token)
        if agent_id is None:
            self._verified.pop(key, None)
        elif generation == self._generation and self._ttl > 0:
            if len(self._verified) >= MAX_CACHED_TOKENS:
                self._verified.clear()
            self._verified[key] = (agent_id, now)
        return agent_id

    def forget(self, agent_id: str) -> None:
        """Drop the agent's verified tokens; "" drops all (the listener reconnected, so
        revocations may have been missed)."""
        self._generation += 1
        if not agent_id:
            self._verified.clear()
            return
        for key in [k for k, (holder, _) in self._verified.items() if holder == agent_id]:
            del self._verified[key]

    async def issue(self, agent_id: str) -> str:
        return await self.agents.token_issue(agent_id)

    async def revoke(self, agent_id: str) -> int:
        revoked = await self.agents.token_revoke(agent_id)
        self.forget(agent_id)
        return revoked


def agent_id_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The caller's validated X-Agent-ID, or Unauthorized."""
    agent_id = connection.headers.get(AGENT_HEADER)
    if agent_id is None:
        raise Unauthorized("X-Agent-ID header is required")
    if not AGENT_ID_RE.match(agent_id):
        raise Unauthorized(
            "X-Agent-ID must be 1 to 128 characters of [A-Za-z0-9._:@/-], no segment . or .."
        )
    return agent_id


def bearer_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The Bearer token, None without an Authorization header; a malformed one is 401."""
    header = connection.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be `Bearer <token>`", detail="admin")
    return token.strip()


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    """The caller of an /api/v1 request, authenticated once: left in the request's state for the
    handlers (deps.provide_caller) and the error handlers."""
    found: Caller | None = connection.state.get("dispatch_caller")
    if found is not None:
        return found
    agent_id = agent_id_of(connection)
    auth: Authenticator = connection.app.state.auth
    token = bearer_of(connection)
    admin = False
    if token is None:
        if auth.mode == "tokens":
            raise Unauthorized(
                "auth.mode is tokens: send Authorization: Bearer <token> with X-Agent-ID",
                detail="admin",
            )
    elif auth.is_admin_token(token):
        admin = True
    elif await auth.agent_of(token) != agent_id:
        raise Forbidden(f"invalid token: neither the admin token nor a live token of {agent_id}")
    broker = connection.app.state.broker
    viewer = agent_id if auth.mode == "tokens" and not admin else None
    caller = Caller(broker, agent_id, admin, viewer)
    connection.state.dispatch_caller = caller
    return caller


async def require_admin(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of the admin routes: authenticates the caller (guards run before the router's
    hook), then 401 without a Bearer token, 403 with an agent's token."""
    caller = await authenticate(connection)
    if caller.admin:
        return
    if connection.headers.get("authorization") is None:
        raise Unauthorized(
            "this endpoint needs Authorization: Bearer <admin token> (the server's"
            " server.admin_token, DISPATCH_ADMIN_TOKEN in its environment)", detail="admin"
        )
    raise Forbidden("this endpoint needs the admin token, not an agent's")
