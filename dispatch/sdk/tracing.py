"""Tracing on the agent's side: on when the application has configured an OpenTelemetry tracer
provider (the SDK never configures one), else nothing of opentelemetry is imported. A handler's
span continues its task's trace (Task.trace_context, stored by the broker at the create), and
requests carry the current span's trace context."""

from __future__ import annotations

import contextvars
import sys
from typing import TYPE_CHECKING

from dispatch.models import Task

if TYPE_CHECKING:
    from opentelemetry.trace import Span


def active() -> bool:
    """Whether the application set a tracer provider (it imported opentelemetry to do so)."""
    if "opentelemetry.trace" not in sys.modules:
        return False
    from opentelemetry import trace

    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def inject(headers: dict[str, str]) -> None:
    """Add the current span's trace context (the application's propagator: W3C by default)."""
    from opentelemetry import propagate

    propagate.inject(headers)


def handling(task: Task) -> tuple[contextvars.Context, Span]:
    """The span of a task's handler, child of the task's trace context (a new trace without one),
    and a context in which it is the current span, for the handler's asyncio tasks; the caller
    ends the span."""
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(task.trace_context or {})
    span = trace.get_tracer("dispatch.sdk").start_span(
        "dispatch.handle", context=parent, kind=trace.SpanKind.CONSUMER,
        attributes={"dispatch.task_id": str(task.task_id), "dispatch.title": task.title,
                    "dispatch.agent": task.assigned_agent or ""},
    )
    ctx = contextvars.copy_context()
    ctx.run(context.attach, trace.set_span_in_context(span))
    return ctx, span
