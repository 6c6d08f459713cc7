"""NATS inbound (queue group `dispatch`): task requests, agent reports under the REST rules, agent
state, and Dispatch never mistaking its own outbound events for reports."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import psycopg
from nats.aio.client import Client

from dispatch.broker import Broker
from dispatch.events.connection import NatsConnection
from dispatch.events.inbound import NatsInbound
from dispatch.events.relay import Relay
from dispatch.models import AgentStatus, Complete, NewTask, Progress, Start, TaskStatus
from tests.events.conftest import eventually, unpublished
from tests.events.streamread import read_stream
from tests.factories import at, make_task
from tests.natsfix import NatsServer

Sql = psycopg.Connection[dict[str, Any]]


async def ask(nc: Client, subject: str, body: object, timeout: float = 10.0) -> Any:
    """Publish with a reply subject and return Dispatch's answer: the reply with header
    Dispatch-Origin: inbound (a report subject is also stored by JetStream, which acks it too)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    await nc.publish(subject, data, reply=inbox)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            msg = await sub.next_msg(timeout=max(deadline - loop.time(), 0.01))
            if (msg.headers or {}).get("Dispatch-Origin") == "inbound":
                return msgspec.json.decode(msg.data)
    finally:
        await sub.unsubscribe()


def task_count(sql: Sql) -> int:
    row = sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone()
    assert row is not None
    return int(row["n"])


async def test_request_reply_creates_a_task(
    inbound: NatsInbound, relay: Relay, client: Client, sql: Sql
) -> None:
    # A plain request/reply: with the relay's stream in place, the first reply must still be
    # Dispatch's task, not a JetStream ack.
    reply = await client.request(
        "swarm.task.request",
        msgspec.json.encode(
            {"title": "via nats", "requester": "req-1", "scope": " Summarise ",
             "context": {"a": 1}, "priority": 4}
        ),
        timeout=10,
    )
    task = msgspec.json.decode(reply.data)
    assert task["title"] == "via nats"
    assert task["requester"] == "req-1" and task["owner"] is None
    assert task["source"] == "nats"
    assert task["required_capabilities"] == ["summarise"]
    assert task["metadata"] == {"a": 1}
    assert task["status"] == "pending" and task["priority"] == 4
    row = sql.execute(
        "SELECT title, source FROM dispatch.tasks WHERE task_id = %s", (task["task_id"],)
    ).fetchone()
    assert row == {"title": "via nats", "source": "nats"}
    # ...and its `created` event goes out like any other.
    await eventually(lambda: _async(unpublished(sql) == 0), what="created event published")
    subjects = [m.subject for m in await read_stream(client)]
    assert subjects == [f"swarm.task.{task['task_id']}.created"]


async def _async(value: bool) -> bool:
    return value


async def test_a_bad_request_gets_an_error_reply_and_creates_nothing(
    inbound: NatsInbound, client: Client, sql: Sql
) -> None:
    bad: list[tuple[object, str | None]] = [
        (b"not json", None),
        ({"requester": "req-1"}, None),  # no title
        ({"title": "x", "requester": "req-1", "colour": "blue"}, None),  # unknown field
        ({"title": "x", "requester": "req-1", "priority": 11}, "priority"),
        ({"title": "", "requester": "req-1"}, "title"),
        ({"title": "x", "requester": "bad id!"}, "requester"),
    ]
    for body, field in bad:
        reply = await ask(client, "swarm.task.request", body)
        assert reply["status"] == 400, (body, reply)
        assert reply["error"]
        if field is not None:
            assert reply["detail"]["field"] == field, (body, reply)
    assert task_count(sql) == 0


async def test_the_original_services_request_shape_creates_a_task(
    inbound: NatsInbound, client: Client, sql: Sql
) -> None:
    """Its publishers send no requester: the X-Agent-ID header, else the owner, else "nats"."""
    original = {
        "owner": "alice", "title": "from the Go client", "description": "d",
        "required_capabilities": ["code"], "priority": 2, "metadata": {"k": 1},
        "timeout_seconds": 60, "max_retries": 1, "source": "hermes",
    }
    task = await ask(client, "swarm.task.request", original)
    assert (task["requester"], task["owner"], task["source"]) == ("alice", "alice", "hermes")
    assert task["required_capabilities"] == ["code"] and task["timeout_seconds"] == 60
    no_owner = await ask(client, "swarm.task.request", {"title": "anonymous"})
    assert (no_owner["requester"], no_owner["owner"], no_owner["source"]) == ("nats", None, "nats")

    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish(
        "swarm.task.request", msgspec.json.encode({"title": "with header", "owner": "alice"}),
        reply=inbox, headers={"X-Agent-ID": "bob"},
    )
    while True:
        msg = await sub.next_msg(timeout=10)
        if (msg.headers or {}).get("Dispatch-Origin") == "inbound":
            break
    await sub.unsubscribe()
    assert msgspec.json.decode(msg.data)["requester"] == "bob"
    assert task_count(sql) == 3


