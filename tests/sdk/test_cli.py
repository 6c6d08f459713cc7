"""The `dispatch` command's client side against a real `dispatch serve`: every command in both
forms (aligned table, --json), errors with the server's message and a non-zero status, the
command worker, `task watch`, and `top` in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from dispatch.sdk.client import DispatchClient
from tests.sdk.conftest import eventually
from tests.serve import ServeProcess

TERMINAL = {"completed", "failed", "timed_out", "cancelled"}


def cli_env(sp: ServeProcess, agent: str | None, admin: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env["DISPATCH_URL"] = sp.api
    if agent is not None:
        env["DISPATCH_AGENT_ID"] = agent
    if admin:
        env["DISPATCH_ADMIN_TOKEN"] = sp.admin_token
    return env


def dispatch(sp: ServeProcess, *args: str, agent: str | None = "alice", admin: bool = False,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatch", *args], capture_output=True,
                          text=True, timeout=timeout, env=cli_env(sp, agent, admin))


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done.stdout


def rows(table: str) -> list[dict[str, str]]:
    """Parse an aligned table back by the header's column positions, checking on the way that
    every cell starts under its header (two spaces before each column, on every line)."""
    lines = table.rstrip("\n").splitlines()
    header = lines[0]
    names = header.split()
    starts, position = [], 0
    for name in names:
        position = header.index(name, position)
        starts.append(position)
        position += len(name)
    parsed = []
    for line in lines[1:]:
        for name, start in zip(names[1:], starts[1:], strict=True):
            if len(line) > start:
                assert line[start - 2:start] == "  ", f"{name} is not aligned in {line!r}"
        ends = [*starts[1:], None]
        parsed.append({name: line[start:end].strip()
                       for name, start, end in zip(names, starts, ends, strict=True)})
    return parsed


def test_tasks_in_both_forms(sp: ServeProcess) -> None:
    made = json.loads(ok(dispatch(sp, "task", "create", "fix the build", "-c", "code",
                                  "--priority", "5", "--metadata", '{"repo": "x"}', "--json")))
    assert made["title"] == "fix the build" and made["priority"] == 5
    assert made["required_capabilities"] == ["code"] and made["metadata"] == {"repo": "x"}
    assert made["requester"] == "alice" and made["status"] == "pending"
    task_id = made["task_id"]

    shown = rows(ok(dispatch(sp, "task", "create", "write the docs", "--max-retries", "0")))
    assert len(shown) == 1 and shown[0]["STATUS"] == "pending" and shown[0]["TRY"] == "0/0"
    second = shown[0]["TASK_ID"]
    uuid.UUID(second)

    listed = json.loads(ok(dispatch(sp, "task", "list", "--json")))
    assert [t["task_id"] for t in listed] == [task_id, second]  # priority first
    table = rows(ok(dispatch(sp, "task", "list")))
    assert [(r["TASK_ID"], r["PRI"], r["TITLE"]) for r in table] == [
        (task_id, "5", "fix the build"), (second, "0", "write the docs")]
    assert rows(ok(dispatch(sp, "task", "list", "--status", "running"))) == []

    detail = {r["FIELD"]: r["VALUE"] for r in rows(ok(dispatch(sp, "task", "get", task_id)))}
    assert detail["title"] == "fix the build" and detail["metadata"] == '{"repo":"x"}'
    assert json.loads(ok(dispatch(sp, "task", "get", task_id, "--json")))["task_id"] == task_id

    cancelled = rows(ok(dispatch(sp, "task", "cancel", task_id, "--reason", "duplicate")))
    assert cancelled[0]["STATUS"] == "cancelled"
    events = json.loads(ok(dispatch(sp, "task", "events", task_id, "--json")))
    # (the assigner may have noted in between that no agent has `code`: `unmatched`)
    names = [e["event"] for e in events]
    assert names[0] == "created" and names[-1] == "cancelled", names
    assert events[-1]["payload"]["reason"] == "duplicate"
    history = rows(ok(dispatch(sp, "task", "events", task_id)))
    assert [r["EVENT"] for r in history] == names
    assert (history[-1]["EVENT"], history[-1]["ACTOR"]) == ("cancelled", "alice")
    assert json.loads(history[-1]["PAYLOAD"])["reason"] == "duplicate"
    assert [int(r["ID"]) for r in history] == [e["id"] for e in events]

    # Admin commands: the server's refusal without the token, the answer with it.
    refused = dispatch(sp, "task", "requeue", task_id)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("dispatch: ") and "(HTTP 401)" in refused.stderr
    requeued = json.loads(ok(dispatch(sp, "task", "requeue", task_id, "--json", admin=True)))
    assert requeued["status"] == "pending"
    ok(dispatch(sp, "agent", "register", "coder", "-c", "code", "--status", "degraded",
                agent="coder"))
    why = json.loads(ok(dispatch(sp, "task", "explain", task_id, "--json", admin=True)))
    assert [c["agent_id"] for c in why["candidates"]] == ["coder"]
    text = ok(dispatch(sp, "task", "explain", task_id, admin=True))
    assert text.startswith(f"task {task_id} is pending")
    explained = rows(text[text.index("AGENT"):])
    assert explained[0]["AGENT"] == "coder" and explained[0]["ELIGIBLE"] == "no"
    assert "degraded" in explained[0]["WHY_NOT"]


def test_errors_exit_non_zero_with_the_servers_message(sp: ServeProcess) -> None:
    missing = str(uuid.uuid4())
    done = dispatch(sp, "task", "get", missing)
    assert done.returncode == 1 and done.stdout == ""
    assert missing in done.stderr and "(HTTP 404)" in done.stderr
    bad = dispatch(sp, "task", "create", "x", "--priority", "11")
    assert bad.returncode == 1 and "priority" in bad.stderr and "(HTTP 400)" in bad.stderr
    assert dispatch(sp, "task", "get", "not-a-uuid").returncode == 2
    assert dispatch(sp, "task", "create", "x", "--metadata", "[1]").returncode == 2
    env = cli_env(sp, "alice", False) | {"DISPATCH_URL": "http://127.0.0.1:9"}
    down = subprocess.run([sys.executable, "-m", "dispatch", "task", "list"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1
    assert "cannot reach the API at http://127.0.0.1:9 (--url or DISPATCH_URL)" in down.stderr
    unsigned = dispatch(sp, "agent", "list")
    assert unsigned.returncode == 1
    assert "set DISPATCH_ADMIN_TOKEN (or --admin-token)" in unsigned.stderr, unsigned.stderr
    with DispatchClient(sp.api, "alice") as alice:
        assert alice.list().tasks == []  # nothing was created by the refused calls


def test_agents_in_both_forms(sp: ServeProcess) -> None:
    mine = json.loads(ok(dispatch(sp, "agent", "register", "w1", "-c", "code", "-c", "review",
                                  "--max-concurrent", "2", "--json", agent="w1")))
    assert mine["agent_id"] == "w1" and mine["capabilities"] == ["code", "review"]
    by_admin = rows(ok(dispatch(sp, "agent", "register", "w2", "--owner", "alice", admin=True)))
    assert by_admin[0]["AGENT"] == "w2" and by_admin[0]["OWNER"] == "alice"
    refused = dispatch(sp, "agent", "list")
    assert refused.returncode == 1 and "(HTTP 401)" in refused.stderr
    table = rows(ok(dispatch(sp, "agent", "list", admin=True)))
    assert [(r["AGENT"], r["STATUS"], r["LOAD"], r["DRAINED"], r["CAPABILITIES"])
            for r in table] == [("w1", "ready", "0/2", "no", "code,review"),
                                ("w2", "ready", "0/3", "no", "-")]
    drained = rows(ok(dispatch(sp, "agent", "drain", "w1", admin=True)))
    assert drained[0]["DRAINED"] == "yes"
    listed = json.loads(ok(dispatch(sp, "agent", "list", "--json", admin=True)))
    assert {a["agent_id"]: a["drained"] for a in listed} == {"w1": True, "w2": False}
    undrained = json.loads(ok(dispatch(sp, "agent", "undrain", "w1", "--json", admin=True)))
    assert undrained["drained"] is False
    assert ok(dispatch(sp, "agent", "delete", "w1", agent="w1")).strip() == "deleted w1"
    assert ok(dispatch(sp, "agent", "delete", "w2", admin=True)).strip() == "deleted w2"
    gone = dispatch(sp, "agent", "delete", "w2", admin=True)
    assert gone.returncode == 1 and "agent w2 not found (HTTP 404)" in gone.stderr
    assert json.loads(ok(dispatch(sp, "agent", "list", "--json", admin=True))) == []


COMMAND = textwrap.dedent("""
    import json, sys
    task = json.load(sys.stdin)
    mode = task["metadata"]["mode"]
    if mode == "json":
        print(json.dumps({"title": task["title"], "lease": task["lease"]}))
    elif mode == "text":
        print("plain words")
    else:
        print("some output", flush=True)
        print("first line of trouble\\nit broke: " + task["title"], file=sys.stderr)
        sys.exit(3)
