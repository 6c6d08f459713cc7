"""Tracing: one trace from a task's create to the agent that runs it, across `serve` (in this
process, its spans kept in memory), NATS and a worker process (its spans in a file); off by
default, with nothing of OpenTelemetry imported; a malformed traceparent is ignored."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool

from dispatch.api.app import create_app
from dispatch.broker import Broker
from dispatch.errors import ConfigError
from dispatch.service import Service
from dispatch.settings import ServerSettings, Settings, load_settings
from dispatch.store import Store
from dispatch.tracing import Tracing, tracing_from
from tests.natsfix import NatsServer, nats_server
from tests.poll import until
from tests.serve import serve_ports

__all__ = ["nats_server"]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
REQUEST_TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = Tracing(provider)
    yield t
    t.shutdown()


def hexes(span: ReadableSpan) -> tuple[str, str, str | None]:
    """(trace id, span id, parent span id) in hex."""
    assert span.context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", parent


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


@pytest.fixture
async def service(
    db_url: str, tmp_path: Path, nats_server: NatsServer, tracing: Tracing
) -> AsyncIterator[Service]:
    """A whole `serve` in this process (real HTTP, its loops, NATS), its spans in memory."""
    api, ops = serve_ports()
    settings = load_settings(environ={
        "DISPATCH_DATABASE_URL": db_url, "DISPATCH_HOST": "127.0.0.1",
        "DISPATCH_PORT": str(api), "DISPATCH_METRICS_PORT": str(ops),
        "DISPATCH_ADMIN_TOKEN": "admin-secret", "DISPATCH_HERMES_URL": nats_server.url,
        "DISPATCH_UI_ENABLED": "false", "DISPATCH_DATA_DIR": str(tmp_path / "data"),
    })
    s = Service(settings, tracing=tracing)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def agent_process(
    service: Service, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """tests.e2e.traced_agent against the service; its spans file."""
    spans = tmp_path / "agent-spans.jsonl"
    url = f"http://127.0.0.1:{service.settings.server.port}"
    with (tmp_path / "agent.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.traced_agent", url, "traced-1", str(spans)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield proc, spans
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_one_trace_from_the_create_to_the_agent(
    service: Service, agent_process: tuple[subprocess.Popen[bytes], Path],
    exporter: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path,
) -> None:
    proc, spans_file = agent_process
    base = f"http://127.0.0.1:{service.settings.server.port}"
    nc = await nats.connect(nats_server.url)
    published: list[Any] = []

    async def keep(msg: Any) -> None:
        published.append(msg)

    await nc.subscribe("swarm.task.*.*", cb=keep)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:

        async def registered() -> bool:
            r = await http.get("/api/v1/agents", headers={
                "X-Agent-ID": "ops", "Authorization": "Bearer admin-secret"})
            return any(a["agent_id"] == "traced-1" for a in r.json())

        await until(registered, "the agent's registration")
        r = await http.post(
            "/api/v1/tasks", json={"title": "traced", "required_capabilities": ["traced"]},
            headers={"X-Agent-ID": "alice",
                     "traceparent": traceparent(CALLER_TRACE, CALLER_SPAN)},
        )
        assert r.status_code == 201, r.text
        task = r.json()
        task_id = task["task_id"]

        async def completed() -> bool:
            got = (await http.get(f"/api/v1/tasks/{task_id}",
                                  headers={"X-Agent-ID": "alice"})).json()
            return got["status"] == "completed"

        await until(completed, "the task's completion")

        async def relayed() -> list[Any]:
            return [m for m in published if m.subject == f"swarm.task.{task_id}.completed"]

        await until(relayed, "the completed event on NATS")
    proc.send_signal(signal.SIGTERM)  # its shutdown calls serve, which runs in this loop
    assert await asyncio.to_thread(proc.wait, 30) == 0, (tmp_path / "agent.log").read_text()

    # serve: the request (child of the caller's span), the create (its child), whose context the
    # task keeps, and every transition of the task continuing it.
    spans = exporter.get_finished_spans()
    request = next(s for s in spans if s.name == "POST /api/v1/tasks")
    create = next(s for s in spans if s.name == "dispatch.task.create")
    assert hexes(request)[0::2] == (CALLER_TRACE, CALLER_SPAN)
    trace_id, create_id, parent = hexes(create)
    assert (trace_id, parent) == (CALLER_TRACE, hexes(request)[1])
    assert task["trace_context"] == {"traceparent": traceparent(CALLER_TRACE, create_id)}
    ours = [s for s in spans if (s.attributes or {}).get("dispatch.task_id") == task_id]
    by_name = {s.name: s for s in ours}
    assert {"dispatch.task.assigned", "dispatch.task.started", "dispatch.task.progress",
            "dispatch.task.completed"} <= by_name.keys(), sorted(by_name)
    for s in ours:
        assert hexes(s)[0::2] == (CALLER_TRACE, create_id), s.name
    # The assigner gave it (the agent does not claim): its round is linked.
    rounds = {s.context.span_id for s in spans if s.name == "dispatch.assign" and s.context}
    assert {link.context.span_id for link in by_name["dispatch.task.assigned"].links} & rounds

    # the agent: its handler's span is the child of the stored context, and its requests carry
    # the handler's span (the server's request spans are its children).
    lines = [json.loads(line) for line in spans_file.read_text().splitlines()]
    handle = next(line for line in lines if line["name"] == "dispatch.handle")
    assert (handle["trace_id"], handle["parent_id"]) == (CALLER_TRACE, create_id)
    assert handle["attributes"]["dispatch.task_id"] == task_id
    children = [s for s in spans if s.name.startswith(("POST", "PUT", "GET"))
                and hexes(s)[2] == handle["span_id"]]
    assert children, "no request of the agent's handler reached serve with its traceparent"

    # NATS: every event of the task carries the stored context.
    events = [m for m in published if m.subject.startswith(f"swarm.task.{task_id}.")]
    assert {m.subject.rsplit(".", 1)[1] for m in events} >= {
        "created", "assigned", "started", "completed"}
    assert all((m.headers or {}).get("traceparent") == task["trace_context"]["traceparent"]
               for m in events)

    # A task requested over NATS continues the message's traceparent.
    reply = await nc.request(
        "swarm.task.request", json.dumps({"title": "by nats", "requester": "bob"}).encode(),
        timeout=10, headers={"traceparent": traceparent(REQUEST_TRACE, CALLER_SPAN)},
    )
    by_nats = json.loads(reply.data)
    assert by_nats["trace_context"]["traceparent"].startswith(f"00-{REQUEST_TRACE}-")
    await nc.close()


BAD_TRACEPARENTS = [
    "garbage",
    "",
    f"00-{'0' * 32}-{CALLER_SPAN}-01",  # the invalid trace id
    f"00-{CALLER_TRACE}-{'0' * 16}-01",  # the invalid span id
    f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",  # the forbidden version
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",
    f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",
    "00-" + "a" * 4000,
]


@pytest.fixture
async def traced_client(
    pool: AsyncConnectionPool[Any], tracing: Tracing
) -> AsyncIterator[httpx.AsyncClient]:
    broker = Broker(Store(pool), tracing=tracing)
    app = create_app(Settings(server=ServerSettings(admin_token="x")), broker, tracing=tracing)
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.mark.parametrize("header", BAD_TRACEPARENTS)
async def test_a_malformed_traceparent_starts_a_new_trace(
    traced_client: httpx.AsyncClient, exporter: InMemorySpanExporter, header: str
) -> None:
    r = await traced_client.post(
        "/api/v1/tasks", json={"title": "t"},
        headers={"X-Agent-ID": "alice", "traceparent": header, "tracestate": "k=v,=,,"},
    )
    assert r.status_code == 201, r.text
    request = next(s for s in exporter.get_finished_spans() if s.name == "POST /api/v1/tasks")
    assert request.parent is None  # a root: nothing of the header was taken
    stored = r.json()["trace_context"]["traceparent"]
    assert stored.split("-")[1] == hexes(request)[0] != CALLER_TRACE


async def test_a_long_tracestate_is_not_kept(traced_client: httpx.AsyncClient) -> None:
    state = ",".join(f"k{i}={'v' * 200}" for i in range(30))  # 30 members: valid, 6 kB
    r = await traced_client.post(
        "/api/v1/tasks", json={"title": "t"},
        headers={"X-Agent-ID": "alice", "traceparent": traceparent(CALLER_TRACE, CALLER_SPAN),
                 "tracestate": state},
    )
    assert r.status_code == 201, r.text
    context = r.json()["trace_context"]
    assert context.keys() == {"traceparent"}
    assert context["traceparent"].startswith(f"00-{CALLER_TRACE}-")


async def test_tracing_off_stores_no_context(pool: AsyncConnectionPool[Any]) -> None:
    app = create_app(Settings(), Broker(Store(pool)))
    async with AsyncTestClient(app=app) as client:
        r = await client.post(
            "/api/v1/tasks", json={"title": "t"},
            headers={"X-Agent-ID": "alice", "traceparent": traceparent(CALLER_TRACE, CALLER_SPAN)},
        )
    assert r.status_code == 201, r.text
    assert r.json()["trace_context"] is None


# What serve builds with the default settings (its Service and API app), and the SDK's client
# and worker: after all of it, no module of OpenTelemetry's API or SDK is loaded. (Litestar's app
# looks for its own OpenTelemetry plugin when the package is installed, which loads the
# namespace package and the semantic conventions' constants, once, and nothing else.)
OFF_BY_DEFAULT = """
import sys
from psycopg_pool import AsyncConnectionPool
from dispatch.broker import Broker
from dispatch.sdk.client import DispatchClient
from dispatch.sdk.worker import Worker
from dispatch.service import Service, web_app
from dispatch.settings import load_settings
from dispatch.store import Store

