"""Prometheus metrics (prefix dispatch_). One registry per process; the ops app
serves it. Gauges that describe the queue are read from the database at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


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
        self.nats_publish_failures = Counter(
            "dispatch_nats_publish_failures_total", "Failed publishes to NATS", registry=r
        )
        self.assignment_wait = Histogram(
            "dispatch_assignment_wait_seconds", "Time from created to assigned",
            buckets=(0.001, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.task_run = Histogram(
            "dispatch_task_run_seconds", "Time from assigned to a terminal status", ["status"],
            buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.assign_batch_size = Histogram(
            "dispatch_assign_batch_size", "Tasks assigned per assignment batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
