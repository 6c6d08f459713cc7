"""Who is calling: X-Agent-ID on every /api/v1 request, the Bearer admin token where needed.

Guards run before Litestar parses parameters and bodies, so an unauthenticated request gets its
401/403 whatever else is wrong with it. They are coroutines: Litestar runs a sync guard in a thread.
"""

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from dispatch.errors import Forbidden, Unauthorized
from dispatch.wire import AGENT_ID_RE

AGENT_HEADER = "x-agent-id"
# OpenAPI: the admin endpoints' security requirement (the scheme is declared by the app).
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"BearerToken": []}]


def admin_token_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    token: str = connection.app.state.admin_token
    return token


def agent_id_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The caller's validated X-Agent-ID, or Unauthorized."""
    agent_id = connection.headers.get(AGENT_HEADER)
    if agent_id is None:
        raise Unauthorized("X-Agent-ID header is required")
    if not AGENT_ID_RE.match(agent_id):
        raise Unauthorized("X-Agent-ID must be 1 to 128 characters of [A-Za-z0-9._:@/-]")
    return agent_id


def is_admin(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """True with the right Bearer token, False without one; a wrong token is refused (403)."""
    header = connection.headers.get("authorization")
    if header is None:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be `Bearer <admin token>`", detail="admin")
    expected = admin_token_of(connection)
    if not expected or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Forbidden("invalid admin token")
    return True


async def require_agent(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of every /api/v1 route."""
    agent_id_of(connection)


async def require_admin(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of the admin routes: 401 without a Bearer token, 403 with a wrong one."""
    if not is_admin(connection):
        raise Unauthorized(
            "this endpoint needs Authorization: Bearer <admin token>", detail="admin"
        )
