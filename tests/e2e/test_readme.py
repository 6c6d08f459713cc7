"""The README's quickstart, executed: `make run` as a new user starts it, then the first-task
example verbatim (only the port differs, so the test can run beside a broker on 8600)."""

from __future__ import annotations

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

from tests.serve import free_port

ROOT = Path(__file__).resolve().parents[2]


def first_task_commands() -> list[str]:
    """The shell commands of the README's "A first task, by hand" block, one per entry."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"A first task, by hand.*?```sh\n(.*?)```", readme, re.S)
    assert match, "the README has no first-task example"
    joined = match.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("curl")]


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """`make run` on the embedded default, its data in tmp_path instead of ./.dispatch."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    api, ops = free_port(), free_port()
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
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def run(command: str, api: int) -> str:
    command = command.replace("localhost:8600", f"localhost:{api}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's example uses curl")
def test_the_readme_first_task_on_make_run(make_run: tuple[int, int]) -> None:
    api, _ = make_run
    register, create, listing = first_task_commands()
    agent = json.loads(run(register, api))
    assert agent["agent_id"] == "worker-1" and agent["owner"] is None
    task = json.loads(run(create, api))
    assert task["requester"] == "alice" and task["owner"] is None
    deadline = time.monotonic() + 10
    while not (assigned := json.loads(run(listing, api))):
        assert time.monotonic() < deadline, "the task was never assigned to worker-1"
        time.sleep(0.1)
    assert [t["task_id"] for t in assigned] == [task["task_id"]]
    assert assigned[0]["assigned_agent"] == "worker-1"