async def test_a_repeated_idempotency_key_returns_the_same_task(
    inbound: NatsInbound, client: Client, sql: Sql
) -> None:
    body = {"title": "once", "requester": "req-1", "idempotency_key": "k-1"}
    first = await ask(client, "swarm.task.request", body)
    second = await ask(client, "swarm.task.request", body)
    assert first["task_id"] == second["task_id"]
    assert task_count(sql) == 1


async def test_agent_reports_follow_the_fencing_rules(
    inbound: NatsInbound, relay: Relay, broker: Broker, client: Client
) -> None:
    await broker.agents.upsert("agent-a")
    await broker.agents.upsert("agent-c")
    await broker.submit(NewTask(title="work"), requester="req")
    claimed = await broker.claim("agent-a")
    assert claimed is not None
    subject = f"swarm.task.{claimed.task_id}"

    # An agent that never held the task: 403 as over REST, and nothing changes.
    reply = await ask(client, f"{subject}.started", {"agent_id": "agent-b"})
    assert reply["status"] == 403
    assert (await broker.tasks.get(claimed.task_id)).status is TaskStatus.ASSIGNED

    reply = await ask(client, f"{subject}.started", {"agent_id": "agent-a"})
    assert reply["status"] == "running"
    reply = await ask(
        client, f"{subject}.progress", {"agent_id": "agent-a", "percent": 40, "message": "hm"}
    )
    assert reply["progress"]["percent"] == 40
    reply = await ask(client, f"{subject}.progress", {"agent_id": "agent-a", "percent": 140})
    assert reply["status"] == 400
    # The original service's shape: a fraction and a detail.
    reply = await ask(
        client, f"{subject}.progress", {"agent_id": "agent-a", "progress": 0.5, "detail": "half"}
    )
    assert reply["progress"] == {"percent": 50, "message": "half"}
    reply = await ask(client, f"{subject}.completed", {"agent_id": "agent-a", "result": {"x": 1}})
    assert reply["status"] == "completed" and reply["result"] == {"x": 1}
    # A retried complete (lost reply) is answered with the task, unchanged.
    again = await ask(client, f"{subject}.completed", {"agent_id": "agent-a", "result": {"x": 1}})
    assert again["status"] == "completed" and again["updated_at"] == reply["updated_at"]
    # A report about a finished task: 409.
    reply = await ask(client, f"{subject}.failed", {"agent_id": "agent-a", "error": "late"})
    assert reply["status"] == 409 and reply["detail"]["status"] == "completed"
    # An agent that lost the task (stopped, so it went back and on to agent-c): 409 with the task.
    await broker.submit(NewTask(title="second"), requester="req")
    second = await broker.claim("agent-a")
    assert second is not None
    await broker.agents.stop("agent-a")
    taken = await broker.claim("agent-c")
    assert taken is not None
    reply = await ask(client, f"swarm.task.{second.task_id}.started", {"agent_id": "agent-a"})
    assert reply["status"] == 409
    assert reply["detail"]["assigned_agent"] == "agent-c"
    assert reply["detail"]["status"] == "assigned"
    # A report naming an earlier lease is stale, even from the agent that holds the task now.
    now = taken.lease
    assert now != second.lease
    reply = await ask(client, f"swarm.task.{second.task_id}.completed",
                      {"agent_id": "agent-c", "result": {"x": 1}, "lease": second.lease})
    assert reply["status"] == 409 and reply["detail"]["lease"] == now
    reply = await ask(client, f"swarm.task.{second.task_id}.started",
                      {"agent_id": "agent-c", "lease": now})
    assert reply["status"] == "running"
    # Unknown task; a report without agent_id (e.g. an outbound event body) is refused.
    reply = await ask(client, f"swarm.task.{uuid.uuid4()}.started", {"agent_id": "agent-a"})
    assert reply["status"] == 404
    reply = await ask(client, f"{subject}.started", {"event": "started", "actor": "agent-a"})
    assert reply["status"] == 400


