"""Sizes (environment variables with modest defaults), percentiles and timing helpers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


@dataclass(frozen=True)
class Sizes:
    """Every size of the run; `python -m bench --help` lists the variables."""

    latency_rate: int = field(default_factory=lambda: _int("BENCH_LATENCY_RATE", 200))
    latency_seconds: float = field(default_factory=lambda: _float("BENCH_LATENCY_SECONDS", 15))
    rest_tasks: int = field(default_factory=lambda: _int("BENCH_REST_TASKS", 4000))
    rest_agents: int = field(default_factory=lambda: _int("BENCH_REST_AGENTS", 8))
    # Enough requesters that the agents have a line to take from: with 4, each waiting on its
    # create's commit, the agents outran them and most tasks went through the assigner's push to
    # a waiting agent, so the phase timed the requesters rather than the broker.
    rest_producers: int = field(default_factory=lambda: _int("BENCH_REST_PRODUCERS", 16))
    ceiling_seconds: float = field(default_factory=lambda: _float("BENCH_CEILING_SECONDS", 8))
    engine_tasks: int = field(default_factory=lambda: _int("BENCH_ENGINE_TASKS", 10000))
    flow_rounds: int = field(default_factory=lambda: _int("BENCH_FLOW_ROUNDS", 3))
    producers: int = field(default_factory=lambda: _int("BENCH_PRODUCERS", 4))
    connections: int = field(default_factory=lambda: _int("BENCH_CONNECTIONS", 8))
    pgq_consumers: int = field(default_factory=lambda: _int("BENCH_PGQ_CONSUMERS", 4))
    pgq_batch: int = field(default_factory=lambda: _int("BENCH_PGQ_BATCH", 10))
    assign_batch: int = field(default_factory=lambda: _int("BENCH_ASSIGN_BATCH", 10))
    scale_small: int = field(default_factory=lambda: _int("BENCH_SCALE_SMALL", 10_000))
    scale_large: int = field(default_factory=lambda: _int("BENCH_SCALE_LARGE", 1_000_000))
    scale_samples: int = field(default_factory=lambda: _int("BENCH_SCALE_SAMPLES", 1000))
    backlog_pending: int = field(default_factory=lambda: _int("BENCH_BACKLOG_PENDING", 10_000))
    backlog_samples: int = field(default_factory=lambda: _int("BENCH_BACKLOG_SAMPLES", 2000))
    soak_seconds: float = field(default_factory=lambda: _float("BENCH_SOAK_SECONDS", 1800))
    soak_rate: int = field(default_factory=lambda: _int("BENCH_SOAK_RATE", 200))
    soak_sample_seconds: float = field(
        default_factory=lambda: _float("BENCH_SOAK_SAMPLE_SECONDS", 60)
    )
    soak_retention_minutes: float = field(
        default_factory=lambda: _float("BENCH_SOAK_RETENTION_MINUTES", 5)
    )
    soak_prune_seconds: float = field(
        default_factory=lambda: _float("BENCH_SOAK_PRUNE_SECONDS", 10)
    )
    replicas_tasks: int = field(default_factory=lambda: _int("BENCH_REPLICAS_TASKS", 1500))
    replicas_kill_every: float = field(
        default_factory=lambda: _float("BENCH_REPLICAS_KILL_EVERY", 5.0)
    )
    phase_timeout: float = field(default_factory=lambda: _float("BENCH_PHASE_TIMEOUT", 180))


ENV_HELP = """Environment variables (defaults in brackets):
  BENCH_PG                 the Postgres build to start: embedded (pgserver 16, no JIT) or
                           distribution (pg_config --bindir, e.g. Debian 15, JIT on) [embedded]
  BENCH_DATABASE_URL       superuser URL of an existing server instead [unset]
  BENCH_LATENCY_RATE       HTTP creates per second for create->assigned latency [200]
  BENCH_LATENCY_SECONDS    how long that load runs [15]
  BENCH_REST_TASKS         tasks through the full REST lifecycle [4000]
  BENCH_REST_AGENTS        concurrent agents (one connection each) over REST [8]
  BENCH_REST_PRODUCERS     concurrent requesters creating over REST [16]
  BENCH_CEILING_SECONDS    duration of the trivial Litestar endpoint ceiling [8]
  BENCH_ENGINE_TASKS       tasks per in-process engine / peer run [10000]
  BENCH_FLOW_ROUNDS        drains with and without flow control per mode, alternating order [3]
  BENCH_PRODUCERS          concurrent single-row enqueuers for every system [4]
  BENCH_CONNECTIONS        database connections of the consumers (Dispatch, raw, procrastinate) [8]
  BENCH_PGQ_CONSUMERS      pgqueuer consumers (QueueManagers) [4]
  BENCH_PGQ_BATCH          pgqueuer dequeue batch size [10]
  BENCH_ASSIGN_BATCH       Dispatch task_assign batch size [10]
  BENCH_SCALE_SMALL        terminal rows for the small scale point [10000]
  BENCH_SCALE_LARGE        terminal rows for the large scale point [1000000]
  BENCH_SCALE_SAMPLES      timed claims and assigns per scale point [1000]
  BENCH_SOAK_SECONDS       soak duration (make bench-soak only) [1800]
  BENCH_SOAK_RATE          soak lifecycle rate, tasks/s [200]
  BENCH_SOAK_SAMPLE_SECONDS soak sampling interval [60]
  BENCH_SOAK_RETENTION_MINUTES retention of the soak's pruner [5]
  BENCH_SOAK_PRUNE_SECONDS seconds between the soak's pruner rounds [10]
  BENCH_BACKLOG_PENDING    pending tasks behind saturated agents in the backlog phase [10000]
  BENCH_BACKLOG_SAMPLES    timed complete+claim pairs in the backlog phase [2000]
  BENCH_REPLICAS_TASKS     tasks through 3 serve replicas under kill -9 [1500]
  BENCH_REPLICAS_KILL_EVERY seconds between kills of a replica [5]
  BENCH_PHASE_TIMEOUT      upper bound of any one phase, seconds [180]
  BENCH_ONLY               comma list of phases to run [all]:
                           latency,rest,engine,peers,scale,backlog,replicas
  BENCH_OUTPUT             report file [BENCHMARKS.md]
"""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Latencies:
    """Milliseconds of repeated calls."""

    def __init__(self) -> None:
        self.ms: list[float] = []

    def add_since(self, t0: float) -> None:
        self.ms.append((time.perf_counter() - t0) * 1000)

    def p(self, q: float) -> float:
        return percentile(self.ms, q)
