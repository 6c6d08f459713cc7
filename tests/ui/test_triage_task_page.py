"""The task page as a triage tool, in a real headless Chromium against a real `dispatch serve`:
the timeline says what happened in each line (the error of a failure without a click, failures
drawn as failures, a run of progress reports folded into one line that opens), explain says who
holds a running task instead of calling its holder full, and times read one way throughout."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
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

# Every relative time and every length of time on a page, as the dashboard writes them.
RELATIVE = re.compile(r"^(\d+ (s|min|h|d) ago|in \d+ (s|min|h|d)|never)$")


async def progress(rest: httpx.AsyncClient, tid: str, agent: str, n: int, message: str) -> None:
    r = await rest.post(f"/api/v1/tasks/{tid}/progress", headers={"X-Agent-ID": agent},
                        json={"percent": n, "message": f"{message} {n}"})
    assert r.status_code == 200, r.text


async def test_the_timeline_shows_what_failed_and_folds_progress(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await register(rest, "etl-1", ["etl"], limit=1)
    task = await create(rest, "load the invoices", "etl", max_retries=0)
    tid = task["task_id"]
    agent = {"X-Agent-ID": "etl-1"}
    r = await rest.post("/api/v1/tasks/claim", headers=agent,
                        json={"start": True, "wait_seconds": 10})
    assert r.status_code == 200 and r.json()["task_id"] == tid, r.text
    for n in range(1, 13):
        await progress(rest, tid, "etl-1", n * 5, "rows loaded, batch")

    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks/{tid}")
    await expect(page.locator("#live-status")).to_have_text("live")
    events = page.locator("#task-timeline > ol > li")
    # Twelve reports are one line, saying the last one; it opens to list them all.
    await expect(events.locator(".event")).to_have_text(
        ["created", "assigned", "started", "progress"])
    folded = page.locator('#task-timeline li[data-event="progress"]')
    await expect(folded.locator("> .line .summary")).to_have_text("60 % rows loaded, batch 60")
    await expect(folded.locator("details.folded summary")).to_have_text("12 progress reports")
    await expect(folded.locator(".reports li")).to_have_count(12)
    await expect(folded.locator(".reports li").first).not_to_be_visible()
    await folded.locator("details.folded summary").click()
    first = folded.locator(".reports li").first
    await expect(first).to_have_text(re.compile(r"^5 % rows loaded, batch 5 "))
    assigned = page.locator('#task-timeline li[data-event="assigned"]')
    await expect(assigned.locator(".summary")).to_contain_text("to etl-1, attempt 1")
    await mark_page(page)

    # A report while the page is open joins the fold, which stays open.
    await progress(rest, tid, "etl-1", 65, "rows loaded, batch")
    await expect(folded.locator("details.folded summary")).to_have_text("13 progress reports")
    await expect(folded.locator(".reports li").nth(12)).to_be_visible()

    # The failure: its error on the page without a click, drawn as a failure, then the dead
    # letter it led to.
    r = await rest.post(f"/api/v1/tasks/{tid}/fail", headers=agent,
                        json={"error": "psycopg.OperationalError: disk full on /var/lib/etl"})
    assert r.status_code == 200, r.text
    failed = page.locator('#task-timeline li[data-event="failed"]')
    await expect(failed.locator(".event-error")).to_have_text(
        "psycopg.OperationalError: disk full on /var/lib/etl")
    await expect(failed.locator(".event-error")).to_be_visible()
    await expect(failed).to_have_class(re.compile(r"\bkind-bad\b"))
    dlq = page.locator('#task-timeline li[data-event="dlq"]')
    await expect(dlq).to_have_class(re.compile(r"\bkind-bad\b"))
    await expect(dlq.locator(".summary")).to_have_text(
        "dead letter: retries exhausted (no retries allowed)")
    created = page.locator('#task-timeline li[data-event="created"]')
    await expect(created).to_have_class(re.compile(r"\bkind-plain\b"))
    # The colours differ: a failure is not drawn like the rest.
    bad = await failed.locator(".event").evaluate("e => getComputedStyle(e).color")
    plain = await created.locator(".event").evaluate("e => getComputedStyle(e).color")
    assert bad != plain
    await assert_not_reloaded(page)
    assert (await get_task(rest, tid))["status"] == "failed"
    await page.screenshot(path=screenshot_dir / "task-failed.png", full_page=True)


async def test_explain_on_a_running_task_names_its_holder(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await register(rest, "solo", ["render"], limit=1)
    await register(rest, "spare", ["render"], limit=1)
    task = await create(rest, "render the report", "render")
    tid = task["task_id"]
    # The assigner gives it to one of the two; that one starts it and is then at its limit.
    async def assigned() -> str | None:
        agent: str | None = (await get_task(rest, tid))["assigned_agent"]
        return agent

    holder = await until(assigned, "the task assigned")
    other = "solo" if holder == "spare" else "spare"
    r = await rest.post(f"/api/v1/tasks/{tid}/start", headers={"X-Agent-ID": holder})
    assert r.status_code == 200, r.text
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks/{tid}")
    await expect(page.locator("#task-holder")).to_contain_text(f"{holder} holds it")
    await expect(page.locator("#task-holder")).to_contain_text("attempt 1")
    row = page.locator(f'tr[data-candidate="{holder}"]')
    await expect(row).to_have_class("holder")
    await expect(row.locator(".badge.holds")).to_have_text("holds it")
    await expect(row.locator(".reasons")).not_to_contain_text("limit")
    await expect(page.locator(f'tr[data-candidate="{other}"]')).to_have_class("eligible")
    # The holder row comes first.
    await expect(page.locator("table.explain tbody tr").first).to_have_attribute(
        "data-candidate", holder)
    await page.screenshot(path=screenshot_dir / "task-explain.png", full_page=True)


async def test_times_read_one_way_on_every_page(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient
) -> None:
    await register(rest, "clock", ["tick"])
    task = await create(rest, "keep time", "tick")
    tid = task["task_id"]
    r = await rest.post("/api/v1/tasks/claim", headers={"X-Agent-ID": "clock"},
                        json={"start": True, "wait_seconds": 10})
    assert r.status_code == 200 and r.json()["task_id"] == tid, r.text
    await progress(rest, tid, "clock", 10, "ticking")
    await sign_in(page, server)
    for path in ("/ui", "/ui/agents", "/ui/tasks", f"/ui/tasks/{tid}"):
        await page.goto(f"{server.api}{path}")
        shown = [t.strip() for t in await page.locator("time").all_inner_texts()]
        shown += [t.strip() for t in await page.locator("td[title]").all_inner_texts()
                  if re.search(r"\d+ (s|min|h|d)\b", t)]
        for text in shown:
            if text:
                assert RELATIVE.match(text), (path, text)
        # No count of seconds past a minute ("118 s"): the unit grows instead.
        body = await page.locator("main").inner_text()
        assert not re.search(r"\b([6-9]\d|\d{3,}) s\b", body), (path, body)
    # The absolute time is one hover away, in one format.
    title = await page.locator("#task-timeline time").first.get_attribute("title")
    assert title is not None and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", title)
