"""The benchmark runs end to end with tiny sizes and writes its report (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pgdist

REPO = Path(__file__).resolve().parents[2]
BUILD = "distribution" if os.environ.get("DISPATCH_TEST_PG") == "distribution" else "embedded"
TINY = {
    "BENCH_PG": BUILD,
    "BENCH_ENGINE_TASKS": "40",
    "BENCH_SCALE_SMALL": "100",
    "BENCH_SCALE_LARGE": "300",
    "BENCH_SCALE_SAMPLES": "10",
    "BENCH_BACKLOG_PENDING": "200",
    "BENCH_BACKLOG_SAMPLES": "20",
}


def bench(out: Path, timeout: float = 120, **env: str) -> str:
    full = {**os.environ, **TINY, **env, "BENCH_OUTPUT": str(out)}
    full.pop("BENCH_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench"], cwd=REPO, env=full, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    # A failed phase's reason (with serve's log) is on stderr; the report keeps its first line.
    assert "failed" not in report or env.get("BENCH_PHASE_TIMEOUT"), proc.stderr[-6000:]
    return report


def test_bench_runs_and_writes_its_table(tmp_path: Path) -> None:
    report = bench(tmp_path / "BENCHMARKS.md", BENCH_ONLY="engine,peers,scale,backlog")
    for row in ("Dispatch engine (push)", "Dispatch engine (pull)", "pgqueuer", "procrastinate",
                "raw SKIP LOCKED (floor)", "cost per task", "terminal rows",
                "pending behind saturated agents", "pending no agent can take",
                "flow control overhead, Dispatch engine (push)",
                "flow control overhead, Dispatch engine (pull)", "the median of 3 rounds"):
        assert row in report, row
    assert "not available" not in report
    assert f"## Run on the {BUILD} build" in report


def test_the_http_phases_run_against_a_real_serve(tmp_path: Path) -> None:
    """The phases that drive `dispatch serve` over HTTP (with the other test above, every phase
    of `make bench` runs here): none may report "failed" (the REST phase did, unnoticed, when
    registering an agent's owner became admin-only)."""
    report = bench(
        tmp_path / "BENCHMARKS.md", timeout=300, BENCH_ONLY="latency,rest,replicas",
        BENCH_LATENCY_RATE="20", BENCH_LATENCY_SECONDS="2", BENCH_REST_TASKS="60",
        BENCH_CEILING_SECONDS="1", BENCH_REPLICAS_TASKS="60", BENCH_REPLICAS_KILL_EVERY="1",
    )
    assert "failed" not in report and "not available" not in report, report
    for row in ("1. create->assigned, HTTP create at 20/s", "2. full lifecycle over REST",
                "trivial Litestar JSON ceiling", "tasks from claims",
                "serve's CPU per request, REST lifecycle vs the trivial Litestar handler",
                "4. cost per task, Dispatch over REST",
                "0 double assignments, 0 lost, 0 over limit"):
        assert row in report, row


def test_a_failed_phase_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    # The engine phases time out (a TimeoutError, no message); the scale phase still runs.
    report = bench(tmp_path / "BENCHMARKS.md", BENCH_ONLY="engine,scale",
                   BENCH_ENGINE_TASKS="200", BENCH_PHASE_TIMEOUT="0.001")
    assert "failed: TimeoutError" in report
    assert "terminal rows" in report


def test_each_build_keeps_its_own_section(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# head\n\n<!-- run:distribution:begin -->\nother build\n"
                   "<!-- run:distribution:end -->\n")
    report = bench(out, BENCH_ONLY="scale", BENCH_PG="embedded")
    assert report.startswith("# head") and "other build" in report
    assert "## Run on the embedded build" in report


def test_the_per_call_loop_reports_every_round() -> None:
    """`python -m bench.calls`: the server-timed loop behind the per-call rows of BENCHMARKS.md."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.calls", "5", BUILD], cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [line for line in proc.stdout.splitlines() if "us per call" in line]
    assert len(rounds) == 6, proc.stdout
    for line in rounds:
        numbers = [int(part.split()[-1]) for part in line.split("|")]
        assert len(numbers) == 3 and all(x > 0 for x in numbers), line


def distribution_tool(module: str, *args: str) -> str:
    """`python -m module args` at tiny sizes; these tools run on the distribution build only."""
    try:
        pgdist.bindir()
    except pgdist.DistributionMissing as exc:
        pytest.skip(f"needs the distribution's PostgreSQL: {exc}")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env={**os.environ, **TINY},
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_the_wal_breakdown_names_the_records_of_a_phase() -> None:
    """`python -m bench.wal`: pg_waldump of the push phase's WAL, behind BENCHMARKS.md's "Where
    the WAL goes"."""
    out = distribution_tool("bench.wal", "push")
    assert "### engine push: 40 tasks" in out and "B of WAL a task" in out, out
    for record in ("Heap/INSERT", "Heap/UPDATE", "Btree/INSERT_LEAF", "Transaction/COMMIT"):
        assert record in out, record


def test_the_statement_breakdown_lists_the_engine_statements() -> None:
    """`python -m bench.statements`: pg_stat_statements of the engine phases."""
    out = distribution_tool("bench.statements")
    for heading in ("### engine push: 40 tasks", "### engine pull: 40 tasks"):
        assert heading in out, out
    assert "dispatch.task_report_batch_then_claim" in out and "dispatch.task_create" in out, out


def test_the_soak_runs_with_retention_and_keeps_each_build(tmp_path: Path) -> None:
    """`make bench-soak` with tiny sizes: the pruner runs beside the load (history partitions
    created), the samples reach the report, and another build's soak section stays."""
    out = tmp_path / "BENCHMARKS.md"
    other = "<!-- soak:external:begin -->\nother soak\n<!-- soak:external:end -->"
    out.write_text(f"# head\n\n{other}\n")
    full = {**os.environ, **TINY, "BENCH_OUTPUT": str(out), "BENCH_SOAK_SECONDS": "6",
            "BENCH_SOAK_SAMPLE_SECONDS": "2", "BENCH_SOAK_RATE": "50",
            "BENCH_SOAK_RETENTION_MINUTES": "1", "BENCH_SOAK_PRUNE_SECONDS": "1"}
    full.pop("BENCH_DATABASE_URL", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--soak"], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert f"## Soak (`make bench-soak`) on the {BUILD} build" in report
    assert "other soak" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "|---" not in line]
    samples = [r.split(" | ") for r in rows[1:]]
    assert len(samples) >= 2, report
    assert int(samples[-1][1].replace(",", "")) > 0  # tasks completed
    assert int(samples[-1][6]) >= 1  # history partitions the pruner created
    assert "Too short for a steady state" in report  # 6 s: no steady state after a minute
