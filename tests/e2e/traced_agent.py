"""A worker whose application traces: `python -m tests.e2e.traced_agent URL AGENT_ID SPANS`. It
configures an OpenTelemetry tracer provider (the SDK only uses it) that writes each span as it
ends, one JSON line, to the file SPANS; it takes only what the assigner pushes (capability
`traced`) and completes each task with {"ok": true}."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from dispatch.sdk.worker import TaskContext, Worker


class JsonLines(SpanExporter):
    """Each span: name, trace id, span id, parent span id (hex), attributes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as out:
            for span in spans:
                assert span.context is not None
                out.write(json.dumps({
                    "name": span.name,
                    "trace_id": f"{span.context.trace_id:032x}",
                    "span_id": f"{span.context.span_id:016x}",
                    "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "attributes": dict(span.attributes or {}),
                }, default=list) + "\n")
        return SpanExportResult.SUCCESS


def main() -> None:
    url, agent_id, spans = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines(spans)))
    trace.set_tracer_provider(provider)
    worker = Worker(url, agent_id, capabilities=["traced"], concurrency=2, claim=False,
                    poll_seconds=1)

    @worker.handler
    async def handle(ctx: TaskContext) -> object:
        await ctx.progress(50, "halfway")
        return {"ok": True}

    worker.run()
    provider.shutdown()


if __name__ == "__main__":
    main()
