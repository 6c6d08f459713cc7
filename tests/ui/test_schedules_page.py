"""The dashboard's schedules in a real headless Chromium against a real `dispatch serve`: the list
with next fires, following the scheduler live; a schedule's page with its template and tasks,
updating live; run now, pause and resume (as the API resumes: the next fire at once, and a
schedule the scheduler paused for an unreadable expression refused, saying why); and the routes'
refusals (sign-in, cross-site, bad names)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from playwright.async_api import Page, expect

from dispatch.db import CONNECT_KWARGS
from tests.serve import ServeProcess
from tests.ui.conftest import require_chromium
from tests.ui.test_browser import assert_not_reloaded, mark_page, sign_in

require_chromium()

BROKEN_CRON = "61 * * * *"


async def make(rest: httpx.AsyncClient, name: str, cron: str, **extra: Any) -> dict[str, Any]:
    r = await rest.post("/api/v1/schedules", json={
        "name": name, "cron": cron, "template": {"title": f"{name} task"}, **extra})
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


async def schedule(rest: httpx.AsyncClient, name: str) -> dict[str, Any]:
    r = await rest.get(f"/api/v1/schedules/{name}")
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def shown(when: str) -> str:
    """An API time as the dashboard shows it."""
    return f"{datetime.fromisoformat(when).astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def insert_broken(db_url: str) -> None:
    """A schedule a DBA typed in psql with an expression the scheduler cannot read."""
    with psycopg.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute("INSERT INTO dispatch.schedules (name, cron, template)"
                     " VALUES ('typo', %s, '{\"title\": \"never\"}')", (BROKEN_CRON,))


async def test_schedules_pages_and_their_buttons(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, db_url: str,
    screenshot_dir: Path,
) -> None:
    first_nightly = await make(rest, "nightly", "0 3 * * *", timezone="Europe/Berlin")
    await make(rest, "yearly", "@yearly", overlap="allow", catch_up="all", catch_up_limit=5)

    await sign_in(page, server)
    await page.click("nav >> text=Schedules")
    await page.wait_for_url(f"{server.api}/ui/schedules")
    await expect(page.locator("nav a[aria-current=page]")).to_have_text("Schedules")
    rows = page.locator("table.schedules tbody tr")
    await expect(rows).to_have_count(2)
    nightly = page.locator("tr[data-schedule=nightly]")
    await expect(nightly).to_contain_text("0 3 * * *")
    await expect(nightly).to_contain_text("Europe/Berlin")
    await expect(nightly).to_contain_text("active")
    await expect(nightly).to_contain_text("skip")
    await expect(nightly.locator(".next-fire")).to_have_text(
        shown(first_nightly["next_fire_at"]))
    await expect(nightly.locator(".last-fire")).to_have_text("never")
    yearly = page.locator("tr[data-schedule=yearly]")
    await expect(yearly).to_contain_text("allow")
    await expect(yearly).to_contain_text("all (≤ 5)")
    await expect(yearly.locator(".next-fire")).to_contain_text("-01-01 00:00:00 UTC")

    # The list follows the scheduler without a reload: a schedule typed in psql appears, and
    # then shows why the scheduler paused it.
    await mark_page(page)
    insert_broken(db_url)
    typo = page.locator("tr[data-schedule=typo]")
    await expect(typo).to_contain_text("paused")
    await expect(typo.locator(".schedule-error")).to_contain_text(BROKEN_CRON)
    await expect(typo.locator(".next-fire")).to_have_text("none (paused)")
    await expect(rows).to_have_count(3)
    await assert_not_reloaded(page)
    assert (await schedule(rest, "typo"))["last_error"]
    await page.screenshot(path=str(screenshot_dir / "schedules.png"), full_page=True)

    await page.click("a[href='/ui/schedules/nightly']")
    await page.wait_for_url(f"{server.api}/ui/schedules/nightly")
    await expect(page.locator("h1")).to_have_text("Schedule nightly")
    await expect(page.locator("#schedule-template")).to_contain_text('"title": "nightly task"')
    await expect(page.locator("#no-tasks")).to_be_visible()
    await page.click("#run-now")
    await page.wait_for_url(f"{server.api}/ui/schedules/nightly")
    made = page.locator("#schedule-tasks tbody tr")
    await expect(made).to_have_count(1)
    await expect(made).to_contain_text("nightly task")
    await expect(made).to_contain_text("pending")
    await expect(made).to_contain_text("run now")
    await expect(page.locator("#counts")).to_contain_text("1 / 0 / 0")
    first = (await rest.get("/api/v1/schedules/nightly/tasks")).json()[0]
    await expect(made.locator("a")).to_have_attribute("href", f"/ui/tasks/{first['task_id']}")

    # The page follows its tasks live: one made elsewhere appears, a cancel shows.
    await mark_page(page)
    r = await rest.post("/api/v1/schedules/nightly/run")
    assert r.status_code == 201, r.text
    second = r.json()
    await expect(made).to_have_count(2)
    await expect(page.locator("#counts")).to_contain_text("2 / 0 / 0")
    r = await rest.patch(f"/api/v1/tasks/{second['task_id']}", json={"status": "cancelled"})
    assert r.status_code == 200, r.text
    await expect(page.locator(f"tr[data-task='{second['task_id']}']")).to_contain_text(
        "cancelled")
    await assert_not_reloaded(page)

    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.click("#pause")
    await expect(page.locator("#schedule-state")).to_contain_text("paused")
    await expect(page.locator("#next-fire")).to_have_text("none (paused)")
    assert (await schedule(rest, "nightly"))["paused"] is True
    # Resumed as the API resumes: its next fire is there at once, not left to the scheduler.
    await page.click("#resume")
    await expect(page.locator("#schedule-state")).to_contain_text("active")
    await expect(page.locator("#next-fire")).to_contain_text("UTC")
    resumed = await schedule(rest, "nightly")
    assert resumed["paused"] is False and resumed["next_fire_at"] is not None

    # The broken one says why it was paused; resuming it is refused with the reason, and it
    # stays as it was.
    await page.goto(f"{server.api}/ui/schedules/typo")
    await expect(page.locator("#schedule-error")).to_contain_text(BROKEN_CRON)
    await page.click("#resume")
    await expect(page.locator("h1")).to_have_text("400")
    await expect(page.get_by_role("alert")).to_contain_text(BROKEN_CRON)
    typo_now = await schedule(rest, "typo")
    assert typo_now["paused"] is True and typo_now["last_error"]

    await page.goto(f"{server.api}/ui/schedules/absent")
    await expect(page.locator("main")).to_contain_text("schedule absent does not exist")


async def next_update(client: httpx.AsyncClient, topic: str) -> dict[str, str]:
    """The first update of a live stream: {element id: html}."""
    async with client.stream("GET", "/ui/events", params={"topic": topic}) as r:
        assert r.status_code == 200
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "update":
                fragments: dict[str, str] = json.loads(line.removeprefix("data: "))
                return fragments
    raise AssertionError(f"the stream of {topic} ended without an update")


async def test_schedule_routes_refuse_what_they_should(
    server: ServeProcess, ui: httpx.AsyncClient, rest: httpx.AsyncClient
) -> None:
    await make(rest, "nightly", "0 3 * * *")
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as anon:
        for url in ("/ui/schedules", "/ui/schedules/nightly"):
            r = await anon.get(url)
            assert r.status_code == 303 and r.headers["location"] == "/ui/login", url
        for action in ("run", "pause", "resume"):
            assert (await anon.post(f"/ui/schedules/nightly/{action}")).status_code == 401
        r = await anon.get("/ui/events", params={"topic": "schedules"})
        assert r.status_code == 401
    r = await ui.post("/ui/schedules/nightly/run", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    r = await ui.post("/ui/schedules/nightly/pause", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    found = await schedule(rest, "nightly")
    assert found["fired_count"] == 0 and found["paused"] is False

    cases = [
        ("get", "/ui/schedules/bad.name", 400, "schedule name"),
        ("get", "/ui/schedules/" + "x" * 129, 400, "schedule name"),
        ("get", "/ui/schedules/absent", 404, "schedule absent does not exist"),
        ("post", "/ui/schedules/absent/run", 404, "does not exist"),
        ("post", "/ui/schedules/absent/pause", 404, "does not exist"),
        ("post", "/ui/schedules/absent/resume", 404, "does not exist"),
        ("post", "/ui/schedules/bad.name/run", 400, "schedule name"),
        ("post", "/ui/schedules/nightly/explode", 404, "no action"),
        ("get", "/ui/events?topic=schedule:bad.name", 400, "schedule name"),
        ("get", "/ui/events?topic=bogus", 400, "topic"),
    ]
    for method, url, status, text in cases:
        r = await getattr(ui, method)(url)
        assert r.status_code == status, (url, r.status_code, r.text)
        assert text in r.text, (url, r.text)
        assert "text/html" in r.headers["content-type"], url

    # The buttons answer with the schedule's page, as the other pages' buttons do.
    r = await ui.post("/ui/schedules/nightly/run")
    assert r.status_code == 303 and r.headers["location"] == "/ui/schedules/nightly"
    assert (await schedule(rest, "nightly"))["fired_count"] == 1

    # The live streams carry the pages' live parts.
    listed = await next_update(ui, "schedules")
    assert 'data-schedule="nightly"' in listed["schedules-table"]
    shown_one = await next_update(ui, "schedule:nightly")
    assert 'id="counts">1 / 0 / 0' in shown_one["schedule-summary"]
    assert "run now" in shown_one["schedule-tasks"]
    gone = await next_update(ui, "schedule:absent")
    assert "This schedule no longer exists" in gone["schedule-summary"]
