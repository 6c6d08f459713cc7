"""Prometheus metrics (prefix dispatch_). One registry per process; the ops app
serves it. Gauges that describe the queue are read from the database at scrape time.

Under `serve --workers N` each worker records into files of a directory the supervisor gives it
(PROMETHEUS_MULTIPROC_DIR, prometheus_client's multiprocess mode) and the supervisor's one ops
endpoint sums them; each gauge here says how its workers' values combine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# A `_created` series per counter and histogram says when the process started, which nothing reads.
disable_created_metrics()

# The capabilities the assignment wait is labelled with: the first ones this process sees, then
# OTHER (a bounded number of series, however many capabilities the swarm has).
CAPABILITY_SERIES = 20
OTHER = "other"
ANY_CAPABILITY = "(any)"


class Metrics:
    """The process's metric objects, passed explicitly to whoever records into them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks_created = Counter(
            "dispatch_tasks_created_total", "Tasks created", ["source"], registry=r
        )
        self.task_transitions = Counter(
            "dispatch_task_transitions_total", "Lifecycle transitions by event", ["event"],
            registry=r,
        )
        self.events_set_aside = Counter(
            "dispatch_events_set_aside_total",
            "Events the relay set aside because NATS refused them while accepting others",
            registry=r,
        )
        self.event_duplicates = Counter(
            "dispatch_event_duplicates_total",
            "Event messages JetStream acknowledged as duplicates, by what the stream held under "
            "the message id: same (the same event: a re-publish, dropped) or conflict (another "
            "message: the event was published again under a new id)",
            ["verdict"], registry=r,
        )
        self.nats_publish_failures = Counter(
            "dispatch_nats_publish_failures_total", "Failed publishes to NATS", registry=r
        )
        self.assignment_wait = Histogram(
            "dispatch_assignment_wait_seconds",
            "Time from available (created, scheduled or retried) to assigned, by each capability"
            " the task requires ((any): none)",
            ["capability"],
            buckets=(0.001, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self._capabilities: dict[str, Any] = {}
        self.task_run = Histogram(
            "dispatch_task_run_seconds", "Time from assigned to a terminal status", ["status"],
            buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.http = HttpMetrics(r)
        self.ui_streams = Gauge(
            "dispatch_ui_streams", "Open live streams of the dashboard (/ui/events)", registry=r,
            multiprocess_mode="livesum",
        )
        self.ui_refreshes = Counter(
            "dispatch_ui_refreshes_total",
            "Refreshes of what open dashboards show (one set of queries per topic each, however "
            "many streams are open)",
            registry=r,
        )
        self.ui_topic_failures = Counter(
            "dispatch_ui_topic_failures_total",
            "Topics of the dashboard (the overview, one task's page) whose refresh failed; the "
            "other topics of that refresh went on",
            registry=r,
        )
        self.assign_batch_size = Histogram(
            "dispatch_assign_batch_size", "Tasks assigned per assignment batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )


    def waited(self, capabilities: Sequence[str], seconds: float) -> None:
        """An assignment's wait, under each capability the task requires."""
        for capability in capabilities or (ANY_CAPABILITY,):
            child = self._capabilities.get(capability)
            if child is None:
                if len(self._capabilities) >= CAPABILITY_SERIES:
                    child = self.assignment_wait.labels(OTHER)
                else:
                    child = self._capabilities[capability] = self.assignment_wait.labels(capability)
            child.observe(seconds)


class HttpMetrics:
    """The API's dispatch_http_* series (requests_total, request_duration_seconds and
    requests_error_total by method, path template and status_code; requests_in_progress by method
    and path template), recorded by a plain ASGI middleware. A Litestar Prometheus middleware
    builds a Request object and looks up every labelled child on each request, which measured
    about 6 % of a worker's CPU under the REST lifecycle load (py-spy)."""

    LABELS = ("method", "path", "status_code")

    def __init__(self, registry: CollectorRegistry, prefix: str = "dispatch_http") -> None:
        labels = list(self.LABELS)
        self.total = Counter(f"{prefix}_requests_total", "Total requests", labels,
                             registry=registry)
        self.duration = Histogram(f"{prefix}_request_duration_seconds",
                                  "Request duration, in seconds", labels, registry=registry)
        self.in_progress = Gauge(f"{prefix}_requests_in_progress", "Requests being answered",
                                 ["method", "path"], registry=registry,
                                 multiprocess_mode="livesum")
        self.errors = Counter(f"{prefix}_requests_error_total", "Requests answered with a 5xx",
                              labels, registry=registry)
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._running: dict[tuple[str, str], Any] = {}

    def _done(self, method: str, path: str, status: int) -> tuple[Any, Any, Any]:
        key = (method, path, status)
        found = self._children.get(key)
        if found is None:
            values = (method, path, str(status))
            found = (self.total.labels(*values), self.duration.labels(*values),
                     self.errors.labels(*values) if status >= 500 else None)
            self._children[key] = found
        return found

    def _gauge(self, method: str, path: str) -> Any:
        key = (method, path)
        found = self._running.get(key)
        if found is None:
            found = self._running[key] = self.in_progress.labels(method, path)
        return found

    def middleware(self, app: Any) -> Any:
        """Litestar middleware factory: wraps the route's ASGI app."""

        async def record(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            method, path = scope["method"], scope.get("path_template") or scope["path"]
            status = 200

            async def send_status(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            running = self._gauge(method, path)
            running.inc()
            start = time.perf_counter()
            try:
                await app(scope, receive, send_status)
            finally:
                running.dec()
                total, duration, errors = self._done(method, path, status)
                total.inc()
                duration.observe(time.perf_counter() - start)
                if errors is not None:
                    errors.inc()

        return record
