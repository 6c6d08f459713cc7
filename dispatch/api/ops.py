"""The ops app on the metrics port: GET /health and GET /metrics (Prometheus text). A worker of
`serve --workers N` serves it on a Unix socket for the serve's one endpoint (dispatch.serve_ops)."""

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from litestar import Litestar, Response, get
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dispatch.api.errors import http_error, internal_error
from dispatch.metrics import Metrics


class OpsSource(Protocol):
    """What the ops app reads: the Service."""

    metrics: Metrics

    async def health(self) -> tuple[bool, dict[str, object]]: ...

    async def gauges(self) -> dict[str, object]: ...


class _Snapshot(Collector):
    """Gauges of one scrape, read from the database just before."""

    def __init__(self, values: Mapping[str, Any] | None) -> None:
        self.values = values

    def collect(self) -> list[GaugeMetricFamily]:  # type: ignore[override]
        up = GaugeMetricFamily(
            "dispatch_database_up", "1 when the scrape could read the database", value=0
        )
        if self.values is None:
            return [up]
        up = GaugeMetricFamily(
            "dispatch_database_up", "1 when the scrape could read the database", value=1
        )
        depth = GaugeMetricFamily("dispatch_queue_depth", "Tasks by status", labels=["status"])
        for status, n in sorted(dict(self.values.get("queue_depth") or {}).items()):
            depth.add_metric([status], float(n))
        agents = GaugeMetricFamily("dispatch_agents", "Agents by status", labels=["status"])
        for status, n in sorted(dict(self.values.get("agents") or {}).items()):
            agents.add_metric([status], float(n))
        oldest = self.values.get("oldest_pending_seconds")
        return [*self._flow(self.values), *self._by(self.values),
            up,
            depth,
            GaugeMetricFamily(
                "dispatch_oldest_pending_seconds", "Age of the oldest pending task (0 when none)",
                value=float(oldest or 0.0),
            ),
            agents,
            GaugeMetricFamily(
                "dispatch_event_log_unpublished", "Event-log rows not yet published to NATS",
                value=float(self.values.get("event_log_unpublished") or 0),
            ),
        ]

    @staticmethod
    def _by(values: Mapping[str, Any]) -> list[GaugeMetricFamily]:
        """The pending queue by capability, and by tenant while flow control is on: the largest
        keys and `other` (dispatch.pending_by)."""
        families: list[GaugeMetricFamily] = []
        for label, rows in (("capability", values.get("by_capability")),
                            ("tenant", values.get("by_tenant"))):
            if rows is None:
                continue
            pending = GaugeMetricFamily(
                f"dispatch_{label}_pending", f"Pending tasks by {label} (the largest, and other)",
                labels=[label],
            )
            ready = GaugeMetricFamily(
                f"dispatch_{label}_ready", f"Pending tasks available now, by {label}",
                labels=[label],
            )
            oldest = GaugeMetricFamily(
                f"dispatch_{label}_oldest_wait_seconds",
                f"How long the longest-waiting available task has waited, by {label}",
                labels=[label],
            )
            families += [pending, ready, oldest]
            for row in rows:
                pending.add_metric([row["key"]], float(row["pending"]))
                ready.add_metric([row["key"]], float(row["ready"]))
                oldest.add_metric([row["key"]], float(row["oldest_wait_seconds"]))
            if label == "capability":
                agents = GaugeMetricFamily(
                    "dispatch_capability_agents",
                    "Agents not stopped nor drained that have the capability",
                    labels=[label],
                )
                for row in rows:
                    if row.get("agents") is not None:
                        agents.add_metric([row["key"]], float(row["agents"]))
                families.append(agents)
        return families

    @staticmethod
    def _flow(values: Mapping[str, Any]) -> list[GaugeMetricFamily]:
        """Flow control: tasks held back by rule, tokens left, active tasks per capped key."""
        held = GaugeMetricFamily(
            "dispatch_flow_held_tasks",
            "Pending available tasks held back by a flow rule (concurrency, rate, fair_share)",
            labels=["rule", "key"],
        )
        for h in values.get("flow_held") or []:
            held.add_metric([h["rule"], h["key"]], float(h["tasks"]))
        tokens = GaugeMetricFamily(
            "dispatch_rate_limit_tokens", "Tokens left in a rate key's bucket", labels=["key"]
        )
        for key, n in sorted(dict(values.get("rate_tokens") or {}).items()):
            tokens.add_metric([key], float(n))
        active = GaugeMetricFamily(
            "dispatch_concurrency_active", "Tasks of a capped concurrency key assigned or running",
            labels=["key"],
        )
        cap = GaugeMetricFamily(
            "dispatch_concurrency_limit", "A concurrency key's cap", labels=["key"]
        )
        for key, (n, limit) in sorted(dict(values.get("concurrency_active") or {}).items()):
            active.add_metric([key], float(n))
            cap.add_metric([key], float(limit))
        return [held, tokens, active, cap]


async def database_exposition(service: OpsSource) -> bytes:
    """The gauges read from the database now (dispatch_database_up 0 when it cannot be read)."""
    try:
        values: Mapping[str, Any] | None = await service.gauges()
    except Exception:  # any failure to read the database shows as dispatch_database_up 0
        values = None
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Snapshot(values))
    return generate_latest(scrape)


class HealthSource(Protocol):
    async def health(self) -> tuple[bool, dict[str, object]]: ...


def ops_app(
    source: HealthSource, handlers: Sequence[HTTPRouteHandler],
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
) -> Litestar:
    """An ops app: GET /health (200 or 503 with `source`'s report) beside `handlers`, no OpenAPI,
    the process's own logging, errors answered as the API answers them."""

    @get("/health")
    async def health() -> Response[dict[str, object]]:
        ok, report = await source.health()
        return Response(report, status_code=200 if ok else 503)

    return Litestar(
        route_handlers=[health, *handlers],
        openapi_config=None,
        logging_config=None,  # dispatch.logs configured the process's logging
        exception_handlers={HTTPException: http_error, Exception: internal_error},  # type: ignore[dict-item]
        on_shutdown=list(on_shutdown),
    )


def create_ops_app(service: OpsSource) -> Litestar:
    @get("/metrics")
    async def metrics() -> Response[bytes]:
        """The process's dispatch_ metrics (with the API's dispatch_http_*), the database
        gauges, and the default registry (the Python process collectors)."""
        body = (
            generate_latest(service.metrics.registry)
            + await database_exposition(service)
            + generate_latest(REGISTRY)
        )
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @get("/metrics/database")
    async def database_metrics() -> Response[bytes]:
        """The database gauges alone: what the ops endpoint of `serve --workers N` adds, once,
        to the sum of its workers' series."""
        return Response(await database_exposition(service), media_type=CONTENT_TYPE_LATEST)

    return ops_app(service, [metrics, database_metrics])
