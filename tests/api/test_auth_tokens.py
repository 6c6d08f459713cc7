"""Identity: per-agent tokens (issued and revoked by an admin, stored hashed, checked on every
request in auth.mode tokens, revocation reaching every replica), owner set only by an admin or
the directory, and agent ids that a URL path would reinterpret refused.

Tests that need auth.mode tokens say so and build their app with it."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from psycopg_pool import AsyncConnectionPool

from dispatch.api.app import create_app
from dispatch.broker import Broker
from dispatch.errors import ConfigError
from dispatch.notify import Listener
from dispatch.settings import AuthSettings, ServerSettings, Settings, load_settings
from dispatch.store import Store
from dispatch.store.base import Queries
from tests.api.conftest import ADMIN_TOKEN, MAX_BODY, admin, counts
from tests.poll import until

Sql = psycopg.Connection[dict[str, Any]]


def settings(mode: str = "tokens", token_cache_ms: int = 5000) -> Settings:
    return Settings(
        server=ServerSettings(admin_token=ADMIN_TOKEN, max_body_bytes=MAX_BODY),
        auth=AuthSettings(mode=mode, token_cache_ms=token_cache_ms),  # type: ignore[arg-type]
    )


def as_agent(agent_id: str, token: str | None = None) -> dict[str, str]:
    headers = {"X-Agent-ID": agent_id}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


@pytest.fixture
async def tokens_client(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    """An API in auth.mode tokens."""
    async with AsyncTestClient(app=create_app(settings("tokens"), broker)) as c:
        yield c


@pytest.fixture
async def open_client(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    """An API in auth.mode open (the default)."""
    async with AsyncTestClient(app=create_app(settings("open"), broker)) as c:
        yield c


async def issue(client: httpx.AsyncClient, agent_id: str) -> str:
    r = await client.post(f"/api/v1/agents/{agent_id}/tokens", headers=admin())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["agent_id"] == agent_id
    token: str = body["token"]
    return token


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    await until(check, what, timeout)


def test_the_auth_settings_default_to_open_and_come_from_the_environment() -> None:
    assert load_settings(None, {}).auth == AuthSettings(mode="open", token_cache_ms=5000)
    s = load_settings(None, {"DISPATCH_AUTH_MODE": "Tokens", "DISPATCH_AUTH_TOKEN_CACHE_MS": "0"})
    assert (s.auth.mode, s.auth.token_cache_ms) == ("tokens", 0)
    with pytest.raises(ConfigError, match=r"auth\.mode"):
        load_settings(None, {"DISPATCH_AUTH_MODE": "trusting"})


# -- the token lifecycle --------------------------------------------------------------------------


async def test_a_token_is_shown_once_and_stored_only_as_its_hash(
    tokens_client: httpx.AsyncClient, sql: Sql
) -> None:
    token = await issue(tokens_client, "worker-1")
    rows = sql.execute("SELECT * FROM dispatch.agent_tokens").fetchall()
    assert len(rows) == 1
    assert rows[0]["agent_id"] == "worker-1"
    assert bytes(rows[0]["token_hash"]) == hashlib.sha256(token.encode()).digest()
    # No column, in any encoding psql would show, holds the token itself.
    dumped = sql.execute("SELECT t::text AS row FROM dispatch.agent_tokens t").fetchone()
    assert dumped is not None and token not in dumped["row"]
    assert token.encode().hex() not in dumped["row"]

    r = await tokens_client.get("/api/v1/tasks", headers=as_agent("worker-1", token))
    assert r.status_code == 200
    # A second token works beside the first; neither is ever shown again.
    second = await issue(tokens_client, "worker-1")
    assert second != token
    for t in (token, second):
        r = await tokens_client.get("/api/v1/tasks", headers=as_agent("worker-1", t))
        assert r.status_code == 200
    r = await tokens_client.get("/api/v1/agents", headers=admin())
    assert token not in r.text and second not in r.text


async def test_tokens_mode_refuses_missing_wrong_and_borrowed_tokens(
    tokens_client: httpx.AsyncClient, sql: Sql
) -> None:
    token = await issue(tokens_client, "worker-1")
    other = await issue(tokens_client, "worker-2")
    before = counts(sql)
    body = {"title": "t"}
    r = await tokens_client.post("/api/v1/tasks", json=body, headers=as_agent("worker-1"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await tokens_client.post(
        "/api/v1/tasks", json=body, headers=as_agent("worker-1", "dsp_" + "0" * 64)
    )
    assert r.status_code == 403
    # worker-2's token does not make its bearer worker-1.
    r = await tokens_client.post("/api/v1/tasks", json=body, headers=as_agent("worker-1", other))
    assert r.status_code == 403
    r = await tokens_client.post(
        "/api/v1/tasks", json=body, headers={**as_agent("worker-1"), "Authorization": token}
    )
    assert r.status_code == 401  # not `Bearer <token>`
    assert counts(sql) == before

    r = await tokens_client.post("/api/v1/tasks", json=body, headers=as_agent("worker-1", token))
    assert r.status_code == 201 and r.json()["requester"] == "worker-1"
    # An agent's token is not the admin token.
    r = await tokens_client.get("/api/v1/stats", headers=as_agent("worker-1", token))
    assert r.status_code == 403
    r = await tokens_client.post(
        "/api/v1/agents/worker-1/tokens", headers=as_agent("worker-1", token)
    )
    assert r.status_code == 403
    # The admin token acts under any X-Agent-ID.
    r = await tokens_client.get("/api/v1/stats", headers=admin("anyone"))
    assert r.status_code == 200


async def test_a_parent_the_caller_cannot_see_reads_as_one_that_does_not_exist(
    tokens_client: httpx.AsyncClient, sql: Sql
) -> None:
    mine = await issue(tokens_client, "worker-1")
    theirs = await issue(tokens_client, "worker-2")
    r = await tokens_client.post("/api/v1/tasks", json={"title": "private"},
                                 headers=as_agent("worker-2", theirs))
    hidden = r.json()["task_id"]
    before = counts(sql)
    unknown = await tokens_client.post(
        "/api/v1/tasks", json={"title": "child", "parent_task_id": str(uuid.uuid4())},
        headers=as_agent("worker-1", mine))
    r = await tokens_client.post("/api/v1/tasks", json={"title": "child", "parent_task_id": hidden},
                                 headers=as_agent("worker-1", mine))
    assert (r.status_code, r.json()["detail"]) == (400, unknown.json()["detail"]), r.text
    assert unknown.status_code == 400
    assert counts(sql) == before
    # Its own task, and for an admin any task, is a parent as before.
    r = await tokens_client.post("/api/v1/tasks", json={"title": "child", "parent_task_id": hidden},
                                 headers=as_agent("worker-2", theirs))
    assert r.status_code == 201 and r.json()["parent_task_id"] == hidden
    r = await tokens_client.post("/api/v1/tasks", json={"title": "child", "parent_task_id": hidden},
                                 headers=admin("worker-1"))
    assert r.status_code == 201


async def test_a_task_names_as_owner_only_its_requester_or_the_requesters_owner(
    tokens_client: httpx.AsyncClient, sql: Sql
) -> None:
    """The owner decides whose agents run a task and whose fair share it spends: bob may not
    create work in alice's name; an agent an admin gave to alice may; the admin token may."""
    bob = as_agent("bob", await issue(tokens_client, "bob"))
    helper = as_agent("helper", await issue(tokens_client, "helper"))
    r = await tokens_client.put("/api/v1/agents/helper", json={"owner": "alice"}, headers=admin())
    assert r.status_code == 200
    before = counts(sql)
    r = await tokens_client.post("/api/v1/tasks", json={"title": "t", "owner": "alice"},
                                 headers=bob)
    assert r.status_code == 403, r.text
    assert r.json()["detail"] == {"field": "owner"} and "owner 'alice'" in r.json()["error"]
    # An agent of someone else's is no agent of alice's either.
    r = await tokens_client.post("/api/v1/tasks", json={"title": "t", "owner": "carol"},
                                 headers=helper)
    assert r.status_code == 403
    assert counts(sql) == before
    for who, owner in ((bob, "bob"), (bob, None), (helper, "alice"), (admin("bob"), "alice")):
        r = await tokens_client.post("/api/v1/tasks", json={"title": "t", "owner": owner},
                                     headers=who)
        assert r.status_code == 201, r.text
        assert r.json()["owner"] == owner
    tenants = sql.execute(
        "SELECT requester, owner FROM dispatch.tasks ORDER BY created_at").fetchall()
    assert [(t["requester"], t["owner"]) for t in tenants] == [
        ("bob", "bob"), ("bob", None), ("helper", "alice"), ("bob", "alice")]


