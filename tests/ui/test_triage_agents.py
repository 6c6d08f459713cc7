"""An agent's page and the overview's flow-control panel, in a real headless Chromium against a
real `dispatch serve`: what an agent holds and ended, its failure rate and mean run time, drain
and undrain from its page changing what the assigner gives it; which flow rules hold work back."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import psycopg
from playwright.async_api import Page, expect

from tests.serve import ServeProcess
from tests.ui.conftest import require_chromium
from tests.ui.test_browser import (
    assert_not_reloaded,
    create,
    get_task,
    mark_page,
    register,
    sign_in,
    until,
)

require_chromium()


async def claim(rest: httpx.AsyncClient, agent: str, tid: str) -> None:
    r = await rest.post("/api/v1/tasks/claim", headers={"X-Agent-ID": agent},
                        json={"start": True, "wait_seconds": 10})
    assert r.status_code == 200 and r.json()["task_id"] == tid, r.text


async def test_an_agents_page_shows_its_work_and_drains_it(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    agent_id = "team-a:builder@1"  # an id with the characters a path would mangle
    headers = {"X-Agent-ID": agent_id}
    await register(rest, agent_id, ["build"], limit=1)
    first = await create(rest, "build the release", "build", max_retries=0)
    await claim(rest, agent_id, first["task_id"])

    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/agents")
    await page.click(f'tr[data-agent="{agent_id}"] a')
    await page.wait_for_url(re.compile(r"/ui/agent\?id="))
    await expect(page.locator("h1")).to_have_text(f"Agent {agent_id}")
    await expect(page.locator("#live-status")).to_have_text("live")
    current = page.locator(".agent-current tbody tr")
    await expect(current).to_have_count(1)
    await expect(current.first).to_contain_text("build the release")
    await expect(current.first).to_contain_text("running")
    await expect(page.locator("#agent-failure-rate")).to_have_text("none ended")
    await mark_page(page)

    # One completion and one failure: both listed with their outcome, the failure's error, a
    # failure rate of 50 % and a mean run time, without a reload.
    r = await rest.post(f"/api/v1/tasks/{first['task_id']}/complete", headers=headers,
                        json={"result": {"ok": True}})
    assert r.status_code == 200, r.text
    second = await create(rest, "build the docs", "build", max_retries=0)
    await claim(rest, agent_id, second["task_id"])
    r = await rest.post(f"/api/v1/tasks/{second['task_id']}/fail", headers=headers,
                        json={"error": "sphinx: 3 warnings treated as errors"})
    assert r.status_code == 200, r.text
    recent = page.locator(".agent-recent tbody tr")
    await expect(recent).to_have_count(2)
    await expect(recent.nth(0)).to_contain_text("build the docs")
    await expect(recent.nth(0).locator(".badge")).to_have_text("failed")
    await expect(recent.nth(0).locator("td.error")).to_have_text(
        "sphinx: 3 warnings treated as errors")
    await expect(recent.nth(1).locator(".badge")).to_have_text("completed")
    await expect(page.locator("#agent-failure-rate")).to_have_text("50 %")
    await expect(page.locator("#agent-ended")).to_have_text("1 completed, 1 failed")
    await expect(page.locator("#agent-mean-run")).to_have_text(re.compile(r"^\d+ s$"))
    await expect(page.locator("#agent-idle")).to_be_visible()
    await assert_not_reloaded(page)
    await page.screenshot(path=screenshot_dir / "agent.png", full_page=True)

    # Drain from its page: it gets nothing new; undrain: it gets the waiting task.
    await page.click("#agent-drain")
    await page.wait_for_url(re.compile(r"/ui/agent\?id="))
    await expect(page.locator("#agent-status .drained")).to_have_text("drained")
    waiting = await create(rest, "build again", "build")
    await page.wait_for_timeout(1500)  # rounds of the assigner pass it by
    assert (await get_task(rest, waiting["task_id"]))["status"] == "pending"
    await page.click("#agent-drain")
    await expect(page.locator("#agent-status .drained")).to_have_count(0)

    async def given() -> bool:
        return bool((await get_task(rest, waiting["task_id"]))["assigned_agent"] == agent_id)

    await until(given, "the undrained agent given the task")
    await expect(current).to_have_count(1)


async def test_an_agent_id_with_a_slash_has_its_page_and_an_unknown_one_is_a_404(
    page: Page, server: ServeProcess, db_url: str
) -> None:
    # Such ids come from the directory (Warren), not through the API's path.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT dispatch.agent_upsert('team/b', '{code}')")
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/agents")
    await page.click('tr[data-agent="team/b"] a')
    await expect(page.locator("h1")).to_have_text("Agent team/b")
    await expect(page.locator(".agent-facts")).to_contain_text("code")
    response = await page.goto(f"{server.api}/ui/agent?id=nobody")
    assert response is not None and response.status == 404
    response = await page.goto(f"{server.api}/ui/agent?id=")
    assert response is not None and response.status == 400


async def test_the_overview_shows_what_flow_control_holds_back(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await sign_in(page, server)
    await expect(page.locator("#flow-off")).to_contain_text("Flow control is off")
    await mark_page(page)

    r = await rest.put("/api/v1/limits/concurrency/repo-x", json={"max_active": 1})
    assert r.status_code == 200, r.text
    r = await rest.put("/api/v1/limits/rate/llm", json={"capacity": 1, "refill_per_second": 0.001})
    assert r.status_code == 200, r.text
    await register(rest, "flow-worker", ["lint"], limit=10)
    for i in range(3):
        await create(rest, f"lint {i}", "lint", concurrency_key="repo-x")
    for i in range(3):
        await create(rest, f"ask {i}", "lint", rate_key="llm")

    concurrency = page.locator('.flow-concurrency tr[data-key="repo-x"]')
    await expect(concurrency).to_contain_text("1/1")
    await expect(concurrency.locator(".badge")).to_have_text("at its cap")
    await expect(concurrency.locator("td").nth(2)).to_have_text("2")
    rate = page.locator('.flow-rate tr[data-key="llm"]')
    await expect(rate.locator("td").nth(3)).to_have_text("2")
    await expect(rate.locator("td").nth(1)).to_contain_text("of 1")
    # Tenants with work waiting, while flow control is on.
    await expect(page.locator('.by-tenant tr[data-tenant="alice"]')).to_be_visible()
    await assert_not_reloaded(page)
    await page.screenshot(path=screenshot_dir / "overview-flow.png", full_page=True)
