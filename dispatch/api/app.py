"""The API app on port 8600: every endpoint under /api/v1, its OpenAPI document under /schema
(openapi.json, openapi.yaml, a browsable page). Further routers (the dashboard, which
dispatch.service mounts under /ui) come in as `mounts`."""

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from litestar import Litestar, MediaType, Request, Response, Router, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import HeaderParameter
from litestar.static_files import create_static_files_router
from litestar.types import Message, Scope

import dispatch
from dispatch.api.agents import AgentController, stats
from dispatch.api.auth import Authenticator
from dispatch.api.content import admit
from dispatch.api.deps import provide_caller
from dispatch.api.errors import EXCEPTION_HANDLERS
from dispatch.api.follow import follow_hub
from dispatch.api.limits import LimitController, TenantController
from dispatch.api.schedules import ScheduleController
from dispatch.api.tasks import TaskController
from dispatch.broker import Broker
from dispatch.metrics import Metrics
from dispatch.notify import AUTH_CHANNEL, Listener
from dispatch.settings import Settings
from dispatch.tracing import Tracing
from dispatch.wire import AGENT_ID_PATTERN

# Swagger UI's files, served by this app from the swagger-ui-py package (server extra), so the
# docs page works without internet; the plugin's defaults load them (and a favicon) from a CDN.
ASSETS = "/schema/assets"


def docs_assets() -> Router:
    # Found without importing the package (its own code, framework glue, is of no use here).
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is missing: pip install 'dispatch-broker[server]'")
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return create_static_files_router(
        path=ASSETS, directories=[static], include_in_schema=False, name="docs-assets",
    )


# No page of this server may be shown inside another site's frame (clickjacking: a hidden frame of
# the dashboard under a decoy button). Both headers, for browsers that know only the older one.
FRAME_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


_FRAME_HEADERS_RAW = [(k.lower().encode(), v.encode()) for k, v in FRAME_HEADERS.items()]


async def deny_framing(message: Message, _scope: Scope) -> None:
    """Before every response this app sends (pages, redirects, errors, the API docs, 404s of
    unknown paths): the anti-framing headers, those the response did not set itself. On the raw
    header list: the framework's mutable headers cost more than the rest of this hook."""
    if message["type"] == "http.response.start":
        headers = list(message.get("headers", ()))
        present = {bytes(name).lower() for name, _ in headers}
        message["headers"] = headers + [h for h in _FRAME_HEADERS_RAW if h[0] not in present]


def openapi_config() -> OpenAPIConfig:
    swagger = SwaggerRenderPlugin(
        js_url=f"{ASSETS}/swagger-ui-bundle.js",
        css_url=f"{ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{ASSETS}/favicon-32x32.png'>",
    )
    return OpenAPIConfig(
        title="Dispatch",
        version=dispatch.__version__,
        description="Task broker and work scheduler for agent swarms.",
        path="/schema",
        render_plugins=[swagger, YamlRenderPlugin()],
        components=Components(
            security_schemes={"BearerToken": SecurityScheme(type="http", scheme="bearer")}
        ),
    )


@get("/", include_in_schema=False, sync_to_thread=False)
def index(request: Request[Any, Any, Any]) -> Response[Any]:
    """Where to go from the root: the dashboard (when served), the API's docs and document. A
    browser gets a page of links, anything else the same as JSON."""
    links = {"api": "/api/v1", "docs": "/schema/swagger", "openapi": "/schema/openapi.json"}
    if "ui" in request.app.state:
        links = {"dashboard": "/ui", **links}
    if request.accept.best_match([MediaType.JSON, MediaType.HTML]) == MediaType.HTML:
        items = "".join(f'<li><a href="{url}">{name}</a></li>' for name, url in links.items())
        page = (f"<!doctype html><title>Dispatch</title><h1>Dispatch {dispatch.__version__}</h1>"
                f"<ul>{items}</ul>")
        return Response(page, media_type=MediaType.HTML)
    return Response({"service": "dispatch", "version": dispatch.__version__, **links})


def create_app(
    settings: Settings,
    broker: Broker,
    *,
    admin_token: str | None = None,
    listener: Listener | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
    mounts: Sequence[Router] = (),
    state: Mapping[str, object] | None = None,
) -> Litestar:
    """The API app over `broker`. `admin_token`,
    when given, replaces settings.server.admin_token (`serve` passes the one it generated when
    the setting is empty); `listener` brings other replicas' token revocations; `metrics`
    counts HTTP requests; `tracing` makes a span of each; `mounts` are further routers (the
    dashboard) with their `state`."""

    api = Router(
        path="/api/v1",
        route_handlers=[TaskController, AgentController, stats, LimitController,
                        TenantController, ScheduleController],
        # Authentication and the body's rules, in one hook rather than as guards (see auth).
        before_request=admit,
        parameters={
            "x_agent_id": HeaderParameter(
                annotation=str,
                name="X-Agent-ID",
                required=True,
                pattern=AGENT_ID_PATTERN,
                description="The calling agent (or requester).",
            )
        },
        dependencies={"caller": Provide(provide_caller, sync_to_thread=False)},
    )
    auth = Authenticator(
        broker.agents,
        settings.auth,
        admin_token or settings.server.admin_token,
    )
    if listener is not None:
        # Revocations made through any replica reach this one's token cache.
        listener.watch(AUTH_CHANNEL, auth.forget)
    handlers: list[Router | HTTPRouteHandler] = [api, index, docs_assets(), *mounts]
    app_state: dict[str, object] = {**(state or {}), "auth": auth, "broker": broker,
                                    "follow": follow_hub(broker, listener)}
    return Litestar(
        route_handlers=handlers,
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.server.max_body_bytes,
        # HTTP metrics (dispatch_http_*) into the process's registry, served by the ops app; a
        # span per request while tracing is on.
        middleware=[
            *([metrics.http.middleware] if metrics is not None else []),
            *([tracing.middleware] if tracing is not None else []),
        ],
        before_send=[deny_framing],
        openapi_config=openapi_config(),
        state=State(app_state),
        logging_config=None,  # dispatch.logs configured the process's logging
        debug=False,
    )
