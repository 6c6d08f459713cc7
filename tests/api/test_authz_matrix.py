"""The authorization matrix: every /api/v1 endpoint, called by every kind of caller, in both
auth modes: the status each gets, and that a refused call changes nothing.

Each call is made on a task of its own, prepared through the broker: created by `req` with owner
`own`, attempted and failed by `agent-a` (the previous agent), now assigned to `agent-b`. The
agent endpoints act on `agent-b`.

Runs with assignment.retry_backoff_ms 0 (see the fixture), so the failed attempt's retry can be
claimed at once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import httpx
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from dispatch.api.app import create_app
from dispatch.broker import Broker
from dispatch.models import Cancel, Fail, NewTask
from dispatch.settings import AssignmentSettings, AuthSettings, ServerSettings, Settings
from tests.api.conftest import ADMIN_TOKEN, MAX_BODY

Sql = psycopg.Connection[dict[str, Any]]

# Callers: who they say they are (X-Agent-ID) and what they present.
#   requester, owner, assigned, previous, stranger: their own token in tokens mode, none in open
#   admin: X-Agent-ID `ops` with the admin token
#   wrong_token: the admin's X-Agent-ID with a token nobody issued
#   no_token: the admin's X-Agent-ID with no Authorization at all (in open mode: a stranger)
ROLES = ("requester", "owner", "assigned", "previous", "stranger", "admin", "wrong_token",
         "no_token")
IDS = {"requester": "req", "owner": "own", "assigned": "agent-b", "previous": "agent-a",
       "stranger": "mallory", "admin": "ops", "wrong_token": "ops", "no_token": "ops"}
AGENT = "agent-b"


class Row(NamedTuple):
    """One endpoint. `open` and `tokens`: the status per caller, in the order of ROLES. For
    `reports` the status is the one the single report gets inside the 200 answer (the request
    itself being refused shows as its own 401/403). `seen`: for the listing, whether the task is
    in the caller's list."""

    method: str
    path: str
    body: Any
    open: tuple[int, ...]
    tokens: tuple[int, ...]
    prepare: str = ""


TASK_OK = (200, 200, 200, 200, 200, 200, 403, 200)
TASK_HIDDEN = (200, 200, 200, 200, 404, 200, 403, 401)
ADMIN_ONLY_OPEN = (401, 401, 401, 401, 401, 200, 403, 401)
ADMIN_ONLY_TOKENS = (403, 403, 403, 403, 403, 200, 403, 401)