async def test_open_mode_lets_a_caller_name_any_owner(open_client: httpx.AsyncClient) -> None:
    """Open mode trusts X-Agent-ID (anyone may act as alice): the owner rule is tokens mode's."""
    r = await open_client.post("/api/v1/tasks", json={"title": "t", "owner": "alice"},
                               headers=as_agent("bob"))
    assert r.status_code == 201 and r.json()["owner"] == "alice"


async def test_a_hidden_task_and_a_missing_one_are_refused_the_same_way(
    tokens_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report on a task the caller may not see and one on an id that does not exist answer the
    same 404 after the same SQL statements, so neither the answer nor its timing tells a caller
    that the task exists (before, the hidden one took one query more)."""
    theirs = as_agent("worker-2", await issue(tokens_client, "worker-2"))
    mine = as_agent("worker-1", await issue(tokens_client, "worker-1"))
    await tokens_client.put("/api/v1/agents/worker-2", json={}, headers=theirs)
    r = await tokens_client.post("/api/v1/tasks", json={"title": "private"}, headers=theirs)
    hidden = r.json()["task_id"]
    r = await tokens_client.post("/api/v1/tasks/claim", json={"start": True}, headers=theirs)
    assert r.json()["task_id"] == hidden
    missing = str(uuid.uuid4())
    await tokens_client.get("/api/v1/tasks", headers=mine)  # the token is verified and cached

    statements: list[str] = []
    real = Queries._rows

    async def recorded(self: Queries, query: Any, params: Any, conn: Any) -> Any:
        statements.append(" ".join(str(query).split())[:60])
        return await real(self, query, params, conn)

    monkeypatch.setattr(Queries, "_rows", recorded)
    reports = [("start", None), ("progress", {"percent": 5}), ("complete", {"result": 1}),
               ("fail", {"error": "x"}), ("release", {"reason": "x"})]
    for action, body in reports:
        answers = []
        for task_id in (hidden, missing):
            statements.clear()
            r = await tokens_client.post(f"/api/v1/tasks/{task_id}/{action}", json=body,
                                         headers=mine)
            answers.append((r.status_code, r.json()["error"].replace(task_id, "<id>"),
                            r.json()["detail"], list(statements)))
        assert answers[0] == answers[1], action
        assert answers[0][0] == 404
    statements.clear()
    batch = [{"task_id": t, "action": "complete", "result": 1} for t in (hidden, missing)]
    r = await tokens_client.post("/api/v1/tasks/reports", json=batch, headers=mine)
    outcomes = r.json()
    assert [o["status"] for o in outcomes] == [404, 404]
    assert outcomes[0]["error"].replace(hidden, "<id>") == outcomes[1]["error"].replace(
        missing, "<id>")


async def test_a_revoked_token_is_refused_at_once(
    tokens_client: httpx.AsyncClient, sql: Sql
) -> None:
    first = await issue(tokens_client, "worker-1")
    second = await issue(tokens_client, "worker-1")
    bystander = await issue(tokens_client, "worker-2")
    for agent_id, token in (("worker-1", first), ("worker-1", second), ("worker-2", bystander)):
        # Verified once, so this replica holds them in its cache.
        r = await tokens_client.get("/api/v1/tasks", headers=as_agent(agent_id, token))
        assert r.status_code == 200
    r = await tokens_client.delete("/api/v1/agents/worker-1/tokens", headers=admin())
    assert r.status_code == 204 and r.content == b""
    for token in (first, second):
        r = await tokens_client.get("/api/v1/tasks", headers=as_agent("worker-1", token))
        assert r.status_code == 403
    r = await tokens_client.get("/api/v1/tasks", headers=as_agent("worker-2", bystander))
    assert r.status_code == 200
    assert sql.execute(
        "SELECT count(*) AS n FROM dispatch.agent_tokens WHERE agent_id = 'worker-1'"
    ).fetchone() == {"n": 0}
    # Revoking again (nothing left) is not an error; a new token works.
    r = await tokens_client.delete("/api/v1/agents/worker-1/tokens", headers=admin())
    assert r.status_code == 204
    fresh = await issue(tokens_client, "worker-1")
    r = await tokens_client.get("/api/v1/tasks", headers=as_agent("worker-1", fresh))
    assert r.status_code == 200


async def test_a_revocation_reaches_another_replica_through_notify(
    db_url: str, pool: AsyncConnectionPool[Any], broker: Broker
) -> None:
    """Two replicas on one database. The second caches the token for far longer than the test
    waits (auth.token_cache_ms 300000), so only the NOTIFY can make it refuse in time."""
    listener = Listener(db_url)
    await listener.start()
    try:
        replica = Broker(Store(pool), listener=listener)
        apps: list[Litestar] = [
            create_app(settings("tokens"), broker),
            create_app(settings("tokens", token_cache_ms=300_000), replica, listener=listener),
        ]
        async with AsyncTestClient(app=apps[0]) as one, AsyncTestClient(app=apps[1]) as two:
            token = await issue(one, "worker-1")
            r = await two.get("/api/v1/tasks", headers=as_agent("worker-1", token))
            assert r.status_code == 200
            r = await one.delete("/api/v1/agents/worker-1/tokens", headers=admin())
            assert r.status_code == 204

            async def refused() -> bool:
                r = await two.get("/api/v1/tasks", headers=as_agent("worker-1", token))
                return r.status_code == 403

            await eventually(refused, "the other replica to refuse the revoked token")
    finally:
        await listener.stop()


async def test_without_notify_a_revocation_holds_within_the_cache_bound(
    pool: AsyncConnectionPool[Any], broker: Broker
) -> None:
    """A replica that hears no NOTIFY (no listener) trusts a verified token for at most
    auth.token_cache_ms (here 200 ms), then asks the database again."""
    deaf = Broker(Store(pool))
    async with (
        AsyncTestClient(app=create_app(settings("tokens"), broker)) as one,
        AsyncTestClient(app=create_app(settings("tokens", token_cache_ms=200), deaf)) as two,
    ):
        token = await issue(one, "worker-1")
        r = await two.get("/api/v1/tasks", headers=as_agent("worker-1", token))
        assert r.status_code == 200
        r = await one.delete("/api/v1/agents/worker-1/tokens", headers=admin())
        assert r.status_code == 204

        async def refused() -> bool:
            r = await two.get("/api/v1/tasks", headers=as_agent("worker-1", token))
            return r.status_code == 403

        await eventually(refused, "the revoked token to be refused after the cache bound")


async def test_dbas_issue_and_revoke_tokens_from_sql(
    db_url: str, pool: AsyncConnectionPool[Any], sql: Sql
) -> None:
    """psql's revocation reaches the replicas like the API's: by NOTIFY (the replica here caches
    tokens for far longer than the test waits)."""
    listener = Listener(db_url)
    await listener.start()
    try:
        app = create_app(
            settings("tokens", token_cache_ms=300_000), Broker(Store(pool), listener=listener),
            listener=listener,
        )
        async with AsyncTestClient(app=app) as client:
            row = sql.execute("SELECT dispatch.agent_token_issue('worker-9') AS token").fetchone()
            assert row is not None
            token = row["token"]
            assert token.startswith("dsp_") and len(token) == 68
            r = await client.get("/api/v1/tasks", headers=as_agent("worker-9", token))
            assert r.status_code == 200
            revoked = sql.execute("SELECT dispatch.agent_token_revoke('worker-9') AS n").fetchone()
            assert revoked == {"n": 1}

            async def refused() -> bool:
                r = await client.get("/api/v1/tasks", headers=as_agent("worker-9", token))
                return r.status_code == 403

            await eventually(refused, "the replica to refuse a token revoked from psql")
    finally:
        await listener.stop()
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("SELECT dispatch.agent_token_issue('..')")


async def test_open_mode_accepts_an_agents_own_token_and_refuses_others(
    open_client: httpx.AsyncClient, sql: Sql
) -> None:
    """So that agents can be given tokens before the switch to auth.mode tokens."""
    token = await issue(open_client, "worker-1")
    r = await open_client.get("/api/v1/tasks", headers=as_agent("worker-1"))
    assert r.status_code == 200  # open: X-Agent-ID alone is trusted
    r = await open_client.get("/api/v1/tasks", headers=as_agent("worker-1", token))
    assert r.status_code == 200
    r = await open_client.get("/api/v1/tasks", headers=as_agent("worker-2", token))
    assert r.status_code == 403
    r = await open_client.get("/api/v1/tasks", headers=as_agent("worker-1", "nonsense"))
    assert r.status_code == 403
    r = await open_client.get("/api/v1/stats", headers=as_agent("worker-1", token))
    assert r.status_code == 403


# -- ownership ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "tokens"])
async def test_an_agent_cannot_name_its_own_owner(broker: Broker, sql: Sql, mode: str) -> None:
    async with AsyncTestClient(app=create_app(settings(mode), broker)) as client:
        token = await issue(client, "worker-1") if mode == "tokens" else None
        me = as_agent("worker-1", token)
        before = counts(sql)
        # A new agent registering with an owner is refused and not created.
        r = await client.put("/api/v1/agents/worker-1", json={"owner": "alice"}, headers=me)
        assert r.status_code == 403, r.text
        assert counts(sql) == before
        r = await client.put("/api/v1/agents/worker-1", json={"capabilities": ["code"]}, headers=me)
        assert r.status_code == 200 and r.json()["owner"] is None
        row_before = sql.execute("SELECT * FROM dispatch.agents").fetchall()
        r = await client.put(
            "/api/v1/agents/worker-1",
            json={"owner": "alice", "capabilities": ["everything"]},
            headers=me,
        )
        assert r.status_code == 403
        assert sql.execute("SELECT * FROM dispatch.agents").fetchall() == row_before
        # Neither can another agent, even one alice's tasks already go to.
        r = await client.put("/api/v1/agents/worker-1", json={"owner": "alice"},
                             headers=as_agent("worker-2"))
        assert r.status_code in (401, 403)
        # An admin can; the agent then keeps it when it registers again.
        r = await client.put("/api/v1/agents/worker-1", json={"owner": "alice"}, headers=admin())
        assert r.status_code == 200 and r.json()["owner"] == "alice"
        r = await client.put("/api/v1/agents/worker-1", json={"status": "ready"}, headers=me)
        assert r.status_code == 200 and r.json()["owner"] == "alice"


# -- ids that a path would reinterpret ------------------------------------------------------------

DOT_IDS = ["%2e%2e", "%2E%2E", "%2e", ".", "..", "a%2F..", "..%2Fa", "a%2F.%2Fb"]


@pytest.mark.parametrize("raw", DOT_IDS)
async def test_dot_segment_agent_ids_are_refused_everywhere(
    client: httpx.AsyncClient, sql: Sql, raw: str
) -> None:
    before = counts(sql)
    calls = [
        ("PUT", f"/api/v1/agents/{raw}", {"capabilities": ["code"]}),
        ("POST", f"/api/v1/agents/{raw}/heartbeat", None),
        ("POST", f"/api/v1/agents/{raw}/drain", None),
        ("POST", f"/api/v1/agents/{raw}/undrain", None),
        ("POST", f"/api/v1/agents/{raw}/tokens", None),
        ("DELETE", f"/api/v1/agents/{raw}/tokens", None),
    ]
    for method, url, body in calls:
        for headers in (admin(), {"X-Agent-ID": ".."}):
            r = await client.request(method, url, json=body, headers=headers)
            assert 400 <= r.status_code < 500, (method, url, r.status_code, r.text)
    assert counts(sql) == before
    assert sql.execute("SELECT count(*) AS n FROM dispatch.agent_tokens").fetchone() == {"n": 0}


@pytest.mark.parametrize("agent_id", [".", "..", "a/..", "../a", "a/./b"])
async def test_dot_segment_ids_are_refused_as_callers_and_by_the_database(
    client: httpx.AsyncClient, sql: Sql, agent_id: str
) -> None:
    before = counts(sql)
    r = await client.post("/api/v1/tasks", json={"title": "t"}, headers={"X-Agent-ID": agent_id})
    assert r.status_code == 401
    assert counts(sql) == before
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("SELECT dispatch.agent_upsert(%s)", (agent_id,))
    # Dots elsewhere in an id are fine.
    r = await client.put("/api/v1/agents/worker...1", json={}, headers=admin())
    assert r.status_code == 200
