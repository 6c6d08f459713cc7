"""Server time per lifecycle call, without clients, commits or contention: `python -m bench.calls
[N] [embedded|distribution]` runs N lifecycles (create, claim with start, complete) of one agent
inside a plpgsql loop, six times (each its own transaction), and prints the mean microseconds of
each call per round, timed by the server's clock. What a transition costs Postgres by itself, to
compare two versions of the SQL functions (the engine phases of `make bench` add commits, locks
and the client)."""

from __future__ import annotations

import sys

import psycopg

from bench.pg import cluster, prepare_dispatch

ROUNDS = 6

LOOP = """
DO $$
DECLARE
    t0 timestamptz; tid uuid;
    a interval := '0'; b interval := '0'; d interval := '0';
BEGIN
    FOR i IN 1..{n} LOOP
        t0 := clock_timestamp();
        tid := (dispatch.task_create(title => 't', requester => 'r')).task.task_id;
        a := a + (clock_timestamp() - t0);
        t0 := clock_timestamp();
        PERFORM dispatch.task_claim('a1', NULL, now(), 1, true);
        b := b + (clock_timestamp() - t0);
        t0 := clock_timestamp();
        PERFORM dispatch.task_complete(tid, 'a1', '{{}}');
        d := d + (clock_timestamp() - t0);
    END LOOP;
    RAISE NOTICE 'us per call: create % | claim+start % | complete %',
        round(extract(epoch FROM a) * 1e6 / {n}), round(extract(epoch FROM b) * 1e6 / {n}),
        round(extract(epoch FROM d) * 1e6 / {n});
END $$
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    build = sys.argv[2] if len(sys.argv) > 2 else "embedded"
    with cluster(build=build) as cl:
        url = cl.create_database("calls")
        prepare_dispatch(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.add_notice_handler(lambda d: print(f"{build}: {d.message_primary}"))
            conn.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
            for _ in range(ROUNDS):
                conn.execute(LOOP.format(n=n))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
