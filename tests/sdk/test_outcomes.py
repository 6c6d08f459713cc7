"""Every attempt ends with an outcome: a result the broker refuses or that is not JSON fails the
task at once, not retryable, saying why (instead of the task running until its timeout and the
work running again); a chatty command's output is capped; NUL never reaches the broker; and a
worker that shuts down gives its unfinished tasks back without counting an attempt."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from dispatch.errors import Conflict, Forbidden
from dispatch.models import Task
from dispatch.sdk.client import DispatchClient
from dispatch.sdk.worker import TaskContext, TaskError, Worker
from tests.sdk import agent as agent_process
from tests.sdk.conftest import eventually
from tests.sdk.test_cli import cli_env
from tests.sdk.test_worker import working
from tests.serve import ServeProcess

TERMINAL = {"completed", "failed", "timed_out", "cancelled"}

# Each run appends the task's title to a file, then prints what its metadata asks for.
CHATTY = textwrap.dedent("""
    import json, sys
    task = json.load(sys.stdin)
    with open(sys.argv[1], "a") as runs:
        runs.write(task["title"] + "\\n")
    mode = task["metadata"]["mode"]
    if mode == "big":
        sys.stdout.write("x" * 10_000_000)
    elif mode == "nul-text":
        sys.stdout.write("before\\x00after")
    elif mode == "nul-json":
        print(json.dumps({"k\\x00": "v\\x00"}))