MATRIX: dict[str, Row] = {
    #                                                   req  own  asg  prev strg adm  wrong none
    "create": Row("POST", "/tasks", {"title": "new"},
                  open=(201, 201, 201, 201, 201, 201, 403, 201),
                  tokens=(201, 201, 201, 201, 201, 201, 403, 401)),
    "list": Row("GET", "/tasks?limit=500", None,
                open=TASK_OK, tokens=(200, 200, 200, 200, 200, 200, 403, 401)),
    "get": Row("GET", "/tasks/{task}", None, open=TASK_OK, tokens=TASK_HIDDEN),
    "events": Row("GET", "/tasks/{task}/events", None, open=TASK_OK, tokens=TASK_HIDDEN),
    "dependencies": Row("GET", "/tasks/{task}/dependencies", None,
                        open=TASK_OK, tokens=TASK_HIDDEN),
    # Only the requester or an admin edits the edges, and only while the task waits (this one is
    # assigned: 409).
    "depend": Row("PUT", "/tasks/{task}/dependencies/{task}", None,
                  open=(409, 403, 403, 403, 403, 409, 403, 403),
                  tokens=(409, 403, 403, 403, 404, 409, 403, 401)),
    # A gate's decisions: the requester, the owner or an admin (this task has no gate: 409).
    **{name: Row("POST", f"/tasks/{{task}}/{name}", body,
                 open=(409, 409, 403, 403, 403, 409, 403, 403),
                 tokens=(409, 409, 403, 403, 404, 409, 403, 401))
       for name, body in (("approve", None), ("reject", {"reason": "no"}), ("accept", None),
                          ("request-changes", {"feedback": "more"}))},
    # Only the agent holding it suspends a task (this one is assigned, not running: 409); anyone
    # who may see it signals one (it is not suspended: 409).
    "suspend": Row("POST", "/tasks/{task}/suspend", {"waiting_for": "x", "timeout_seconds": 60},
                   open=(403, 403, 409, 409, 403, 403, 403, 403),
                   tokens=(403, 403, 409, 409, 404, 403, 403, 401)),
    "signal": Row("POST", "/tasks/{task}/signal", {"payload": 1},
                  open=(409, 409, 409, 409, 403, 409, 403, 403),
                  tokens=(409, 409, 409, 409, 404, 409, 403, 401)),
    "undepend": Row("DELETE", "/tasks/{task}/dependencies/{task}", None,
                    open=(409, 403, 403, 403, 403, 409, 403, 403),
                    tokens=(409, 403, 403, 403, 404, 409, 403, 401)),
    "explain": Row("GET", "/tasks/{task}/explain", None,
                   open=ADMIN_ONLY_OPEN, tokens=ADMIN_ONLY_TOKENS),
    "patch metadata": Row("PATCH", "/tasks/{task}", {"metadata": {"k": 1}},
                          open=(200, 200, 403, 403, 403, 200, 403, 403),
                          tokens=(200, 200, 403, 403, 404, 200, 403, 401)),
    "cancel": Row("PATCH", "/tasks/{task}", {"status": "cancelled"},
                  open=(200, 200, 403, 403, 403, 200, 403, 403),
                  tokens=(200, 200, 403, 403, 404, 200, 403, 401)),
    # Only registered agents claim (the agents of the task are; the others are refused, 404).
    "claim": Row("POST", "/tasks/claim", {"capabilities": ["nothing-needs-this"]},
                 open=(404, 404, 204, 204, 404, 404, 403, 404),
                 tokens=(404, 404, 204, 204, 404, 404, 403, 401)),
    "start": Row("POST", "/tasks/{task}/start", None,
                 open=(403, 403, 200, 409, 403, 403, 403, 403),
                 tokens=(403, 403, 200, 409, 404, 403, 403, 401)),
    "progress": Row("POST", "/tasks/{task}/progress", {"percent": 50},
                    open=(403, 403, 200, 409, 403, 403, 403, 403),
                    tokens=(403, 403, 200, 409, 404, 403, 403, 401)),
    # Besides the assigned agent, the requester, the owner and an admin may complete a task by hand.
    "complete": Row("POST", "/tasks/{task}/complete", {"result": {}},
                    open=(200, 200, 200, 409, 403, 200, 403, 403),
                    tokens=(200, 200, 200, 409, 404, 200, 403, 401)),
    "fail": Row("POST", "/tasks/{task}/fail", {"error": "no", "retry_eligible": False},
                open=(403, 403, 200, 409, 403, 403, 403, 403),
                tokens=(403, 403, 200, 409, 404, 403, 403, 401)),
    "release": Row("POST", "/tasks/{task}/release", {"reason": "shutting down"},
                   open=(403, 403, 200, 409, 403, 403, 403, 403),
                   tokens=(403, 403, 200, 409, 404, 403, 403, 401)),
    "reports": Row("POST", "/tasks/reports", [{"task_id": "{task}", "action": "start"}],
                   open=(403, 403, 200, 409, 403, 403, 403, 403),
                   tokens=(403, 403, 200, 409, 404, 403, 403, 401)),
    "requeue": Row("POST", "/tasks/{task}/requeue", None,
                   open=ADMIN_ONLY_OPEN, tokens=ADMIN_ONLY_TOKENS, prepare="cancelled"),
    "register": Row("PUT", "/agents/{agent}", {"capabilities": ["code"]},
                    open=(403, 403, 200, 403, 403, 200, 403, 403),
                    tokens=(403, 403, 200, 403, 403, 200, 403, 401)),
    "register owner": Row("PUT", "/agents/{agent}", {"owner": "mallory"},
                          open=(403, 403, 403, 403, 403, 200, 403, 403),
                          tokens=(403, 403, 403, 403, 403, 200, 403, 401)),
    "heartbeat": Row("POST", "/agents/{agent}/heartbeat", {"status": "busy"},
                     open=(403, 403, 200, 403, 403, 200, 403, 403),
                     tokens=(403, 403, 200, 403, 403, 200, 403, 401)),
    "agents": Row("GET", "/agents", None, open=ADMIN_ONLY_OPEN, tokens=ADMIN_ONLY_TOKENS),
    "stats": Row("GET", "/stats", None, open=ADMIN_ONLY_OPEN, tokens=ADMIN_ONLY_TOKENS),
    "drain": Row("POST", "/agents/{agent}/drain", None,
                 open=ADMIN_ONLY_OPEN, tokens=ADMIN_ONLY_TOKENS),
    "undrain": Row("POST", "/agents/{agent}/undrain", None,
                   open=ADMIN_ONLY_OPEN, tokens=ADMIN_ONLY_TOKENS),
    "issue token": Row("POST", "/agents/{agent}/tokens", None,
                       open=(401, 401, 401, 401, 401, 201, 403, 401),
                       tokens=(403, 403, 403, 403, 403, 201, 403, 401)),
    "revoke tokens": Row("DELETE", "/agents/{agent}/tokens", None,
                         open=(401, 401, 401, 401, 401, 204, 403, 401),
                         tokens=(403, 403, 403, 403, 403, 204, 403, 401)),
    # The agent itself or an admin; agent-b holds the prepared task, so even they get 409.
    "delete agent": Row("DELETE", "/agents/{agent}", None,
                        open=(403, 403, 409, 403, 403, 409, 403, 403),
                        tokens=(403, 403, 409, 403, 403, 409, 403, 401)),
}

# The listing: whether the prepared task is among what each caller gets.
LIST_SEEN = {
    "open": (True, True, True, True, True, True, None, True),
    "tokens": (True, True, True, True, False, True, None, None),
}


