"""The benchmark runs end to end with tiny sizes and writes its report (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


BUILD = "distribution" if os.environ.get("DISPATCH_TEST_PG") == "distribution" else "embedded"


def test_bench_runs_and_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    env = {
        **os.environ,
        "BENCH_PG": BUILD,
        "BENCH_ONLY": "engine,peers,scale",
        "BENCH_ENGINE_TASKS": "40",
        "BENCH_SCALE_SMALL": "100",
        "BENCH_SCALE_LARGE": "300",
        "BENCH_SCALE_SAMPLES": "10",
        "BENCH_OUTPUT": str(out),
    }
    env.pop("BENCH_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for row in ("Dispatch engine (push)", "Dispatch engine (pull)", "pgqueuer", "procrastinate",
                "raw SKIP LOCKED (floor)", "cost per task", "terminal rows"):
        assert row in report, row
    assert "not available" not in report
    assert f"## Run on the {BUILD} build" in report


def test_a_failed_phase_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    env = {
        **os.environ,
        "BENCH_PG": BUILD,
        "BENCH_ONLY": "engine,scale",
        "BENCH_ENGINE_TASKS": "200",
        "BENCH_SCALE_SMALL": "100",
        "BENCH_SCALE_LARGE": "300",
        "BENCH_SCALE_SAMPLES": "10",
        "BENCH_PHASE_TIMEOUT": "0.001",  # the engine phases time out (a TimeoutError, no message)
        "BENCH_OUTPUT": str(out),
    }
    env.pop("BENCH_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "failed: TimeoutError" in report
    assert "terminal rows" in report  # the scale phase still ran