async def test_a_report_without_reply_subject_is_applied(
    inbound: NatsInbound, broker: Broker, client: Client
) -> None:
    await broker.agents.upsert("agent-a")
    await broker.submit(NewTask(title="work"), requester="req")
    claimed = await broker.claim("agent-a")
    assert claimed is not None
    await client.publish(
        f"swarm.task.{claimed.task_id}.failed",
        msgspec.json.encode({"agent_id": "agent-a", "error": "no GPU", "retry_eligible": False}),
    )

    async def failed() -> bool:
        return (await broker.tasks.get(claimed.task_id)).status is TaskStatus.FAILED

    await eventually(failed, what="fire-and-forget failure report applied")
    assert (await broker.tasks.get(claimed.task_id)).error == "no GPU"


async def test_dispatch_does_not_take_its_own_events_for_reports(
    inbound: NatsInbound, relay: Relay, broker: Broker, client: Client, sql: Sql
) -> None:
    await broker.agents.upsert("agent-a")
    await broker.submit(NewTask(title="work"), requester="req")
    claimed = await broker.claim("agent-a")
    assert claimed is not None
    await broker.apply(Start(task_id=claimed.task_id, agent_id="agent-a"))
    await broker.apply(Progress(task_id=claimed.task_id, agent_id="agent-a", percent=10))
    await broker.apply(Complete(task_id=claimed.task_id, actor="agent-a", result={"ok": True}))
    events_before = len(await broker.tasks.events(claimed.task_id))
    # The relay publishes started/progress/completed on the inbound report subjects.
    await eventually(lambda: _async(unpublished(sql) == 0), what="events published")
    published = {m.subject.rsplit(".", 1)[1] for m in await read_stream(client)}
    assert {"started", "progress", "completed"} <= published
    assert await inbound.idle(10)
    assert inbound.handled == 0
    assert len(await broker.tasks.events(claimed.task_id)) == events_before


async def test_agent_state_messages_update_the_directory(
    inbound: NatsInbound, broker: Broker, client: Client
) -> None:
    await broker.agents.upsert("worker.1")
    # An agent id may contain dots: it is every token between swarm.agent and the state.
    agent = await ask(client, "swarm.agent.worker.1.ready", {"capabilities": ["Code"]})
    assert agent["agent_id"] == "worker.1" and agent["capabilities"] == ["code"]
    assert agent["status"] == "ready"
    agent = await ask(client, "swarm.agent.worker.1.busy", b"")
    assert agent["status"] == "busy"
    assert (await broker.agents.get("worker.1")).status is AgentStatus.BUSY

    await broker.submit(NewTask(title="work", required_capabilities=["code"]), requester="req")
    claimed = await broker.claim("worker.1")
    assert claimed is not None
    agent = await ask(client, "swarm.agent.worker.1.stopped", b"")
    assert agent["status"] == "stopped"
    task = await broker.tasks.get(claimed.task_id)
    assert task.status is TaskStatus.PENDING and task.assigned_agent is None
    assert task.retry_count == 0  # given back, not failed
    assert [e.event for e in await broker.tasks.events(claimed.task_id)][-1] == "released"

    reply = await ask(client, "swarm.agent.worker.1.dancing", b"")
    assert reply["status"] == 400


async def test_two_replicas_handle_each_request_once(
    inbound: NatsInbound, broker: Broker, nats_server: NatsServer, client: Client, sql: Sql
) -> None:
    other_conn = NatsConnection(nats_server.url)
    await other_conn.start()
    assert await other_conn.wait_connected(10)
    other = NatsInbound(other_conn, broker)
    await other.start()
    try:
        await asyncio.wait_for(other.subscribed.wait(), 10)
        replies = await asyncio.gather(
            *(
                ask(client, "swarm.task.request", {"title": f"t{i}", "requester": "req"})
                for i in range(40)
            )
        )
        await client.flush()
        assert await inbound.idle(10) and await other.idle(10)
        assert len({r["task_id"] for r in replies}) == 40
        assert task_count(sql) == 40
        assert inbound.handled + other.handled == 40
        assert inbound.handled > 0 and other.handled > 0  # both replicas were really listening
    finally:
        await other.stop()
        await other_conn.stop()


async def test_a_request_carries_flow_control_fields(
    inbound: NatsInbound, client: Client, sql: Sql
) -> None:
    task = await ask(client, "swarm.task.request", {
        "title": "call", "requester": "req-1", "concurrency_key": "repo-x", "rate_key": "openai",
        "cost": 25})
    assert (task["concurrency_key"], task["rate_key"], task["cost"]) == ("repo-x", "openai", 25)
    for body, field in (({"title": "x", "requester": "r", "cost": 0}, "cost"),
                        ({"title": "x", "requester": "r", "rate_key": ""}, "rate_key")):
        reply = await ask(client, "swarm.task.request", body)
        assert reply["status"] == 400 and reply["detail"]["field"] == field, reply
    assert task_count(sql) == 1