""")


def test_worker_runs_a_command_per_task(sp: ServeProcess) -> None:
    with DispatchClient(sp.api, "alice") as alice:
        as_json = alice.create("j", metadata={"mode": "json"})
        as_text = alice.create("t", metadata={"mode": "text"})
        failing = alice.create("f", metadata={"mode": "fail"}, max_retries=0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch", "worker", "--concurrency", "2", "--poll", "1",
             "--", sys.executable, "-c", COMMAND],
            env=cli_env(sp, "cmd-worker", False), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        try:
            ended = {}
            for task in (as_json, as_text, failing):
                ended[task.title] = eventually(lambda t=task: alice.get(t.task_id),
                                               lambda t: t.status in TERMINAL)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert ended["j"].status == "completed"
        assert ended["j"].result == {"title": "j", "lease": ended["j"].lease}
        assert ended["t"].status == "completed" and ended["t"].result == "plain words"
        assert ended["f"].status == "failed" and ended["f"].assigned_agent == "cmd-worker"
        assert ended["f"].error == "exit status 3: first line of trouble\nit broke: f"
        assert "stopped; 2 completed, 1 failed" in err


def test_worker_needs_an_agent_id_and_a_command(sp: ServeProcess) -> None:
    no_id = dispatch(sp, "worker", "--", "true", agent=None)
    assert no_id.returncode == 2 and "agent id" in no_id.stderr
    no_cmd = dispatch(sp, "worker", agent="w")
    assert no_cmd.returncode == 2 and "needs a command" in no_cmd.stderr


def test_watch_follows_a_task_to_its_end(sp: ServeProcess) -> None:
    with DispatchClient(sp.api, "alice") as alice, DispatchClient(sp.api, "w") as w:
        task = alice.create("watched")
        watch = subprocess.Popen(
            [sys.executable, "-m", "dispatch", "task", "watch", str(task.task_id),
             "--json"],
            env=cli_env(sp, "alice", False), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        w.register()
        claimed = w.claim_many(1, wait_seconds=10, start=True)
        if not claimed:  # or the assigner gave it to w first
            claimed = [eventually(lambda: w.get(task.task_id), lambda t: t.status == "assigned")]
        lease = claimed[0].lease
        w.progress(task.task_id, 50, "half", lease=lease)
        w.complete(task.task_id, {"answer": 42}, lease=lease)
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0]["event"] == "created"
        assert "completed" in [e["event"] for e in lines[:-1]]
        assert lines[-1]["status"] == "completed" and lines[-1]["result"] == {"answer": 42}

        failed = alice.create("doomed", max_retries=0)
        alice.cancel(failed.task_id)
        human = dispatch(sp, "task", "watch", str(failed.task_id))
        assert human.returncode == 1
        assert human.stdout.splitlines()[-1] == f"task {failed.task_id} cancelled"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_refreshes_in_place_in_a_terminal(sp: ServeProcess) -> None:
    session = f"dispatch-top-{uuid.uuid4().hex[:8]}"
    command = " ".join([
        f"DISPATCH_URL={sp.api}", "DISPATCH_AGENT_ID=ops", f"DISPATCH_ADMIN_TOKEN={sp.admin_token}",
        sys.executable, "-m", "dispatch", "top", "--interval", "0.2",
    ])
    with DispatchClient(sp.api, "alice") as alice, DispatchClient(sp.api, "w9") as w9:
        w9.register(capabilities=["gpu"], max_concurrent=5)
        for i in range(3):
            alice.create(f"needs a gpu {i}", required_capabilities=["tpu"])
        tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", command)
        try:
            def screen() -> str:
                return tmux("capture-pane", "-p", "-t", session)

            first = eventually(screen, lambda s: "pending 3" in s, what="queue on screen")
            assert first.splitlines()[0].startswith("dispatch top")
            assert "AGENTS 1" in first
            agent_line = next(line for line in first.splitlines() if line.startswith("w9"))
            assert agent_line.split()[:4] == ["w9", "ready", "0/5", "no"]
            for i in range(2):
                alice.create(f"more {i}", required_capabilities=["tpu"])
            again = eventually(screen, lambda s: "pending 5" in s, what="the new count")
            # In place: one frame on the screen, not a scroll of them.
            assert again.count("dispatch top") == 1 and "pending 3" not in again
            assert again.count("QUEUE") == 1
            throughput = next(ln for ln in again.splitlines() if ln.startswith("throughput"))
            assert "0.0 completed/s" in throughput, throughput
            tmux("send-keys", "-t", session, "C-c")
            eventually(lambda: subprocess.run(["tmux", "has-session", "-t", session],
                                              capture_output=True).returncode,
                       lambda rc: rc != 0, what="top exited")
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    once = dispatch(sp, "top", "--once", agent="ops", admin=True)
    assert "QUEUE" in ok(once) and "pending 5" in once.stdout
    snapshot = json.loads(ok(dispatch(sp, "top", "--json", agent="ops", admin=True)))
    assert snapshot["stats"]["queue"]["pending"] == 5 and snapshot["agents"][0]["agent_id"] == "w9"


def test_create_sends_every_documented_field(sp: ServeProcess) -> None:
    parent = json.loads(ok(dispatch(sp, "task", "create", "parent", "--json")))["task_id"]
    made = json.loads(ok(dispatch(
        sp, "task", "create", "flow", "--concurrency-key", "repo-x", "--rate-key", "openai",
        "--cost", "5", "--parent", parent, "--available-at", "2030-01-01T09:00:00Z",
        "--source", "ci", "--timeout", "60", "--heartbeat", "30", "--description", "d", "--json",
    )))
    with DispatchClient(sp.api, "alice") as alice:
        stored = alice.get(made["task_id"])
    assert (stored.concurrency_key, stored.rate_key, stored.cost) == ("repo-x", "openai", 5)
    assert str(stored.parent_task_id) == parent and stored.source == "ci"
    assert stored.available_at is not None and stored.available_at.year == 2030
    assert (stored.timeout_seconds, stored.heartbeat_seconds) == (60, 30)
    assert stored.description == "d"
    bad = dispatch(sp, "task", "create", "x", "--cost", "0")
    assert bad.returncode == 1 and "cost" in bad.stderr and "(HTTP 400)" in bad.stderr
    assert dispatch(sp, "task", "create", "x", "--available-at", "2030-01-01").returncode == 2


def test_global_options_go_before_or_after_the_command(sp: ServeProcess) -> None:
    # No $DISPATCH_URL: only the option can name the API, wherever it stands.
    env = {**cli_env(sp, "alice", admin=False), "DISPATCH_URL": "http://127.0.0.1:9"}
    title = f"placed {uuid.uuid4().hex[:8]}"
    for args in (["--url", sp.api, "--json", "task", "create", title],
                 ["task", "create", title, "--url", sp.api, "--json"],
                 ["--url", "http://127.0.0.1:9", "task", "create", title, "--url", sp.api,
                  "--json"]):
        done = subprocess.run([sys.executable, "-m", "dispatch", *args], capture_output=True,
                              text=True, timeout=60, env=env)
        assert json.loads(ok(done))["title"] == title, args
    done = subprocess.run([sys.executable, "-m", "dispatch", "--version"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert ok(done).strip() == "dispatch 0.1.0"
    for args in (["serve", "--config", "/nonexistent.yaml"],
                 ["--config", "/nonexistent.yaml", "migrate"]):
        done = subprocess.run([sys.executable, "-m", "dispatch", *args], capture_output=True,
                              text=True, timeout=60, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert "cannot read config file /nonexistent.yaml" in done.stderr, done.stderr