""")


def ended(client: DispatchClient, task: Task, within: float = 30) -> Task:
    return eventually(lambda: client.get(task.task_id), lambda t: t.status in TERMINAL,
                      timeout=within, what=f"{task.title} ended")


def run_command_worker(sp: ServeProcess, agent: str, tmp_path: Path, tasks: list[Task],
                       client: DispatchClient, *options: str) -> tuple[dict[str, Task], str]:
    runs = tmp_path / "runs.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch", "worker", "--poll", "1", *options,
         "--", sys.executable, "-c", CHATTY, str(runs)],
        env=cli_env(sp, agent, False), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done = {t.title: ended(client, t) for t in tasks}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # Each command ran once: nothing was retried behind the test's back.
    assert Counter(runs.read_text().split()) == {t.title: 1 for t in tasks}, err
    return done, err


def test_a_command_printing_10_mb_completes_once_with_its_output_capped(
    sp: ServeProcess, tmp_path: Path
) -> None:
    with DispatchClient(sp.api, "alice") as alice:
        big = alice.create("big", metadata={"mode": "big"}, max_retries=3, timeout_seconds=3600)
        text = alice.create("nultext", metadata={"mode": "nul-text"}, max_retries=3)
        js = alice.create("nuljson", metadata={"mode": "nul-json"}, max_retries=3)
        started = time.monotonic()
        done, err = run_command_worker(sp, "chatty", tmp_path, [big, text, js], alice)
        assert time.monotonic() - started < 30
    assert done["big"].status == "completed", done["big"]
    assert done["big"].retry_count == 0
    assert done["big"].result == {"output": "x" * 256 * 1024, "truncated": True,
                                  "output_bytes": 10_000_000}
    assert done["nultext"].status == "completed"
    assert done["nultext"].result == "before\ufffdafter"
    assert done["nuljson"].status == "completed"
    assert done["nuljson"].result == {"k\ufffd": "v\ufffd"}
    assert "3 completed, 0 failed" in err


def test_output_the_broker_refuses_fails_the_task_once_saying_why(
    sp: ServeProcess, tmp_path: Path
) -> None:
    """--max-output above the broker's body limit (1 MiB): the completion is refused (413); the
    task fails at once, not retryable, with the reason, and the command ran once."""
    with DispatchClient(sp.api, "alice") as alice:
        big = alice.create("big", metadata={"mode": "big"}, max_retries=3, timeout_seconds=3600)
        done, err = run_command_worker(sp, "chatty-2", tmp_path, [big], alice,
                                       "--max-output", str(4 * 1024 * 1024))
        events = [e.event for e in alice.events(big.task_id)]
    task = done["big"]
    assert task.status == "failed" and task.retry_count == 0, task
    assert task.error is not None
    assert task.error.startswith("result refused by the broker: 413 request body too large "
                                 "(limit 1048576 bytes); the completion was "), task.error
    assert events.count("assigned") == 1 and events[-2:] == ["failed", "dlq"], events
    assert "0 completed, 1 failed" in err


def test_results_that_cannot_be_stored_fail_at_once_and_are_not_run_again(
    sp: ServeProcess,
) -> None:
    ran: Counter[str] = Counter()
    worker = Worker(sp.api, "w-odd", concurrency=4, poll_seconds=1)

    @worker.handler
    async def odd(ctx: TaskContext) -> object:
        ran[ctx.task.title] += 1
        match ctx.task.title:
            case "nan":
                return {"score": [1.0, float("nan")]}
            case "object":
                return {"thing": object()}
            case "huge":
                return "y" * (2 * 1024 * 1024)
            case "nul-result":
                return {"text": "a\x00b"}
            case _:
                raise TaskError("bad byte: \x00 here")

    titles = ["nan", "object", "huge", "nul-result", "nul-error"]
    with DispatchClient(sp.api, "alice") as alice, working(worker):
        # A TaskError is retryable by design: with no retries left its failure ends the task.
        tasks = [alice.create(t, max_retries=0 if t == "nul-error" else 3,
                              timeout_seconds=3600) for t in titles]
        done = {t.title: ended(alice, t, within=20) for t in tasks}
    assert ran == {t: 1 for t in titles}
    for title, task in done.items():
        assert task.status == "failed" and task.retry_count == 0, (title, task)
    assert done["nan"].error == "result is not JSON: NaN at result['score'][1]"
    assert done["object"].error == (
        "result is not JSON: Object of type object is not JSON serializable")
    assert done["huge"].error is not None and done["huge"].error.startswith(
        "result refused by the broker: 413 request body too large (limit 1048576 bytes); "
        "the completion was 2,097,154 bytes")
    assert done["nul-result"].error == (
        "result is not storable: a NUL character in result['text'] "
        "(PostgreSQL text cannot hold one)")
    assert done["nul-error"].error == "bad byte: \ufffd here"


def test_sigterm_gives_a_task_with_no_retries_back_without_counting_an_attempt(
    sp: ServeProcess, tmp_path: Path
) -> None:
    with DispatchClient(sp.api, "alice") as alice:
        task = alice.create("long", metadata={"seconds": 60}, max_retries=0)
        log_path = tmp_path / "worker.log"
        with agent_process.running(sp.api, "w-rel", 0.5, log_path) as proc:
            eventually(lambda: alice.get(task.task_id), lambda t: t.status == "running",
                       timeout=60, what="the task running")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()
        now = alice.get(task.task_id)
        events = alice.events(task.task_id)
    assert now.status == "pending", (now.status, now.error, log_path.read_text())
    assert now.retry_count == 0 and now.error is None
    assert now.assigned_agent is None and now.previous_agents == ["w-rel"]
    assert [e.event for e in events] == ["created", "assigned", "started", "released"]
    assert events[-1].actor == "w-rel"
    assert events[-1].payload["reason"] == "worker shut down"


def test_release_is_the_holders_alone_and_fenced(sp: ServeProcess) -> None:
    with DispatchClient(sp.api, "alice") as alice, DispatchClient(sp.api, "w-a") as agent, \
            DispatchClient(sp.api, "w-b") as stranger:
        agent.register()
        task = alice.create("held", max_retries=0)
        claimed = agent.claim(wait_seconds=5)
        assert claimed is not None and claimed.task_id == task.task_id
        for who in (stranger, alice):
            with pytest.raises(Forbidden):
                who.release(task.task_id, "not mine")
        back = agent.release(task.task_id, "later", lease=claimed.lease)
        assert back.status == "pending" and back.retry_count == 0
        with pytest.raises(Conflict):
            agent.release(task.task_id, "again", lease=claimed.lease)
        # Nothing else fits: the agent that gave it back may take it again, on a new lease.
        again = agent.claim(wait_seconds=5)
        assert again is not None and again.task_id == task.task_id
        assert again.lease != claimed.lease and again.retry_count == 0
