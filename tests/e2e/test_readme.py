"""The README's quickstart, executed: `make run` as a new user starts it, then the first-task
example verbatim (only the port differs, so the test can run beside a broker on 8600)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve import serve_ports

ROOT = Path(__file__).resolve().parents[2]


def first_task_script() -> str:
    """The shell lines of the README's "A first task, by hand" block, as one script."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"A first task, by hand.*?```sh\n(.*?)```", readme, re.S)
    assert match, "the README has no first-task example"
    return match.group(1)


def documents(text: str) -> list[object]:
    """The JSON documents curl printed one after another (it adds no newline)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        value, at = decoder.raw_decode(text, at)
        found.append(value)
    return found


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """`make run` on the embedded default, its data in tmp_path instead of ./.dispatch."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    api, ops = serve_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env |= {
        "DISPATCH_DATA_DIR": str(tmp_path / "data"),
        "DISPATCH_PORT": str(api),
        "DISPATCH_METRICS_PORT": str(ops),
    }
    log = (tmp_path / "make-run.log").open("wb")
    proc = subprocess.Popen(
        ["make", "-s", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "make-run.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{ops}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "make-run.log").read_text()
            time.sleep(0.2)
        yield api, ops
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have stopped on its own
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def run(script: str, api: int) -> str:
    script = script.replace("localhost:8600", f"localhost:{api}")
    done = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's example uses curl")
def test_the_readme_first_task_on_make_run(make_run: tuple[int, int]) -> None:
    api, _ = make_run
    agent, claimed, completed, events = documents(run(first_task_script(), api))
    assert isinstance(agent, dict) and isinstance(claimed, dict)
    assert isinstance(completed, dict) and isinstance(events, list)
    assert agent["agent_id"] == "worker-1" and agent["owner"] is None
    # The claim hands over the task, running, whether or not the assigner pushed it first.
    assert (claimed["title"], claimed["status"], claimed["assigned_agent"]) == (
        "fix the build", "running", "worker-1")
    assert claimed["requester"] == "alice" and claimed["owner"] is None
    assert (completed["task_id"], completed["status"], completed["result"]) == (
        claimed["task_id"], "completed", {"fixed": True})
    assert [e["event"] for e in events] == ["created", "assigned", "started", "completed"]
