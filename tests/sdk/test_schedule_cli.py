"""`dispatch schedule ...` against a real `dispatch serve`: create, list, show, update, pause,
resume, run now and delete in both forms; refusals exit non-zero with the server's message and
leave nothing behind."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from dispatch.sdk.client import DispatchClient
from tests.sdk.test_cli import dispatch, ok, rows
from tests.serve import ServeProcess


def test_a_schedule_from_create_to_delete(sp: ServeProcess, admin: DispatchClient) -> None:
    made = json.loads(ok(dispatch(
        sp, "schedule", "create", "nightly", "--cron", "0 3 * * *", "--timezone",
        "Europe/Berlin", "--title", "re-index", "-c", "code", "--priority", "4",
        "--metadata", '{"repo": "mono"}', "--json", admin=True)))
    assert made["template"]["title"] == "re-index"
    assert made["template"]["required_capabilities"] == ["code"]
    assert made["template"]["priority"] == 4 and made["template"]["metadata"] == {"repo": "mono"}
    assert datetime.fromisoformat(made["next_fire_at"]) > datetime.now(UTC)
    ok(dispatch(sp, "schedule", "create", "feed", "--cron", "*/5 * * * *", "--template",
                '{"title": "poll the feed"}', "--overlap", "allow", admin=True))

    listed = rows(ok(dispatch(sp, "schedule", "list", admin=True)))
    assert [r["NAME"] for r in listed] == ["feed", "nightly"]
    nightly = listed[1]
    assert nightly["CRON"] == "0 3 * * *" and nightly["TIMEZONE"] == "Europe/Berlin"
    assert nightly["STATE"] == "active" and nightly["NEXT_FIRE"] != "-"

    changed = json.loads(ok(dispatch(sp, "schedule", "update", "nightly", "--cron", "30 4 * * *",
                                     "--json", admin=True)))
    assert changed["cron"] == "30 4 * * *" and changed["template"]["title"] == "re-index"
    assert datetime.fromisoformat(changed["next_fire_at"]).minute == 30

    paused = rows(ok(dispatch(sp, "schedule", "pause", "nightly", admin=True)))
    assert paused[0]["STATE"] == "paused"
    assert rows(ok(dispatch(sp, "schedule", "resume", "nightly", admin=True)))[0]["STATE"] == (
        "active")

    task = json.loads(ok(dispatch(sp, "schedule", "run", "nightly", "--json", admin=True)))
    assert task["title"] == "re-index" and task["source"] == "schedule"
    shown = json.loads(ok(dispatch(sp, "schedule", "show", "nightly", "--json", admin=True)))
    assert shown["schedule"]["fired_count"] == 1
    assert [t["task_id"] for t in shown["tasks"]] == [task["task_id"]]
    text = ok(dispatch(sp, "schedule", "show", "nightly", admin=True))
    assert "re-index" in text and task["task_id"] in text

    assert ok(dispatch(sp, "schedule", "delete", "nightly", admin=True)).strip() == (
        "deleted nightly")
    assert [s.name for s in admin.schedules()] == ["feed"]
    assert admin.get(task["task_id"]).title == "re-index"  # its tasks stay


def test_refusals_exit_non_zero_and_change_nothing(
    sp: ServeProcess, admin: DispatchClient
) -> None:
    bad = dispatch(sp, "schedule", "create", "x", "--cron", "61 * * * *", "--title", "t",
                   admin=True)
    assert bad.returncode == 1 and "cron" in bad.stderr and "(HTTP 400)" in bad.stderr
    zone = dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--timezone", "Nowhere",
                    "--title", "t", admin=True)
    assert zone.returncode == 1 and "timezone" in zone.stderr
    task = dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--title", "t",
                    "--priority", "11", admin=True)
    assert task.returncode == 1 and "template.priority" in task.stderr, task.stderr
    assert dispatch(sp, "schedule", "create", "x", "--cron", "@daily", admin=True).returncode == 2
    assert dispatch(sp, "schedule", "create", "x", "--cron", "@daily", "--template", "[1]",
                    admin=True).returncode == 2
    unsigned = dispatch(sp, "schedule", "list")
    assert unsigned.returncode == 1 and "DISPATCH_ADMIN_TOKEN" in unsigned.stderr
    missing = dispatch(sp, "schedule", "run", "absent", admin=True)
    assert missing.returncode == 1 and "(HTTP 404)" in missing.stderr
    assert admin.schedules() == []
    assert admin.list().tasks == []