@pytest.fixture
def assignment_settings() -> AssignmentSettings:
    """A failed attempt's retry is available at once (the prepared task's second attempt)."""
    return AssignmentSettings(retry_backoff_ms=0)


class World(NamedTuple):
    client: httpx.AsyncClient
    broker: Broker
    tokens: dict[str, str]


@pytest.fixture(params=["open", "tokens"])
async def world(request: pytest.FixtureRequest, broker: Broker) -> AsyncIterator[World]:
    mode = request.param
    settings = Settings(
        server=ServerSettings(admin_token=ADMIN_TOKEN, max_body_bytes=MAX_BODY),
        auth=AuthSettings(mode=mode),
    )
    for agent_id in ("agent-a", "agent-b"):
        # Alice's-style ownership, set the admin's way; room for every prepared task.
        await broker.agents.upsert(agent_id, owner="own", max_concurrent=1000)
    tokens = {}
    if mode == "tokens":
        for role in ("requester", "owner", "assigned", "previous", "stranger"):
            tokens[role] = await broker.agents.token_issue(IDS[role])
    async with AsyncTestClient(app=create_app(settings, broker)) as client:
        yield World(client, broker, tokens)


def headers_of(world: World, role: str) -> dict[str, str]:
    headers = {"X-Agent-ID": IDS[role]}
    if role == "admin":
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    elif role == "wrong_token":
        headers["Authorization"] = "Bearer dsp_" + "0" * 64
    elif role in world.tokens:
        headers["Authorization"] = f"Bearer {world.tokens[role]}"
    return headers


async def prepare(broker: Broker, how: str) -> uuid.UUID:
    """A task of its own: created by req for own, failed once by agent-a, assigned to agent-b.
    Its capability is its own, so no other task is claimed in its place."""
    cap = f"cell-{uuid.uuid4().hex[:8]}"
    task, _ = await broker.submit(
        NewTask(title="matrix", owner="own", required_capabilities=[cap], priority=10),
        requester="req",
    )
    for worker in ("agent-a", "agent-b"):  # a claim takes only what its agent is registered for
        await broker.agents.upsert(worker, capabilities=[cap])
    first = await broker.claim("agent-a", [cap])
    assert first is not None and first.task_id == task.task_id
    await broker.apply(
        Fail(task_id=task.task_id, agent_id="agent-a", error="first attempt", retry_eligible=True)
    )
    second = await broker.claim("agent-b", [cap])
    assert second is not None and second.task_id == task.task_id
    assert second.previous_agents == ["agent-a"]
    if how == "cancelled":
        await broker.apply(
            Cancel(task_id=task.task_id, actor="ops", reason="for the requeue row", admin=True)
        )
    return task.task_id


def fill(value: Any, task_id: uuid.UUID) -> Any:
    """The row's body or path with the prepared task and agent in place."""
    if isinstance(value, str):
        return value.replace("{task}", str(task_id)).replace("{agent}", AGENT)
    if isinstance(value, list):
        return [fill(v, task_id) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, task_id) for k, v in value.items()}
    return value


def snapshot(sql: Sql) -> list[Any]:
    """Everything a call could change: tasks, their events, agents, tokens."""
    return [
        sql.execute(f"SELECT * FROM dispatch.{table} ORDER BY {order}").fetchall()
        for table, order in (("tasks", "task_id"), ("task_events", "id"),
                             ("agents", "agent_id"), ("agent_tokens", "token_hash"))
    ]


@pytest.mark.parametrize("endpoint", list(MATRIX))
async def test_authorization_matrix(world: World, sql: Sql, endpoint: str) -> None:
    row = MATRIX[endpoint]
    mode = "tokens" if world.tokens else "open"
    expected = dict(zip(ROLES, row.tokens if mode == "tokens" else row.open, strict=True))
    seen_expected = dict(zip(ROLES, LIST_SEEN[mode], strict=True))
    problems = []
    # The admin last: its drain, owner change or revocation would change the next callers' world.
    for role in sorted(ROLES, key=lambda role: role == "admin"):
        task_id = await prepare(world.broker, row.prepare)
        before = snapshot(sql)
        r = await world.client.request(
            row.method, "/api/v1" + fill(row.path, task_id), json=fill(row.body, task_id),
            headers=headers_of(world, role),
        )
        status = r.status_code
        if endpoint == "reports" and status == 200:
            status = r.json()[0]["status"]
        if status != expected[role]:
            problems.append(f"{role}: expected {expected[role]}, got {status} {r.text[:200]}")
            continue
        if status >= 400 and snapshot(sql) != before:
            problems.append(f"{role}: refused with {status} but changed the database")
        if status in (403, 404) and '"matrix"' in r.text:
            problems.append(f"{role}: refused with {status} but shown the task")
        if endpoint == "list" and status == 200:
            listed = str(task_id) in {t["task_id"] for t in r.json()}
            if listed != seen_expected[role]:
                problems.append(f"{role}: task listed {listed}, expected {seen_expected[role]}")
    assert not problems, f"{mode} {row.method} {row.path}:\n" + "\n".join(problems)
