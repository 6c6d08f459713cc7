"""Where the WAL of a task goes: `python -m bench.wal [push|pull]` runs an in-process engine phase
on a distribution-build cluster and prints `pg_waldump --stats` of the WAL between the phase's own
counter reads (the WAL bytes per task of its cost row), by resource manager and by record type,
with the bytes per task. The embedded build ships no pg_waldump."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from bench.common import Sizes
from bench.engine import run_engine
from bench.pg import Cluster
from tests import pgdist


def waldump(cluster: pgdist.Cluster, start: str, end: str, kind: str) -> str:
    """`pg_waldump --stats=kind` over [start, end) of the cluster's WAL."""
    proc = subprocess.run(
        [f"{cluster.bin}/pg_waldump", f"--stats={kind}", "-p", str(cluster.data / "pg_wal"),
         "-s", start, "-e", end],
        capture_output=True, text=True, check=True,
    )
    return proc.stdout


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "push"
    sizes = Sizes()
    with pgdist.running(durable=True) as c:
        result = asyncio.run(run_engine(Cluster(c.url, None, "distribution"), sizes, mode))
        assert result.cost is not None
        start, end = result.cost.wal_span
        print(f"### engine {mode}: {result.n} tasks, {result.cost.wal_bytes / result.n:,.0f} B"
              f" of WAL a task ({start} -> {end})\n")
        for kind in ("rmgr", "record"):
            print(waldump(c, start, end, kind))


if __name__ == "__main__":
    main()
