"""`dispatch schedule ...` against a real `dispatch serve`: create, list, show, update, pause,
resume, run now and delete in both forms; refusals exit non-zero with the server's message and
leave nothing behind. Then the client's schedule methods, sync and async, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from dispatch.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized
from dispatch.sdk.client import AsyncDispatchClient, DispatchClient
from dispatch.wire import ScheduleCreate, SchedulePatch, TaskCreate
from tests.sdk.test_cli import cli_env, dispatch, ok, rows
from tests.serve import ServeProcess

# Every cron here names an hour twelve hours from now, so no schedule fires by itself while a
# test runs (a "*/5" schedule fired once when the test crossed a five-minute mark).
H = (datetime.now(UTC).hour + 12) % 24


def test_a_schedule_from_create_to_delete(sp: ServeProcess, admin: DispatchClient) -> None:
    made = json.loads(ok(dispatch(
        sp, "schedule", "create", "nightly", "--cron", f"0 {H} * * *", "--timezone",
        "Europe/Berlin", "--title", "re-index", "-c", "code", "--priority", "4",
        "--metadata", '{"repo": "mono"}', "--json", admin=True)))
    assert made["template"]["title"] == "re-index"
    assert made["template"]["required_capabilities"] == ["code"]
    assert made["template"]["priority"] == 4 and made["template"]["metadata"] == {"repo": "mono"}
    assert datetime.fromisoformat(made["next_fire_at"]) > datetime.now(UTC)
    ok(dispatch(sp, "schedule", "create", "feed", "--cron", f"*/5 {H} * * *", "--template",
                '{"title": "poll the feed"}', "--overlap", "allow", admin=True))

    listed = rows(ok(dispatch(sp, "schedule", "list", admin=True)))
    assert [r["NAME"] for r in listed] == ["feed", "nightly"]
    nightly = listed[1]
    assert nightly["CRON"] == f"0 {H} * * *" and nightly["TIMEZONE"] == "Europe/Berlin"
    assert nightly["STATE"] == "active" and nightly["NEXT_FIRE"] != "-"
    assert (nightly["LAST_FIRE"], nightly["FIRED"], nightly["SKIPPED"]) == ("-", "0", "0")
    assert nightly["ERROR"] == "-"
    assert [s["name"] for s in json.loads(ok(dispatch(sp, "schedule", "list", "--json",
                                                      admin=True)))] == ["feed", "nightly"]

    changed = json.loads(ok(dispatch(sp, "schedule", "update", "nightly", "--cron", f"30 {H} * * *",
                                     "--json", admin=True)))
    assert changed["cron"] == f"30 {H} * * *" and changed["template"]["title"] == "re-index"
    assert datetime.fromisoformat(changed["next_fire_at"]).minute == 30
    # Task options change those fields of the template; the rest of it stays.
    changed = json.loads(ok(dispatch(sp, "schedule", "update", "nightly", "--priority", "7",
                                     "--json", admin=True)))
    assert changed["template"] == made["template"] | {"priority": 7}
    assert dispatch(sp, "schedule", "update", "nightly", admin=True).returncode == 2

    paused = rows(ok(dispatch(sp, "schedule", "pause", "nightly", admin=True)))
    assert paused[0]["STATE"] == "paused"
    assert {r["NAME"]: r["STATE"] for r in rows(ok(dispatch(sp, "schedule", "list",
                                                            admin=True)))} == {
        "feed": "active", "nightly": "paused"}
    assert rows(ok(dispatch(sp, "schedule", "resume", "nightly", admin=True)))[0]["STATE"] == (
        "active")
    assert admin.get_schedule("nightly").paused is False

    task = json.loads(ok(dispatch(sp, "schedule", "run", "nightly", "--json", admin=True)))
    assert task["title"] == "re-index" and task["source"] == "schedule"
    assert task["priority"] == 7
    shown = json.loads(ok(dispatch(sp, "schedule", "show", "nightly", "--json", admin=True)))
    assert shown["schedule"]["fired_count"] == 1
    assert shown["schedule"]["last_task_id"] == task["task_id"]
    assert [t["task_id"] for t in shown["tasks"]] == [task["task_id"]]
    text = ok(dispatch(sp, "schedule", "show", "nightly", admin=True))
    assert "re-index" in text and task["task_id"] in text
    made_rows = rows(text[text.index("TASK_ID"):])
    assert [(r["TASK_ID"], r["STATUS"]) for r in made_rows] == [(task["task_id"], "pending")]
    fresh = ok(dispatch(sp, "schedule", "show", "feed", admin=True))
    assert "(no tasks yet)" in fresh

    assert ok(dispatch(sp, "schedule", "delete", "nightly", admin=True)).strip() == (
        "deleted nightly")
    assert [s.name for s in admin.list_schedules()] == ["feed"]
    assert [r["NAME"] for r in rows(ok(dispatch(sp, "schedule", "list", admin=True)))] == [
        "feed"]
    gone = dispatch(sp, "schedule", "show", "nightly", admin=True)
    assert gone.returncode == 1 and "(HTTP 404)" in gone.stderr
    assert admin.get(task["task_id"]).title == "re-index"  # its tasks stay


def test_refusals_exit_non_zero_and_change_nothing(
    sp: ServeProcess, admin: DispatchClient
) -> None:
    bad = dispatch(sp, "schedule", "create", "x", "--cron", "61 * * * *", "--title", "t",
                   admin=True)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("dispatch: ") and "cron" in bad.stderr, bad.stderr
    assert "(HTTP 400)" in bad.stderr
    zone = dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--timezone", "Nowhere",
                    "--title", "t", admin=True)
    assert zone.returncode == 1 and "timezone" in zone.stderr
    task = dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--title", "t",
                    "--priority", "11", admin=True)
    assert task.returncode == 1 and "template.priority" in task.stderr, task.stderr
    named = dispatch(sp, "schedule", "create", "a.b", "--cron", "@daily", "--title", "t",
                     admin=True)
    assert named.returncode == 1 and "name" in named.stderr, named.stderr
    # Usage errors, found before any request: exit 2.
    assert dispatch(sp, "schedule", "create", "x", "--cron", "@daily", admin=True).returncode == 2
    assert dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--template", "[1]",
                    admin=True).returncode == 2
    both = dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--template",
                    '{"title": "t"}', "--title", "t", admin=True)
    assert both.returncode == 2 and "not both" in both.stderr
    assert dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--priority", "3",
                    admin=True).returncode == 2
    assert dispatch(sp, "schedule", "create", "x", "--title", "t", admin=True).returncode == 2
    missing = dispatch(sp, "schedule", "run", "absent", admin=True)
    assert missing.returncode == 1 and "(HTTP 404)" in missing.stderr
    for action in ("pause", "resume", "delete", "show"):
        absent = dispatch(sp, "schedule", action, "absent", admin=True)
        assert absent.returncode == 1 and "(HTTP 404)" in absent.stderr, (action, absent.stderr)
    assert admin.list_schedules() == []
    assert admin.list().tasks == []

    # A bad change leaves the schedule as it was.
    ok(dispatch(sp, "schedule", "create", "kept", "--cron", "@hourly", "--title", "t",
                admin=True))
    bad = dispatch(sp, "schedule", "update", "kept", "--cron", "* * *", admin=True)
    assert bad.returncode == 1 and "cron" in bad.stderr
    assert admin.get_schedule("kept").cron == "@hourly"
    taken = dispatch(sp, "schedule", "create", "kept", "--cron", "@daily", "--title", "u",
                     admin=True)
    assert taken.returncode == 1 and "(HTTP 409)" in taken.stderr
    assert admin.get_schedule("kept").template["title"] == "t"


def test_only_the_admin_token_manages_schedules(sp: ServeProcess, admin: DispatchClient) -> None:
    unsigned = dispatch(sp, "schedule", "list")
    assert unsigned.returncode == 1 and unsigned.stdout == ""
    assert "set DISPATCH_ADMIN_TOKEN (or --admin-token)" in unsigned.stderr, unsigned.stderr
    wrong = dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--title", "t",
                     "--admin-token", "not-the-admin-token")
    assert wrong.returncode == 1 and "(HTTP 403)" in wrong.stderr, wrong.stderr
    # An agent's own token is not the admin's.
    issued = httpx.post(f"{sp.api}/api/v1/agents/alice/tokens",
                        headers={"X-Agent-ID": "ops", "Authorization": f"Bearer {sp.admin_token}"})
    assert issued.status_code == 201, issued.text
    env = cli_env(sp, "alice", False) | {"DISPATCH_TOKEN": issued.json()["token"]}
    for args in (("list",), ("create", "x", "--cron", "@daily", "--title", "t")):
        refused = subprocess.run([sys.executable, "-m", "dispatch", "schedule", *args],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode == 1, refused.stderr
        assert "needs the admin token, not an agent's (HTTP 403)" in refused.stderr
    assert admin.list_schedules() == []


def test_the_client_methods(sp: ServeProcess, admin: DispatchClient) -> None:
    made = admin.create_schedule("nightly", cron=f"0 {H} * * *", timezone="Europe/Berlin",
                                 template=TaskCreate(title="re-index", priority=3))
    assert (made.template["title"], made.template["priority"]) == ("re-index", 3)
    assert made.next_fire_at is not None and made.next_fire_at > datetime.now(UTC)
    assert (made.overlap, made.catch_up, made.paused) == ("skip", "latest", False)
    struct = admin.create_schedule(ScheduleCreate(name="feed", cron=f"*/5 {H} * * *",
                                                  template={"title": "poll"}, paused=True))
    assert struct.paused and struct.next_fire_at is None
    with pytest.raises(TypeError):
        admin.create_schedule(ScheduleCreate(name="s", cron="@daily", template={}), paused=True)
    with pytest.raises(Conflict):
        admin.create_schedule("nightly", cron="@daily", template={"title": "again"})
    for fields, field in (({"cron": "61 * * * *"}, "cron"),
                          ({"cron": "@daily", "timezone": "Nowhere"}, "timezone"),
                          ({"cron": "@daily", "template": {"title": "t", "priority": 11}},
                           "template.priority")):
        with pytest.raises(InvalidInput) as bad:
            admin.create_schedule("bad", **{"template": {"title": "t"}, **fields})
        assert bad.value.field == field, (fields, bad.value.field, bad.value.message)
    assert [s.name for s in admin.list_schedules()] == ["feed", "nightly"]

    changed = admin.update_schedule("nightly", cron=f"30 {H} * * *")
    assert changed.cron == f"30 {H} * * *" and changed.timezone == "Europe/Berlin"
    changed = admin.update_schedule("nightly", SchedulePatch(catch_up="none", overlap="allow"))
    assert (changed.catch_up, changed.overlap, changed.cron) == ("none", "allow", f"30 {H} * * *")
    with pytest.raises(NotFound):
        admin.update_schedule("absent", cron="@daily")
    assert admin.pause_schedule("nightly").paused
    resumed = admin.resume_schedule("nightly")
    assert not resumed.paused and resumed.next_fire_at is not None

    first, second = admin.run_schedule("nightly"), admin.run_schedule("nightly")
    assert first.source == "schedule" and first.title == "re-index"
    assert [t.task_id for t in admin.schedule_tasks("nightly")] == [second.task_id,
                                                                   first.task_id]
    assert [t.task_id for t in admin.schedule_tasks("nightly", limit=1)] == [second.task_id]
    assert admin.get_schedule("nightly").fired_count == 2
    admin.delete_schedule("nightly")
    with pytest.raises(NotFound):
        admin.get_schedule("nightly")
    with pytest.raises(NotFound):
        admin.delete_schedule("nightly")
    with DispatchClient(sp.api, "alice") as alice, pytest.raises(Unauthorized):
        alice.list_schedules()


async def test_the_async_client_methods(sp: ServeProcess) -> None:
    async with AsyncDispatchClient(sp.api, "ops", admin_token=sp.admin_token) as admin:
        made = await admin.create_schedule("hourly", cron="@hourly",
                                           template={"title": "tick"}, overlap="allow")
        assert made.overlap == "allow" and made.next_fire_at is not None
        assert [s.name for s in await admin.list_schedules()] == ["hourly"]
        assert (await admin.get_schedule("hourly")).template["title"] == "tick"
        changed = await admin.update_schedule("hourly", template={"title": "tock"})
        assert changed.template["title"] == "tock"
        assert (await admin.pause_schedule("hourly")).paused
        assert not (await admin.resume_schedule("hourly")).paused
        task = await admin.run_schedule("hourly")
        assert task.title == "tock"
        assert [t.task_id for t in await admin.schedule_tasks("hourly")] == [task.task_id]
        with pytest.raises(InvalidInput) as bad:
            await admin.update_schedule("hourly", cron="nonsense")
        assert bad.value.field == "cron"
        await admin.delete_schedule("hourly")
        assert await admin.list_schedules() == []
    async with AsyncDispatchClient(sp.api, "ops", admin_token="wrong") as stranger:
        with pytest.raises(Forbidden):
            await stranger.list_schedules()
