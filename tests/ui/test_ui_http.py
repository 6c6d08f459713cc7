"""The dashboard over plain HTTP against a real `dispatch serve`: nothing answers without the
sign-in, bad input is a clear 4xx page, filters and pagination work. No browser needed."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from dispatch.broker import Broker
from dispatch.models import NewTask
from dispatch.service import web_app
from dispatch.settings import ServerSettings, Settings
from tests.serve import ServeProcess, serving
from tests.ui.conftest import ADMIN_TOKEN, sign_in
from tests.ui.test_live import Stream, until

PAGES = ["/ui", "/ui/", "/ui/agents", "/ui/tasks", "/ui/tasks?status=pending",
         f"/ui/tasks/{uuid.uuid4()}"]
OTHERS = ["/ui/static/dispatch.css", "/ui/static/dispatch.js", "/ui/events?topic=overview",
          f"/ui/events?topic=task:{uuid.uuid4()}"]
ACTIONS = [f"/ui/tasks/{uuid.uuid4()}/cancel", f"/ui/tasks/{uuid.uuid4()}/requeue",
           f"/ui/tasks/{uuid.uuid4()}/decide",
           "/ui/agents/drain", "/ui/agents/undrain", "/ui/agents/delete", "/ui/logout"]


async def test_nothing_answers_without_a_session(server: ServeProcess) -> None:
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as anon:
        for cookie in (None, "4102444800.forged", "4102444800." + "0" * 64, "x" * 500):
            if cookie is not None:
                anon.cookies.set("dispatch_ui", cookie)
            for url in PAGES:
                r = await anon.get(url)
                assert r.status_code == 303, (url, cookie, r.status_code)
                assert r.headers["location"] == "/ui/login"
            for url in OTHERS:
                r = await anon.get(url)
                assert r.status_code == 401, (url, cookie, r.status_code)
                assert "dispatch.css" not in r.text and "EventSource" not in r.text
            for url in ACTIONS:
                r = await anon.post(url, data={"agent_id": "a1"})
                assert r.status_code == 401, (url, cookie, r.status_code)
        # The sign-in form is the one page that answers, with its CSS inline.
        r = await anon.get("/ui/login")
        assert r.status_code == 200 and "<style>" in r.text and 'name="token"' in r.text


async def test_sign_in_sets_a_cookie_that_is_not_the_token(server: ServeProcess) -> None:
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as client:
        for wrong in ("", "nope", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1]):
            r = await client.post("/ui/login", data={"token": wrong})
            assert r.status_code == 403
            assert "not the admin token" in r.text
            assert "dispatch_ui" not in client.cookies
        r = await client.post("/ui/login", data={"token": ADMIN_TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/ui"
        set_cookie = r.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert "path=/ui" in set_cookie
        cookie = client.cookies["dispatch_ui"]
        assert ADMIN_TOKEN not in cookie
        assert (await client.get("/ui")).status_code == 200
        assert (await client.get("/ui/static/dispatch.js")).status_code == 200
        # Sign out: the cookie is gone, the pages redirect again.
        r = await client.post("/ui/logout")
        assert r.status_code == 303
        assert (await client.get("/ui")).status_code == 303


async def test_a_session_ends_when_the_admin_token_changes(
    db_url: str, tmp_path: Path, server: ServeProcess
) -> None:
    (tmp_path / "other").mkdir()
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as client:
        await sign_in(client)
        cookie = client.cookies["dispatch_ui"]
    with serving(db_url, tmp_path / "other", admin_token="another-token") as other:
        async with httpx.AsyncClient(base_url=other.api, timeout=10) as client:
            client.cookies.set("dispatch_ui", cookie)
            assert (await client.get("/ui")).status_code == 303
        # The replica that started with the new token ended the old token's sessions in the
        # database: the one still running with the old token refuses the cookie too.
        async with httpx.AsyncClient(base_url=server.api, timeout=10) as client:
            client.cookies.set("dispatch_ui", cookie)
            assert (await client.get("/ui")).status_code == 303


async def test_sign_out_ends_the_session_on_every_replica(
    db_url: str, tmp_path: Path, server: ServeProcess
) -> None:
    (tmp_path / "other").mkdir()
    with serving(db_url, tmp_path / "other", admin_token=ADMIN_TOKEN) as other:
        async with (
            httpx.AsyncClient(base_url=server.api, timeout=10) as here,
            httpx.AsyncClient(base_url=other.api, timeout=httpx.Timeout(10, read=None)) as there,
        ):
            await sign_in(here)
            # A copy of the cookie, used on the other replica: a live session there too, with a
            # live stream.
            copy = here.cookies["dispatch_ui"]
            there.cookies.set("dispatch_ui", copy)
            assert (await there.get("/ui")).status_code == 200
            stream = Stream()
            follower = asyncio.create_task(stream.follow(there))
            try:
                await until(lambda: bool(stream.updates), "the copied cookie's stream updated")
                # Sign out on the first replica.
                r = await here.post("/ui/logout")
                assert r.status_code == 303
                assert "dispatch_ui" not in here.cookies
                # The copy no longer works anywhere, and its open stream ends.
                for client in (here, there):
                    client.cookies.clear()
                    client.cookies.set("dispatch_ui", copy)
                    assert (await client.get("/ui")).status_code == 303
                    assert (await client.get("/ui/static/dispatch.js")).status_code == 401
                    r = await client.post("/ui/agents/drain", data={"agent_id": "a1"})
                    assert r.status_code == 401
                await until(lambda: stream.ended, "the copied cookie's stream ended", 20)
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            # Signing in again is a new session.
            here.cookies.clear()
            await sign_in(here)
            assert (await here.get("/ui")).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
async def test_cross_site_posts_are_refused(
    ui: httpx.AsyncClient, rest: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    await rest.put("/api/v1/agents/a1", json={"capabilities": ["code"]})
    r = await ui.post("/ui/agents/drain", data={"agent_id": "a1"}, headers=headers)
    assert r.status_code == 403
    assert not any(a["drained"] for a in (await rest.get("/api/v1/agents")).json())
    r = await ui.post("/ui/login", data={"token": ADMIN_TOKEN}, headers=headers)
    assert r.status_code == 403
    # The same POST from the dashboard's own page goes through.
    own = {"Origin": str(ui.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"}
    r = await ui.post("/ui/agents/drain", data={"agent_id": "a1"}, headers=own)
    assert r.status_code == 303


async def test_bad_input_is_a_clear_4xx_page(
    ui: httpx.AsyncClient, rest: httpx.AsyncClient
) -> None:
    cases = [
        ("get", "/ui/tasks/not-a-uuid", 400, "must be a UUID"),
        ("get", f"/ui/tasks/{uuid.uuid4()}", 404, "not found"),
        ("get", "/ui/tasks?status=bogus", 400, "bogus"),
        ("get", "/ui/tasks?cursor=garbage", 400, "cursor"),
        ("get", "/ui/tasks?requester=" + "x" * 300, 400, "at most 256"),
        ("get", "/ui/static/../../etc/passwd", 404, ""),
        ("get", "/ui/static/nothing.js", 404, "no asset"),
        ("get", "/ui/events?topic=bogus", 400, "topic"),
        ("get", "/ui/events?topic=task:nope", 400, "UUID"),
        ("post", f"/ui/tasks/{uuid.uuid4()}/cancel", 404, "not found"),
        ("post", "/ui/tasks/nope/cancel", 400, "UUID"),
        ("post", f"/ui/tasks/{uuid.uuid4()}/requeue", 404, "not found"),
        ("post", "/ui/agents/drain", 400, "agent_id"),
        ("post", "/ui/agents/undrain?agent_id=x", 400, "agent_id"),
    ]
    for method, url, status, words in cases:
        r = await ui.request(method, url)
        assert r.status_code == status, (url, r.status_code, r.text[:300])
        assert words in r.text, (url, r.text[:300])
    r = await ui.post("/ui/agents/drain", data={"agent_id": "nobody"})
    assert r.status_code == 404 and "nobody" in r.text
    # A task that cannot be requeued (pending) is a 409 page, and nothing changed.
    task = (await rest.post("/api/v1/tasks", json={"title": "t", "scope": "nothing"})).json()
    r = await ui.post(f"/ui/tasks/{task['task_id']}/requeue")
    assert r.status_code == 409
    events = (await rest.get(f"/api/v1/tasks/{task['task_id']}/events")).json()
    assert [e["event"] for e in events] == ["created"]


async def test_task_filters_and_cursor_pagination(
    ui: httpx.AsyncClient, rest: httpx.AsyncClient
) -> None:
    for i in range(55):
        r = await rest.post("/api/v1/tasks", json={"title": f"alice {i}", "scope": "code"},
                            headers={"X-Agent-ID": "alice"})
        assert r.status_code == 201
    for i in range(3):
        await rest.post("/api/v1/tasks", json={"title": f"bob {i}", "scope": "write"},
                        headers={"X-Agent-ID": "bob"})
    first = await ui.get("/ui/tasks")
    assert first.status_code == 200
    assert first.text.count("data-task=") == 50
    assert 'id="next-page"' in first.text
    next_url = first.text.split('id="next-page" href="')[1].split('"')[0].replace("&amp;", "&")
    second = await ui.get(next_url)
    assert second.text.count("data-task=") == 8
    assert 'id="next-page"' not in second.text
    seen = {line.split('data-task="')[1][:36] for page in (first, second)
            for line in page.text.splitlines() if 'data-task="' in line}
    assert len(seen) == 58
    bob = await ui.get("/ui/tasks", params={"requester": "bob"})
    assert bob.text.count("data-task=") == 3 and "alice 0" not in bob.text
    writes = await ui.get("/ui/tasks", params={"capability": "write", "status": "pending"})
    assert writes.text.count("data-task=") == 3
    assert (await ui.get("/ui/tasks", params={"status": "completed"})).text.count(
        "data-task=") == 0


async def test_every_page_in_process_without_warnings(broker: Broker) -> None:
    # The app in this process, where the suite turns every warning into an error (a deprecated
    # declaration in a handler, say), which a `serve` subprocess would only log.
    settings = Settings(server=ServerSettings(admin_token=ADMIN_TOKEN))
    task, _ = await broker.submit(NewTask(title="in process"), requester="alice")
    await broker.agents.upsert("a1", capabilities=["code"])
    async with AsyncTestClient(app=web_app(settings, broker)) as client:
        r = await client.post("/ui/login", data={"token": ADMIN_TOKEN}, follow_redirects=False)
        assert r.status_code == 303
        for url in ("/ui", "/ui/agents", "/ui/tasks?status=pending", f"/ui/tasks/{task.task_id}",
                    "/ui/static/dispatch.css", "/ui/login"):
            r = await client.get(url)
            assert r.status_code == 200, (url, r.text[:300])
        r = await client.post(f"/ui/tasks/{task.task_id}/cancel", follow_redirects=False)
        assert r.status_code == 303
        assert (await broker.tasks.get(task.task_id)).status == "cancelled"
        # An agent without work has a Delete button; it removes the agent.
        page = (await client.get("/ui/agents")).text
        assert 'action="/ui/agents/delete"' in page
        r = await client.post("/ui/agents/delete", data={"agent_id": "a1"},
                              follow_redirects=False)
        assert r.status_code == 303
        assert "a1" not in {a.agent_id for a in await broker.agents.all()}
        r = await client.post("/ui/agents/delete", data={"agent_id": "a1"})
        assert r.status_code == 404 and "agent a1 not found" in r.text


async def test_no_page_may_be_framed(server: ServeProcess, ui: httpx.AsyncClient) -> None:
    def framing_denied(r: httpx.Response) -> bool:
        return (r.headers.get("x-frame-options") == "DENY"
                and r.headers.get("content-security-policy") == "frame-ancestors 'none'")

    async with httpx.AsyncClient(base_url=server.api, timeout=10) as anon:
        answers = [await anon.get(url) for url in ["/ui/login", *PAGES, *OTHERS, "/ui/nope",
                                                     "/schema/swagger", "/", "/api/v1/tasks"]]
        answers.append(await anon.post("/ui/login", data={"token": "wrong"}))
    answers += [await ui.get(url) for url in ["/ui", "/ui/agents", "/ui/tasks",
                                              f"/ui/tasks/{uuid.uuid4()}", "/ui/tasks/x",
                                              "/ui/static/dispatch.js"]]
    async with ui.stream("GET", "/ui/events", params={"topic": "overview"}) as stream:
        answers.append(stream)
    statuses = {r.status_code for r in answers}
    assert {200, 303, 401, 403, 404, 400} <= statuses, statuses
    for r in answers:
        assert framing_denied(r), (r.url, r.status_code, dict(r.headers))
