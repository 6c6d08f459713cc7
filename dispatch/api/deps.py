"""What the handlers receive by dependency injection: one Caller (the broker and its store, who
is calling and whether they presented the admin token). One dependency, not several: Litestar
resolves several dependencies of one handler in an anyio task group, which costs more than the work
itself."""

from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from dispatch.api.auth import agent_id_of, is_admin
from dispatch.broker import Broker
from dispatch.store import Store


@dataclass(frozen=True, slots=True)
class Caller:
    broker: Broker
    store: Store
    agent_id: str
    admin: bool


CallerDep = NamedDependency[Caller]


def provide_caller(request: Request[Any, Any, Any]) -> Caller:
    """A wrong admin token is refused (403) wherever it is presented, not silently ignored."""
    broker: Broker = request.app.state.broker
    return Caller(broker, broker.store, agent_id_of(request), is_admin(request))
