"""docs/workflows.md's worked example, both blocks run as written (but for the URL) against a
real `dispatch serve`: the planner's three-step plan with a review and an approval, followed to
the end, and the agent that does the steps."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.serve import ServeProcess

DOC = Path(__file__).resolve().parents[2] / "docs" / "workflows.md"


def blocks() -> list[str]:
    section = DOC.read_text().split("## A worked example", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_worked_example_runs_to_the_end(sp: ServeProcess, tmp_path: Path) -> None:
    planner_code, agent_code = blocks()
    planner = tmp_path / "planner.py"
    planner.write_text(planner_code.replace("http://localhost:8600", sp.api))
    agent = tmp_path / "agent.py"
    agent.write_text(agent_code.replace("http://localhost:8600", sp.api))
    worker = subprocess.Popen([sys.executable, str(agent)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        done = subprocess.run([sys.executable, str(planner)], capture_output=True, text=True,
                              timeout=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker_out, _ = worker.communicate(timeout=60)
    assert done.returncode == 0, done.stderr + worker_out
    lines = done.stdout.splitlines()
    article = [line.split(": ", 1)[1] for line in lines if line.startswith("article: ")]
    publish = [line.split(": ", 1)[1] for line in lines if line.startswith("publish: ")]
    assert article[:3] == ["created", "blocked", "unblocked"]
    assert article[-3:] == ["in_review", "accepted", "completed"]
    assert publish[:4] == ["created", "blocked", "approved", "unblocked"]
    assert publish[-1] == "completed"
    # The result of the last step carries the article's, which carries the sources'.
    result = lines[-1]
    assert "publish the article" in result and "write the article" in result
    assert "collect sources on tidal power" in result
