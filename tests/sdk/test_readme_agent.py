"""The README's ten-line agent, run as written (but for the URL) against a real `dispatch serve`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from dispatch.sdk.client import DispatchClient
from tests.sdk.conftest import eventually
from tests.serve import ServeProcess

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_agent() -> str:
    section = README.read_text().split("## Write an agent", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_readme_agent_is_ten_lines_and_works(sp: ServeProcess, tmp_path: Path) -> None:
    code = readme_agent()
    assert len(code.splitlines()) <= 10
    script = tmp_path / "agent.py"
    script.write_text(code.replace("http://localhost:8600", sp.api))
    with DispatchClient(sp.api, "alice") as alice:
        task = alice.create("summarise", description="a long text " * 40,
                            required_capabilities=["summarise"])
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            done = eventually(lambda: alice.get(task.task_id), lambda t: t.status == "completed")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert done.assigned_agent == "summariser-1"
        assert done.result == {"summary": task.description[:200]}
        assert done.progress == {"percent": 50, "message": "reading"}
