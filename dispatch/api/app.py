"""The API app on port 8600. The [api] issue fills in every endpoint of SPEC section 5."""

from __future__ import annotations

from litestar import Litestar

from dispatch.broker import Broker
from dispatch.settings import Settings


def create_app(settings: Settings, broker: Broker) -> Litestar:
    return Litestar(route_handlers=[])
