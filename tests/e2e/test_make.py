"""The Makefile as a newcomer meets it: `make run` installs the server, not the development set."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(target: str, where: Path) -> str:
    return subprocess.run(["make", "-n", target], cwd=where, capture_output=True, text=True,
                          check=True).stdout


def test_make_run_on_a_fresh_clone_installs_only_the_server(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    plan = dry_run("run", tmp_path)
    assert "pip install -q -e '.[server]'" in plan, plan
    assert ".[dev]" not in plan and "dispatch serve" in plan, plan
    # make test still installs the development set.
    assert "pip install -q -e '.[dev]'" in dry_run("test", tmp_path)
