"""Names the handlers receive by dependency injection: the broker, the caller and whether the
caller presented the admin token."""

from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from dispatch.api.auth import agent_id_of, is_admin
from dispatch.broker import Broker

BrokerDep = NamedDependency[Broker]
Actor = NamedDependency[str]
IsAdmin = NamedDependency[bool]


def provide_actor(request: Request[Any, Any, Any]) -> str:
    return agent_id_of(request)


def provide_admin(request: Request[Any, Any, Any]) -> bool:
    return is_admin(request)
