"""The task list as a triage tool, in a real headless Chromium against a real `dispatch serve`:
newest first with a sort choice, live, several statuses at once, search by title, id prefix and
metadata, an error column for failures, and bulk requeue and cancel of what the filter selects,
asked first with the count."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Dialog, Page, expect

from tests.serve import ServeProcess
from tests.ui.conftest import require_chromium
from tests.ui.test_browser import (
    assert_not_reloaded,
    create,
    get_task,
    mark_page,
    register,
    sign_in,
)
from tests.ui.test_live import Stream, metric, streams, transactions, until

require_chromium()


async def dead_letter(rest: httpx.AsyncClient, title: str, error: str) -> dict[str, Any]:
    """A task that failed for good on the agent `breaker`, with `error`."""
    task = await create(rest, title, "breakable", max_retries=0)
    r = await rest.post("/api/v1/tasks/claim", headers={"X-Agent-ID": "breaker"},
                        json={"start": True, "wait_seconds": 10})
    assert r.status_code == 200 and r.json()["task_id"] == task["task_id"], r.text
    r = await rest.post(f"/api/v1/tasks/{task['task_id']}/fail",
                        headers={"X-Agent-ID": "breaker"}, json={"error": error})
    assert r.status_code == 200 and r.json()["status"] == "failed", r.text
    return task


def titles(page: Page) -> Any:
    return page.locator("#tasks-table tbody tr td:first-child")


async def test_newest_first_live_several_statuses_search_and_errors(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await register(rest, "breaker", ["breakable"], limit=1)
    alpha = await create(rest, "alpha report", "nobody-has-this", metadata={"team": "search"})
    await create(rest, "beta report", "nobody-has-this", metadata={"team": "ads", "n": 3})
    await create(rest, "gamma report", "nobody-has-this")
    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks")
    await expect(titles(page)).to_have_text(["gamma report", "beta report", "alpha report"])
    await page.select_option("select[name=order]", "oldest")
    await page.click("form.filters button[type=submit]")
    await expect(titles(page)).to_have_text(["alpha report", "beta report", "gamma report"])

    # The first page follows new tasks without a reload.
    await page.goto(f"{server.api}/ui/tasks")
    await expect(page.locator("#live-status")).to_have_text("live")
    await mark_page(page)
    await create(rest, "delta report", "nobody-has-this")
    await expect(titles(page).first).to_have_text("delta report")
    await assert_not_reloaded(page)

    # Search: a title substring in any case, the start of an id, a metadata key=value (JSON when
    # it reads as JSON).
    for query, expected in (
        ("q=BETA", ["beta report"]),
        (f"id={alpha['task_id'][:8]}", ["alpha report"]),
        ("meta=team%3Dsearch", ["alpha report"]),
        ("meta=n%3D3", ["beta report"]),
        ("meta=n%3D%223%22", []),
    ):
        await page.goto(f"{server.api}/ui/tasks?{query}")
        if expected:
            await expect(titles(page)).to_have_text(expected)
        else:
            await expect(page.locator("#tasks-table .empty")).to_have_text("No tasks match.")

    # Two statuses at once, with the error column while failures are listed.
    await dead_letter(rest, "resize images", "PIL.UnidentifiedImageError: cannot identify x.png")
    cancelled = await create(rest, "old import", "nobody-has-this")
    r = await rest.patch(f"/api/v1/tasks/{cancelled['task_id']}",
                         json={"status": "cancelled", "reason": "stale"})
    assert r.status_code == 200, r.text
    await page.goto(f"{server.api}/ui/tasks")
    await page.check('input[name=status][value="failed"]')
    await page.check('input[name=status][value="cancelled"]')
    await page.click("form.filters button[type=submit]")
    await expect(titles(page)).to_have_text(["old import", "resize images"])
    assert "status=failed&status=cancelled" in page.url
    await expect(page.locator("#tasks-table th")).to_contain_text(["Error"])
    failed = page.locator("#tasks-table tbody tr", has_text="resize images")
    await expect(failed.locator("td.error")).to_have_text(
        "PIL.UnidentifiedImageError: cannot identify x.png")
    await page.screenshot(path=screenshot_dir / "tasks.png", full_page=True)
    # Without failures listed, no error column.
    await page.goto(f"{server.api}/ui/tasks?status=pending")
    await expect(page.locator("#tasks-table th", has_text="Error")).to_have_count(0)


async def test_bulk_requeue_and_cancel_what_the_filter_selects(
    page: Page, server: ServeProcess, rest: httpx.AsyncClient, screenshot_dir: Path
) -> None:
    await register(rest, "breaker", ["breakable"], limit=1)
    exports = [await dead_letter(rest, f"nightly export {i}", "timeout talking to s3")
               for i in range(3)]
    other = await dead_letter(rest, "weekly digest", "smtp refused")
    # The agent leaves, so requeued tasks stay pending where the test can see them.
    r = await rest.delete("/api/v1/agents/breaker")
    assert r.status_code in (200, 204), r.text
    waiting = [await create(rest, f"waiting job {i}", "nobody-has-this") for i in range(2)]
    kept = await create(rest, "keep me", "nobody-has-this")

    await sign_in(page, server)
    await page.goto(f"{server.api}/ui/tasks?status=failed&q=nightly")
    await expect(page.locator("#match-count")).to_have_text("3 tasks match")
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    await page.click("button.bulk-requeue")
    await expect(page.locator("#bulk-done")).to_have_text("Requeued 3")
    assert asked and asked[-1].startswith("Requeue 3 tasks?"), asked
    for task in exports:
        now = await get_task(rest, task["task_id"])
        assert now["status"] == "pending", now
        events = (await rest.get(f"/api/v1/tasks/{task['task_id']}/events")).json()
        assert (events[-1]["event"], events[-1]["actor"]) == ("requeued", "admin")
    assert (await get_task(rest, other["task_id"]))["status"] == "failed"
    await page.screenshot(path=screenshot_dir / "tasks-bulk.png", full_page=True)

    await page.goto(f"{server.api}/ui/tasks?status=pending&q=waiting")
    await expect(page.locator("#match-count")).to_have_text("2 tasks match")
    await page.click("button.bulk-cancel")
    await expect(page.locator("#bulk-done")).to_have_text("Cancelled 2")
    assert asked[-1].startswith("Cancel 2 tasks?"), asked
    for task in waiting:
        assert (await get_task(rest, task["task_id"]))["status"] == "cancelled"
    assert (await get_task(rest, kept["task_id"]))["status"] == "pending"


async def test_bad_list_input_is_a_clear_400_and_a_bulk_needs_a_filter(
    ui: httpx.AsyncClient, rest: httpx.AsyncClient
) -> None:
    for query, words in (
        ("id=xyz", "id:"),
        ("meta=novalue", "meta:"),
        ("order=sideways", "order:"),
        ("q=" + "x" * 300, "q:"),
        ("q=a%00b", "q:"),
        ("status=bogus", "status"),
        ("cursor=nonsense", "cursor"),
    ):
        r = await ui.get(f"/ui/tasks?{query}")
        assert r.status_code == 400 and words in r.text, (query, r.status_code, r.text[:300])
    task = await create(rest, "still pending", "nobody-has-this")
    own = {"Origin": str(ui.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"}
    r = await ui.post("/ui/tasks/bulk", data={"action": "cancel"}, headers=own)
    assert r.status_code == 400 and "filter the tasks first" in r.text
    r = await ui.post("/ui/tasks/bulk", data={"action": "explode", "status": "pending"},
                      headers=own)
    assert r.status_code == 400 and "action" in r.text
    # From another site: refused, nothing cancelled.
    r = await ui.post("/ui/tasks/bulk", data={"action": "cancel", "status": "pending"},
                      headers={"Origin": "https://elsewhere.example",
                               "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert (await get_task(rest, task["task_id"]))["status"] == "pending"
    r = await ui.post("/ui/tasks/bulk", data={"action": "cancel", "status": "pending"},
                      headers=own)
    assert r.status_code == 303 and re.search(r"done=Cancelled\+1\b", r.headers["location"])
    assert (await get_task(rest, task["task_id"]))["status"] == "cancelled"


async def test_a_hundred_open_task_lists_cost_the_database_what_one_does(
    server: ServeProcess, rest: httpx.AsyncClient, db_url: str
) -> None:
    """The list's live topic (tasks?<query>) is read once per refresh for every tab on it."""
    topic = "tasks?q=load&status=pending"

    async def activity(tabs: list[Stream], start: int) -> None:
        for i in range(start, start + 10):
            await create(rest, f"load {i}", "nobody-has-this")
            await until(lambda n=i + 1: all(
                tab.updates and tab.updates[-1]["tasks-table"].count("<tr data-task=") == n
                for tab in tabs), f"every tab lists {i + 1}")
        refreshes = metric(server, "dispatch_ui_refreshes_total")
        await until(lambda: metric(server, "dispatch_ui_refreshes_total") >= refreshes + 2,
                    "two more refreshes")

    counts = []
    for n, start in ((1, 0), (100, 10)):
        async with streams(server, n, topic) as tabs:
            before = transactions(db_url)
            await activity(tabs, start)
            counts.append(transactions(db_url) - before)
        await until(lambda: metric(server, "dispatch_ui_streams") == 0, "the streams closed")
    one, hundred = counts
    print(f"\ntransactions: 1 task list {one}, 100 task lists {hundred}")
    assert hundred < 2 * one + 30, (one, hundred)