settings = load_settings(environ={})
service = Service(settings)
assert service.tracing is None
broker = Broker(Store(AsyncConnectionPool("postgresql://nowhere", open=False)))
web_app(settings, broker, tracing=service.tracing)
DispatchClient("http://127.0.0.1:9", "a").close()
Worker("http://127.0.0.1:9", "a")
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"
             and m != "opentelemetry" and not m.startswith("opentelemetry.semconv")))
"""


def test_off_by_default_nothing_of_opentelemetry_is_imported() -> None:
    out = subprocess.run(
        [sys.executable, "-c", OFF_BY_DEFAULT], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_tracing_settings() -> None:
    settings = load_settings(environ={
        "DISPATCH_TRACING_ENABLED": "true", "DISPATCH_TRACING_EXPORTER": "none",
        "DISPATCH_TRACING_SAMPLE_RATIO": "0.25", "DISPATCH_TRACING_SERVICE_NAME": "dispatch-eu",
    }).tracing
    assert (settings.enabled, settings.sample_ratio) == (True, 0.25)
    tracing = tracing_from(settings)
    assert tracing is not None
    assert tracing.provider.resource.attributes["service.name"] == "dispatch-eu"
    tracing.shutdown()
    with pytest.raises(ConfigError, match=r"tracing\.sample_ratio"):
        load_settings(environ={"DISPATCH_TRACING_SAMPLE_RATIO": "2"})
    with pytest.raises(ConfigError, match="one of: otlp, console, none"):
        load_settings(environ={"DISPATCH_TRACING_EXPORTER": "zipkin"})