async def test_an_agent_suspends_and_a_signal_over_nats_resumes(
    inbound: NatsInbound, relay: Relay, broker: Broker, client: Client
) -> None:
    await broker.agents.upsert("agent-a")
    await broker.submit(NewTask(title="ask the user"), requester="req")
    claimed = await broker.claim("agent-a")
    assert claimed is not None
    subject = f"swarm.task.{claimed.task_id}"
    await ask(client, f"{subject}.started", {"agent_id": "agent-a"})
    reply = await ask(client, f"{subject}.suspended", {"agent_id": "agent-a", "waiting_for": "x",
                                                       "timeout_seconds": 0})
    assert reply["status"] == 400
    reply = await ask(client, f"{subject}.suspended", {
        "agent_id": "agent-a", "waiting_for": "the user's choice", "timeout_seconds": 600})
    assert reply["status"] == "suspended" and reply["waiting_for"] == "the user's choice"
    reply = await ask(client, f"{subject}.signal", {"sender": "req", "payload": {"choice": 2}})
    assert reply["status"] == "assigned" and reply["signal"] == {"choice": 2}
    assert reply["assigned_agent"] == "agent-a"
    # It no longer waits: a second signal is 409.
    reply = await ask(client, f"{subject}.signal", {"sender": "req", "payload": {"choice": 3}})
    assert reply["status"] == 409


async def test_gates_and_dependencies_are_decided_over_nats(
    inbound: NatsInbound, broker: Broker, client: Client, sql: Sql
) -> None:
    # Review: the completed result waits; request-changes sends it back, accept completes it.
    reviewed = await make_task(broker, title="write", approval="review")
    subject = f"swarm.task.{reviewed.task_id}"
    for attempt, agent in ((1, "agent-a"), (2, "agent-b")):
        now = at(3600 * attempt)  # past the retry's backoff
        await broker.agents.upsert(agent)
        claimed = await broker.claim(agent, now=now)
        assert claimed is not None and claimed.task_id == reviewed.task_id
        await broker.apply(Start(task_id=claimed.task_id, agent_id=agent), now=now)
        done = await broker.apply(Complete(task_id=claimed.task_id, actor=agent,
                                           result={"draft": attempt}))
        assert done.status is TaskStatus.REVIEW
        if attempt == 1:
            reply = await ask(client, f"{subject}.request-changes", {"sender": "req"})
            assert reply["status"] == 400  # feedback is required
            reply = await ask(client, f"{subject}.request-changes",
                              {"sender": "req", "feedback": "shorter"})
            assert reply["status"] == "pending" and reply["feedback"] == "shorter"
    reply = await ask(client, f"{subject}.accept", {"sender": "req"})
    assert reply["status"] == "completed" and reply["result"] == {"draft": 2}

    # Approval: only the requester (or the owner) may decide; reject records the reason.
    gated = await make_task(broker, title="deploy", approval="before_start")
    subject = f"swarm.task.{gated.task_id}"
    reply = await ask(client, f"{subject}.approve", {"sender": "mallory"})
    assert reply["status"] == 403
    reply = await ask(client, f"{subject}.approve", {"sender": "req", "unknown": 1})
    assert reply["status"] == 400
    reply = await ask(client, f"{subject}.approve", {"sender": "req"})
    assert reply["status"] == "pending" and reply["approved_by"] == "req"
    other = await make_task(broker, title="drop db", approval="before_start")
    reply = await ask(client, f"swarm.task.{other.task_id}.reject",
                      {"sender": "req", "reason": "too risky"})
    assert reply["status"] == "cancelled" and "too risky" in reply["error"]

    # Edges: the requester adds and removes a dependency of a waiting task; a cycle is 400.
    first = await make_task(broker, title="first")
    second = await make_task(broker, title="second")
    reply = await ask(client, f"swarm.task.{second.task_id}.depend",
                      {"sender": "req", "depends_on": str(first.task_id)})
    assert reply["status"] == "blocked" and reply["waiting_on"] == 1
    reply = await ask(client, f"swarm.task.{first.task_id}.depend",
                      {"sender": "req", "depends_on": str(second.task_id)})
    assert reply["status"] == 400
    reply = await ask(client, f"swarm.task.{second.task_id}.undepend",
                      {"sender": "mallory", "depends_on": str(first.task_id)})
    assert reply["status"] == 403
    reply = await ask(client, f"swarm.task.{second.task_id}.undepend",
                      {"sender": "req", "depends_on": str(first.task_id)})
    assert reply["status"] == "pending" and reply["waiting_on"] == 0
    edges = sql.execute("SELECT count(*) AS n FROM dispatch.task_dependencies").fetchone()
    assert edges == {"n": 0}
