"""OpenTelemetry tracing (settings `tracing`, the `tracing` extra): a span for each API request,
lifecycle transition, assignment and relay batch, and the W3C trace context a task keeps from its
create (dispatch.tasks.trace_context) for its assignment, its events on NATS and the agent that
runs it. Off by default: no Tracing exists then, its users test for None, and nothing of
opentelemetry is imported."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dispatch
from dispatch.errors import ConfigError
from dispatch.models import Assignment, Task
from dispatch.settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext

# A W3C trace context as stored and sent: {"traceparent": ..., "tracestate": ...}.
Carrier = dict[str, str]
_TRACE_HEADER_BYTES = (b"traceparent", b"tracestate")

# What runs in place of a span while tracing is off (reusable, yields None).
NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()

# The longest tracestate a task keeps (W3C: propagate at least 512 characters); a longer one is
# dropped, the traceparent kept (dispatch.tasks.trace_context holds up to 1 kB).
MAX_TRACESTATE = 512

MISSING_EXTRA = "tracing.enabled needs OpenTelemetry: pip install 'dispatch-broker[tracing]'"


def check_installed(settings: TracingSettings) -> None:
    """Raise ConfigError when tracing is on and OpenTelemetry is not installed (without
    importing it)."""
    if settings.enabled and importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ConfigError(MISSING_EXTRA)


def tracing_from(settings: TracingSettings) -> Tracing | None:
    """The tracing these settings ask for, with its own tracer provider; None while off."""
    if not settings.enabled:
        return None
    check_installed(settings)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        # A trace its caller started keeps the caller's decision; a new one is kept at the ratio.
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    if settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint or None)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif settings.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return Tracing(provider)


class Tracing:
    """Spans of one tracer provider; trace contexts in W3C form."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("dispatch", dispatch.__version__)
        self._trace = trace
        self._w3c = TraceContextTextMapPropagator()

    def shutdown(self) -> None:
        """Export what is left (blocks up to the exporter's timeout)."""
        self.provider.shutdown()

    def _parent(self, carrier: Mapping[str, str] | None) -> Context | None:
        """The context a carrier holds (a malformed traceparent holds none: a new trace); None,
        the current one, without a carrier."""
        return None if carrier is None else self._w3c.extract(carrier)

    def span(
        self, name: str, *, parent: Mapping[str, str] | None = None, kind: str = "internal",
        attributes: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        """A current span for the block, child of `parent` (a received trace context) when given,
        else of the current span."""
        return self.tracer.start_as_current_span(
            name, context=self._parent(parent), kind=self._trace.SpanKind[kind.upper()],
            attributes=attributes,
        )

    def middleware(self, app: Any) -> Any:
        """Litestar middleware factory: a server span around each request of the route, the
        child of the caller's traceparent when it sends a valid one."""

        async def traced(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            method, path = scope["method"], scope.get("path_template") or scope["path"]
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                       if k in _TRACE_HEADER_BYTES}
            with self.span(f"{method} {path}", parent=carrier, kind="server", attributes={
                "http.request.method": method, "http.route": path,
            }) as span:

                async def send_status(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        span.set_attribute("http.response.status_code", message["status"])
                        if message["status"] >= 500:
                            span.set_status(self._trace.StatusCode.ERROR)
                    await send(message)

                await app(scope, receive, send_status)

        return traced

    @contextlib.contextmanager
    def creating(self, parent: Mapping[str, str] | None = None) -> Iterator[Carrier | None]:
        """The span of a create, child of `parent` when given (else of the current span);
        yields its trace context, which the task keeps."""
        with self.span("dispatch.task.create", parent=parent):
            yield self.carrier()

    def carrier(self) -> Carrier | None:
        """The current span's trace context, to store or send; None without a valid span."""
        out: Carrier = {}
        self._w3c.inject(out)
        if len(out.get("tracestate", "")) > MAX_TRACESTATE:
            del out["tracestate"]
        return out or None

    def _record(
        self, name: str, parent: Context | None, start_ns: int, end_ns: int,
        attributes: Mapping[str, Any], links: Sequence[SpanContext] = (),
    ) -> SpanContext:
        span = self.tracer.start_span(
            name, context=parent, start_time=start_ns, attributes=attributes,
            links=[self._trace.Link(c) for c in links if c.is_valid],
        )
        span.end(end_time=end_ns)
        return span.get_span_context()

    def _task_parent(self, carrier: Mapping[str, str] | None) -> tuple[Context | None, list[Any]]:
        """A task's span continues the task's trace, linked to the current span (the request or
        the loop that made the transition); a task without a trace context is the current span's
        child."""
        if not carrier:
            return None, []
        return self._w3c.extract(carrier), [self._trace.get_current_span().get_span_context()]

    def transitions(self, event: str, tasks: Sequence[Task], start_ns: int) -> None:
        """A span per task of a transition that started at start_ns and ended now (their times
        are the statement's, one for all of them)."""
        end = time.time_ns()
        for task in tasks:
            parent, links = self._task_parent(task.trace_context)
            self._record(f"dispatch.task.{event}", parent, start_ns, end, {
                "dispatch.task_id": str(task.task_id), "dispatch.event": event,
                "dispatch.status": str(task.status), "dispatch.agent": task.assigned_agent or "",
            }, links)

    def assigned(self, assignments: Sequence[Assignment], start_ns: int) -> None:
        """An assignment round that gave tasks (start_ns to now), and a span per assignment in
        its task's trace, linked to the round."""
        end = time.time_ns()
        round_ = self._record("dispatch.assign", None, start_ns, end,
                              {"dispatch.assigned": len(assignments)})
        for a in assignments:
            parent = self._w3c.extract(a.trace_context) if a.trace_context else None
            self._record("dispatch.task.assigned", parent, start_ns, end, {
                "dispatch.task_id": str(a.task_id), "dispatch.event": "assigned",
                "dispatch.agent": a.agent_id, "dispatch.score": a.score,
            }, [round_])
