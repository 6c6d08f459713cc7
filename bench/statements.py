"""Where the time goes inside Postgres: `python -m bench.statements` runs the in-process engine
phases (push and pull), and `python -m bench.statements rest` the REST lifecycle phase, on a
distribution-build cluster with pg_stat_statements loaded (tracking the statements inside the SQL
functions too) and prints the statements by total time. The embedded build has no
pg_stat_statements."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator

import psycopg

from bench.common import Sizes
from bench.engine import run_engine
from bench.pg import Cluster
from bench.rest import run_rest_lifecycle
from tests import pgdist

TOP = """
SELECT calls, round(total_exec_time::numeric, 1) AS total_ms,
       round((total_exec_time / calls)::numeric, 3) AS mean_ms, rows,
       regexp_replace(left(query, 110), '\\s+', ' ', 'g') AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)
ORDER BY total_exec_time DESC LIMIT %s
"""


@contextlib.contextmanager
def cluster_with_statements() -> Iterator[Cluster]:
    settings = {"shared_preload_libraries": "pg_stat_statements",
                "pg_stat_statements.track": "all"}
    with pgdist.cluster(durable=True, settings=settings) as url:
        yield Cluster(url, None, "distribution")


def report(cl: Cluster, dbname: str, top: int = 12) -> str:
    with psycopg.connect(cl.admin_url, autocommit=True) as conn:
        rows = conn.execute(TOP, (dbname, top)).fetchall()
    lines = ["| calls | total ms | mean ms | rows | statement |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {t} | {m} | {r} | `{q}` |" for c, t, m, r, q in rows]
    return "\n".join(lines)


def main() -> None:
    sizes = Sizes()
    with cluster_with_statements() as cl:
        with psycopg.connect(cl.admin_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if sys.argv[1:] == ["rest"]:
            rest = asyncio.run(run_rest_lifecycle(cl, sizes))
            print(f"\n### REST lifecycle: {rest.n} tasks, {rest.rate:,.0f}/s\n")
            print(report(cl, "rest_lifecycle", top=20))
            return
        for mode in ("push", "pull"):
            result = asyncio.run(run_engine(cl, sizes, mode))
            print(f"\n### engine {mode}: {result.n} tasks, drain {result.drain_rate:,.0f}/s\n")
            print(report(cl, f"engine_{mode}"))


if __name__ == "__main__":
    main()
