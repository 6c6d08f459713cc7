"""The dashboard in a real headless Chromium against a real `dispatch serve` (on the defaults, with
an admin token): sign-in, live overview, drain/undrain changing what the assigner does, a task's
timeline and explain updating live, cancel and requeue. Each test saves a screenshot of the page it
exercised (tests/ui/conftest.py: screenshot_dir)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, expect

from tests import poll
from tests.serve import ServeProcess
from tests.ui.conftest import ADMIN_TOKEN, require_chromium

require_chromium()

# Generous: two cores shared with other test runs; every wait polls a condition.
DEADLINE = 30.0


async def until(check: Callable[[], Awaitable[Any]], what: str, deadline: float = DEADLINE) -> Any:
    return await poll.until(check, what, deadline, every=0.1)


async def sign_in(page: Page, server: ServeProcess) -> None:
    await page.goto(f"{server.api}/ui/login")
    await page.fill("#token", ADMIN_TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{server.api}/ui")


async def mark_page(page: Page) -> None:
    """A marker that a reload or navigation would lose."""
    await page.evaluate("window.__sameDocument = true")


async def assert_not_reloaded(page: Page) -> None:
    assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"


async def register(
    rest: httpx.AsyncClient, agent_id: str, caps: list[str], limit: int = 10
) -> None:
    r = await rest.put(f"/api/v1/agents/{agent_id}", headers={"X-Agent-ID": agent_id},
                       json={"capabilities": caps, "max_concurrent": limit})
    assert r.status_code == 200, r.text


async def create(rest: httpx.AsyncClient, title: str, scope: str, **extra: Any) -> dict[str, Any]:
    r = await rest.post("/api/v1/tasks", json={"title": title, "scope": scope, **extra},
                        headers={"X-Agent-ID": "alice"})
    assert r.status_code == 201, r.text
    task: dict[str, Any] = r.json()
    return task


async def get_task(rest: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = (await rest.get(f"/api/v1/tasks/{task_id}")).json()
    return task


async def test_sign_in(page: Page, server: ServeProcess, screenshot_dir: Path) -> None:
    # Every page sends a browser without a session to the sign-in form.
    for path in ("/ui", "/ui/agents", "/ui/tasks"):
        await page.goto(f"{server.api}{path}")
        assert page.url == f"{server.api}/ui/login"
    await page.fill("#token", "not-the-token")
    await page.click("button[type=submit]")
    await expect(page.get_by_role("alert")).to_have_text("That is not the admin token.")
    await page.fill("#token", "")
    await page.screenshot(path=screenshot_dir / "login.png")
    await page.fill("#token", ADMIN_TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{server.api}/ui")
    await expect(page.locator("h1")).to_have_text("Overview")
    # The session cookie is out of the page's scripts' reach.
    assert await page.evaluate("document.cookie") == ""
    await page.click("text=Sign out")
    await page.wait_for_url(f"{server.api}/ui/login")
    await page.goto(f"{server.api}/ui/agents")
    assert page.url == f"{server.api}/ui/login"


async def test_overview_follows_new_tasks_without_a_reload(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    # Some history for the charts: tasks an agent completed and one that failed for good.
    await register(rest, "worker-1", ["code"], limit=5)
    done = [await create(rest, f"build {i}", "code", max_retries=0) for i in range(5)]
    for i, task in enumerate(done):
        tid = task["task_id"]
        await until(lambda tid=tid: _assigned(rest, tid), f"{tid} assigned")
        agent = {"X-Agent-ID": "worker-1"}
        assert (await rest.post(f"/api/v1/tasks/{tid}/start", headers=agent)).status_code == 200
        if i == 0:
            r = await rest.post(f"/api/v1/tasks/{tid}/fail", headers=agent,
                                json={"error": "boom", "retry_eligible": False})
        else:
            r = await rest.post(f"/api/v1/tasks/{tid}/complete", headers=agent,
                                json={"result": {"ok": i}})
        assert r.status_code == 200, r.text

    await sign_in(page, server)
    pending = page.locator('[data-status="pending"]')
    completed = page.locator('[data-status="completed"]')
    await expect(pending).to_have_text("0")
    await expect(completed).to_have_text("4")
    await expect(page.locator("#dead-letters")).to_have_text("1")
    await expect(page.locator("#live-status")).to_have_text("live")
    await mark_page(page)

    # Nobody can do "write": these stay pending, and the page shows them as they arrive.
    for i in range(3):
        await create(rest, f"essay {i}", "write")
    await expect(pending).to_have_text("3")
    await assert_not_reloaded(page)
    await expect(page.locator("#oldest-pending")).not_to_have_text("none")
    # By capability: "write" has three waiting and no agent that could take them.
    write = page.locator('#overview-queues tr[data-capability="write"]')
    await expect(write.locator("td").nth(1)).to_have_text("3")
    await expect(write.locator("td").nth(4)).to_contain_text("no agent")
    await expect(write).to_have_class("short")
    # The charts drew the completed and failed minutes.
    assert await page.locator("#overview-charts rect.done").count() == 60
    await page.screenshot(path=screenshot_dir / "overview.png", full_page=True)


async def _assigned(rest: httpx.AsyncClient, task_id: str) -> bool:
    return (await get_task(rest, task_id))["status"] == "assigned"


async def _assignees(rest: httpx.AsyncClient, tasks: list[dict[str, Any]]) -> list[str] | None:
    now = [await get_task(rest, t["task_id"]) for t in tasks]
    if any(t["assigned_agent"] is None for t in now):
        return None
    return [t["assigned_agent"] for t in now]


async def _row_button(page: Page, agent_id: str, label: str) -> None:
    row = page.locator(f'tr[data-agent="{agent_id}"]')
    await row.get_by_role("button", name=label).click()
    await expect(row.get_by_role("button", name="Undrain" if label == "Drain" else "Drain"))\
        .to_be_visible()


async def test_drain_and_undrain_from_the_agents_page(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await register(rest, "alpha", ["code"])
    await register(rest, "beta", ["code"])
    await sign_in(page, server)
    await page.click("nav >> text=Agents")
    await expect(page.locator('tr[data-agent="alpha"]')).to_be_visible()

    await _row_button(page, "alpha", "Drain")
    await expect(page.locator('tr[data-agent="alpha"] .badge.drained')).to_be_visible()
    batch = [await create(rest, f"drained {i}", "code") for i in range(4)]
    assert await until(lambda: _assignees(rest, batch), "the batch assigned") == ["beta"] * 4

    # Undrain alpha and drain beta: now only alpha may take work.
    await _row_button(page, "alpha", "Undrain")
    await _row_button(page, "beta", "Drain")
    batch = [await create(rest, f"undrained {i}", "code") for i in range(3)]
    assert await until(lambda: _assignees(rest, batch), "the batch assigned") == ["alpha"] * 3
    agents = {a["agent_id"]: a for a in (await rest.get("/api/v1/agents")).json()}
    assert not agents["alpha"]["drained"] and agents["beta"]["drained"]
    # The load column followed the assignments.
    await expect(page.locator('tr[data-agent="alpha"] .load')).to_have_text("3/10")
    await page.screenshot(path=screenshot_dir / "agents.png", full_page=True)


async def test_task_page_timeline_and_explain_update_live(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await register(rest, "writer", ["write"])
    task = await create(rest, "fix the build", "code", description="CI is red on main")
    tid = task["task_id"]
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks/{tid}")
    await expect(page.locator("#task-status")).to_have_text("pending")
    await expect(page.locator("#live-status")).to_have_text("live")
    timeline = page.locator("#task-timeline li .event")
    await expect(timeline).to_have_text(["created"])
    # Explain: the one agent is excluded, and says why.
    writer = page.locator('tr[data-candidate="writer"]')
    await expect(writer).to_have_class("excluded")
    await expect(writer.locator(".reasons")).to_contain_text("capabilit")
    await mark_page(page)

    # An agent that can do it registers: the assigner gives it the task; the page follows.
    await register(rest, "coder", ["code", "review"], limit=2)
    await expect(page.locator("#task-status")).to_have_text("assigned")
    await expect(page.locator("#task-agent")).to_have_text("coder")
    await expect(timeline).to_have_text(["created", "assigned"])
    coder = page.locator('tr[data-candidate="coder"]')
    await expect(coder).to_have_class("holder")
    await expect(coder.locator("td").nth(5)).to_have_text("1/2")

    agent = {"X-Agent-ID": "coder"}
    assert (await rest.post(f"/api/v1/tasks/{tid}/progress", headers=agent,
                            json={"percent": 60, "message": "compiling"})).status_code == 200
    await expect(page.locator("#task-progress")).to_contain_text("compiling")
    r = await rest.post(f"/api/v1/tasks/{tid}/complete", headers=agent,
                        json={"result": {"fixed": "yes, in abc123"}})
    assert r.status_code == 200
    await expect(page.locator("#task-status")).to_have_text("completed")
    await expect(page.locator("#task-result")).to_contain_text("abc123")
    await expect(timeline).to_have_text(["created", "assigned", "started", "progress",
                                         "completed"])
    await assert_not_reloaded(page)
    await page.screenshot(path=screenshot_dir / "task.png", full_page=True)


async def test_a_blocked_task_shows_what_it_waits_for_and_runs_when_it_completes(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    first = await create(rest, "collect the logs", "collect")
    merged = await create(rest, "summarise the logs", "summarise",
                          depends_on=[first["task_id"]])
    assert merged["status"] == "blocked"
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks/{merged['task_id']}")
    await expect(page.locator("#task-status")).to_have_text("blocked")
    deps = page.locator("#task-dependencies")
    await expect(deps).to_contain_text("Depends on (1 to complete)")
    await expect(deps.locator("li")).to_have_text(["pending collect the logs"])
    await expect(page.locator("#task-explain .held")).to_contain_text(
        f"waiting for 1 of its dependencies to complete: {first['task_id']} (pending)")
    await page.screenshot(path=screenshot_dir / "task-blocked.png", full_page=True)
    await mark_page(page)

    # The dependency completes: the page follows, the task is pending and can be taken.
    r = await rest.post(f"/api/v1/tasks/{first['task_id']}/complete",
                        headers={"X-Agent-ID": "alice"}, json={"result": {"lines": 42}})
    assert r.status_code == 200, r.text
    await expect(page.locator("#task-status")).to_have_text("pending")
    await expect(deps.locator("li")).to_have_text(["completed collect the logs"])
    await expect(page.locator("#task-timeline li .event")).to_have_text(
        ["created", "blocked", "unblocked"])
    await page.click("text=collect the logs")
    await page.wait_for_url(f"{server.api}/ui/tasks/{first['task_id']}")
    await expect(page.locator("#task-dependencies")).to_contain_text("Waited for by")


async def test_approve_and_review_from_the_task_page(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await register(rest, "writer", ["write"])
    task = await create(rest, "write the announcement", "write", approval="both")
    tid = task["task_id"]
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks/{tid}")
    await expect(page.locator("#task-status")).to_have_text("blocked")
    await expect(page.locator("#task-explain .held")).to_contain_text("waiting for approval")
    await page.click("#approve")
    # Approved: the assigner gives it to the writer, who completes it; the result waits.
    await expect(page.locator("#task-status")).to_have_text("assigned")
    await expect(page.locator("#task-gate")).to_contain_text("approved by admin")
    writer = {"X-Agent-ID": "writer"}
    assert (await rest.post(f"/api/v1/tasks/{tid}/start", headers=writer)).status_code == 200
    r = await rest.post(f"/api/v1/tasks/{tid}/complete", headers=writer,
                        json={"result": {"text": "We are live."}})
    assert r.json()["status"] == "review"
    await expect(page.locator("#task-status")).to_have_text("review")
    await expect(page.locator("#task-result")).to_contain_text("We are live.")
    await page.screenshot(path=screenshot_dir / "task-review.png", full_page=True)
    await page.fill("#feedback", "say when, too")
    await page.click("#request-changes")
    await expect(page.locator("#task-feedback")).to_have_text("say when, too")
    assert (await get_task(rest, tid))["retry_count"] == 1
    # The writer's next attempt is accepted from the page.
    async def given_again() -> bool:
        return (await get_task(rest, tid))["status"] == "assigned"
    await until(given_again, "the second attempt assigned")
    assert (await rest.post(f"/api/v1/tasks/{tid}/start", headers=writer)).status_code == 200
    await rest.post(f"/api/v1/tasks/{tid}/complete", headers=writer,
                    json={"result": {"text": "We are live today at noon."}})
    await expect(page.locator("#task-status")).to_have_text("review")
    await page.click("#accept")
    await expect(page.locator("#task-status")).to_have_text("completed")
    assert (await get_task(rest, tid))["result"] == {"text": "We are live today at noon."}


async def test_signal_a_suspended_task_from_its_page(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient
) -> None:
    await register(rest, "booker", ["book"])
    task = await create(rest, "book the venue", "book")
    tid = task["task_id"]
    booker = {"X-Agent-ID": "booker"}

    async def assigned() -> bool:
        return (await get_task(rest, tid))["status"] == "assigned"
    await until(assigned, "the task assigned to the booker")
    assert (await rest.post(f"/api/v1/tasks/{tid}/start", headers=booker)).status_code == 200
    r = await rest.post(f"/api/v1/tasks/{tid}/suspend", headers=booker,
                        json={"waiting_for": "which date suits", "timeout_seconds": 3600})
    assert r.status_code == 200, r.text
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks/{tid}")
    await expect(page.locator("#task-status")).to_have_text("suspended")
    await expect(page.locator("#task-waiting-for")).to_contain_text("which date suits")
    await page.fill("#signal-payload", "not json")
    await page.click("#signal")
    await expect(page.locator("body")).to_contain_text("not JSON")
    await page.goto(f"{server.api}/ui/tasks/{tid}")
    await page.fill("#signal-payload", '{"date": "2027-03-01"}')
    # The summary is redrawn live (its times tick): what was typed, and the cursor, survive it.
    await page.evaluate("document.getElementById('task-status').__before = true")
    await page.wait_for_function(
        "document.getElementById('task-status').__before === undefined", timeout=DEADLINE * 1000)
    await expect(page.locator("#signal-payload")).to_have_value('{"date": "2027-03-01"}')
    await expect(page.locator("#signal-payload")).to_be_focused()
    await page.click("#signal")
    await expect(page.locator("#task-status")).to_have_text("assigned")
    await expect(page.locator("#task-signal")).to_contain_text("2027-03-01")
    assert (await get_task(rest, tid))["assigned_agent"] == "booker"


async def test_cancel_and_requeue_from_the_task_page(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    task = await create(rest, "translate the docs", "translate", priority=7)
    for i in range(4):
        await create(rest, f"other {i}", "translate")
    tid = task["task_id"]
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks?status=pending&capability=translate")
    await expect(page.locator("tr[data-task]")).to_have_count(5)
    await page.screenshot(path=screenshot_dir / "tasks.png", full_page=True)
    await page.click("text=translate the docs")
    await page.wait_for_url(f"{server.api}/ui/tasks/{tid}")

    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.click("#cancel")
    await expect(page.locator("#task-status")).to_have_text("cancelled")
    cancelled = await get_task(rest, tid)
    assert cancelled["status"] == "cancelled"
    events = (await rest.get(f"/api/v1/tasks/{tid}/events")).json()
    assert events[-1]["event"] == "cancelled" and events[-1]["actor"] == "admin"

    await page.click("#requeue")
    await expect(page.locator("#task-status")).to_have_text("pending")
    assert (await get_task(rest, tid))["status"] == "pending"
    # The other tasks were not touched.
    others = (await rest.get("/api/v1/tasks", params={"status": "pending"})).json()
    assert len(others) == 5


async def test_the_api_docs_render_with_no_other_host_reachable(
    page: Page, server: ServeProcess, screenshot_dir: Path
) -> None:
    """Every request to another host is refused: Swagger UI still renders the operations."""
    outside: list[str] = []

    async def only_this_server(route: Any) -> None:
        if route.request.url.startswith(server.api):
            await route.continue_()
        else:
            outside.append(route.request.url)
            await route.abort()

    await page.route("**/*", only_this_server)
    await page.goto(f"{server.api}/schema/swagger")
    await expect(page.locator(".opblock").first).to_be_visible(timeout=DEADLINE * 1000)
    assert await page.locator(".opblock").count() > 20
    assert outside == []
    await page.screenshot(path=screenshot_dir / "api-docs.png")
