"""The dashboard's schedules in a real headless Chromium against a real `dispatch serve`: the list
with next fires, a schedule's page with its template and tasks, run now, pause and resume, and a
schedule the scheduler paused showing why."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import psycopg
from playwright.async_api import Page, expect

from dispatch.db import CONNECT_KWARGS
from tests.serve import ServeProcess
from tests.ui.conftest import require_chromium
from tests.ui.test_browser import sign_in, until

require_chromium()


async def make(rest: httpx.AsyncClient, name: str, cron: str, **extra: Any) -> dict[str, Any]:
    r = await rest.post("/api/v1/schedules", json={
        "name": name, "cron": cron, "template": {"title": f"{name} task"}, **extra})
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


async def test_schedules_pages_and_their_buttons(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, db_url: str,
    screenshot_dir: Path,
) -> None:
    await make(rest, "nightly", "0 3 * * *", timezone="Europe/Berlin")
    await make(rest, "yearly", "@yearly", overlap="allow")
    with psycopg.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute("INSERT INTO dispatch.schedules (name, cron, template)"
                     """ VALUES ('typo', '61 * * * *', '{"title": "never"}')""")

    async def typo_paused() -> bool:
        r = await rest.get("/api/v1/schedules/typo")
        return bool(r.json()["paused"])

    await until(typo_paused, "the running scheduler pauses the unreadable schedule")

    await sign_in(page, server)
    await page.click("nav >> text=Schedules")
    await page.wait_for_url(f"{server.api}/ui/schedules")
    rows = page.locator("table.schedules tbody tr")
    await expect(rows).to_have_count(3)
    nightly = page.locator("tr[data-schedule=nightly]")
    await expect(nightly).to_contain_text("0 3 * * *")
    await expect(nightly).to_contain_text("Europe/Berlin")
    await expect(nightly).to_contain_text("active")
    await expect(nightly.locator(".next-fire")).to_contain_text("UTC")
    typo = page.locator("tr[data-schedule=typo]")
    await expect(typo).to_contain_text("paused")
    await expect(typo.locator(".schedule-error")).to_contain_text("61 * * * *")
    await page.screenshot(path=str(screenshot_dir / "schedules.png"), full_page=True)

    await page.click("a[href='/ui/schedules/nightly']")
    await page.wait_for_url(f"{server.api}/ui/schedules/nightly")
    await expect(page.locator("#schedule-template")).to_contain_text('"title": "nightly task"')
    await expect(page.locator("#no-tasks")).to_be_visible()
    await page.click("#run-now")
    await page.wait_for_url(f"{server.api}/ui/schedules/nightly")
    made = page.locator("#schedule-tasks tbody tr")
    await expect(made).to_have_count(1)
    await expect(made).to_contain_text("nightly task")
    await expect(made).to_contain_text("run now")
    await expect(page.locator("#counts")).to_contain_text("1 / 0 / 0")

    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.click("#pause")
    await expect(page.locator("#schedule-state")).to_contain_text("paused")
    await expect(page.locator("#next-fire")).to_contain_text("none (paused)")
    assert (await rest.get("/api/v1/schedules/nightly")).json()["paused"] is True
    await page.click("#resume")
    await expect(page.locator("#schedule-state")).to_contain_text("active")

    async def next_fire_again() -> bool:
        r = await rest.get("/api/v1/schedules/nightly")
        return r.json()["next_fire_at"] is not None

    await until(next_fire_again, "the scheduler computes the resumed schedule's next fire")
    await page.reload()
    await expect(page.locator("#next-fire")).to_contain_text("UTC")
    await page.screenshot(path=str(screenshot_dir / "schedule.png"), full_page=True)

    await page.goto(f"{server.api}/ui/schedules/typo")
    await expect(page.locator("#schedule-error")).to_contain_text("61 * * * *")
    await page.goto(f"{server.api}/ui/schedules/absent")
    await expect(page.locator("main")).to_contain_text("schedule absent does not exist")
