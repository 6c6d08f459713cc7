"""The table: printed, and written to BENCHMARKS.md with the machine, versions and settings."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from bench.backlog import BacklogResult
from bench.common import Sizes, percentile
from bench.replicas import ReplicasResult
from bench.rest import CeilingResult, LatencyResult, RestResult
from bench.results import Throughput, Unavailable
from bench.scale import ScalePoint
from bench.soak import SoakResult, SoakSample

SOAK_BEGIN = "<!-- soak:begin -->"
SOAK_END = "<!-- soak:end -->"
ANALYSIS_BEGIN = "<!-- analysis:begin -->"
ANALYSIS_END = "<!-- analysis:end -->"
PACKAGES = ("dispatch-broker", "litestar", "uvicorn", "uvloop", "httptools", "msgspec", "psycopg",
            "psycopg-pool", "pgqueuer", "procrastinate", "asyncpg", "pgserver")


@dataclass
class Report:
    command: str
    sizes: Sizes
    started: str
    build: str = "embedded"
    finished: str = ""
    pg_settings: dict[str, str] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""
    latency: LatencyResult | Unavailable | None = None
    rest: RestResult | Unavailable | None = None
    ceiling: CeilingResult | Unavailable | None = None
    engines: list[Throughput | Unavailable] = field(default_factory=list)
    # Per engine mode, the drain rates (without, with) flow control of each round.
    flow_pairs: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    peers: list[Throughput | Unavailable] = field(default_factory=list)
    scale: list[ScalePoint] | Unavailable | None = None
    backlog: BacklogResult | Unavailable | None = None
    replicas: ReplicasResult | Unavailable | None = None
    notes: list[str] = field(default_factory=list)


def _f(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1048576:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {
        "cpu": f"{cpu} x {os.cpu_count()} logical cores",
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": commit or "?",
    }


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("holds" if ok else "MISSES")


def results_table(r: Report) -> list[list[str]]:
    """Rows: what, measured, target, verdict."""
    rows: list[list[str]] = []
    # 1
    lat = r.latency
    if isinstance(lat, LatencyResult) and lat.assigned_ms:
        p50, p95, p99 = (percentile(lat.assigned_ms, q) for q in (50, 95, 99))
        rows.append([
            f"1. create->assigned, HTTP create at {lat.rate}/s, idle agents "
            f"(n={lat.measured})",
            f"p50 {_f(p50, 2)} ms, p95 {_f(p95, 2)} ms, p99 {_f(p99, 2)} ms "
            f"(POST p50 {_f(percentile(lat.post_ms, 50), 2)} / p99 "
            f"{_f(percentile(lat.post_ms, 99), 2)} ms)",
            "p50 <= 3 ms, p99 <= 15 ms", _verdict(p50 <= 3 and p99 <= 15),
        ])
        if lat.late_sends or lat.measured < lat.sent - lat.rate:
            rows.append(["1. (detail) load generator", f"{lat.late_sends} sends more than 5 ms "
                         f"late; {lat.measured} of {lat.sent} tasks measured", "", ""])
    elif isinstance(lat, Unavailable):
        rows.append([f"1. {lat.what}", f"not available: {lat.why}", "p50 <= 3, p99 <= 15 ms",
                     "n/a"])
    # 2
    rest, ceil = r.rest, r.ceiling
    if isinstance(rest, RestResult):
        reqs = sum(rest.requests.values())
        line = (f"{_f(rest.rate, 0)} tasks/s ({rest.n} tasks, {rest.agents} agents, "
                f"{rest.producers} requesters; {reqs / rest.n:.2f} requests/task, "
                f"{_f(rest.request_rate, 0)} req/s)")
        if isinstance(ceil, CeilingResult):
            line += (f"; trivial Litestar JSON ceiling {_f(ceil.rate, 0)} req/s -> lifecycle = "
                     f"{rest.rate / ceil.rate:.3f} x ceiling, requests = "
                     f"{rest.request_rate / ceil.rate:.2f} x ceiling")
        rows.append(["2. full lifecycle over REST (create, assign/claim, start, complete)", line,
                     ">= 1,000 tasks/s", _verdict(rest.rate >= 1000)])
        per = ", ".join(
            f"{k} {len(v)}x p50 {_f(percentile(v, 50), 1)} / p99 {_f(percentile(v, 99), 1)} ms"
            for k, v in rest.latency_ms.items() if v
        )
        detail = (f"requests: {per}; {rest.claimed} tasks from claims, {rest.handed} from"
                  f" completions' next; {rest.pushed} pushed by the assigner")
        if rest.cpu is not None:
            detail += "; " + rest.cpu.describe(rest.n)
        rows.append(["2. (detail) REST lifecycle requests and CPU", detail, "", ""])
        if rest.cpu is not None and isinstance(ceil, CeilingResult) and ceil.cpu_s > 0:
            mine = 1e6 * rest.cpu.serve / reqs
            ratio = mine / ceil.cpu_us_per_request
            rows.append([
                "2. serve's CPU per request, REST lifecycle vs the trivial Litestar handler",
                f"{_f(mine, 0)} us vs {_f(ceil.cpu_us_per_request, 0)} us ({ratio:.1f}x; serve's "
                f"includes its assigner, listener and reaper, the trivial server has none)",
                "<= 3x", _verdict(ratio <= 3),
            ])
    elif isinstance(rest, Unavailable):
        extra = ""
        if isinstance(ceil, CeilingResult):
            extra = f" (trivial Litestar JSON ceiling measured: {_f(ceil.rate, 0)} req/s)"
        rows.append([f"2. {rest.what}", f"not available: {rest.why}{extra}", ">= 1,000 tasks/s",
                     "n/a"])
    # 3
    pgq = next((p for p in r.peers if isinstance(p, Throughput) and p.system == "pgqueuer"), None)
    for e in r.engines:
        if isinstance(e, Unavailable):
            rows.append([f"3. {e.what}", f"not available: {e.why}", "", "n/a"])
            continue
        ratios = []
        for p in r.peers:
            if isinstance(p, Throughput):
                ratios.append(f"{p.system} {e.lifecycle_rate / p.lifecycle_rate:.2f}x "
                              f"(drain {e.drain_rate / p.drain_rate:.2f}x)")
        rows.append([
            f"3. {e.system}: {e.settings}",
            f"lifecycle {_f(e.lifecycle_rate, 0)} tasks/s (submit {_f(e.enqueue_rate, 0)}/s, "
            f"assign+start+complete {_f(e.drain_rate, 0)}/s); Dispatch / peer: "
            + "; ".join(ratios)
            + (f"; {e.cpu.describe(e.n)}" if e.cpu else ""),
            ">= pgqueuer drain rate",
            _verdict(e.lifecycle_rate >= pgq.drain_rate) if pgq else "n/a",
        ])
    for p in r.peers:
        if isinstance(p, Unavailable):
            rows.append([f"3. {p.what}", f"not available: {p.why}", "", ""])
        else:
            rows.append([
                f"3. {p.system}: {p.settings}",
                f"enqueue->complete {_f(p.lifecycle_rate, 0)} tasks/s (enqueue "
                f"{_f(p.enqueue_rate, 0)}/s, drain {_f(p.drain_rate, 0)}/s)"
                + (f"; {p.cpu.describe(p.n)}" if p.cpu else ""),
                "peer", "",
            ])
    # 4
    for label, item in [(e.system, e) for e in r.engines if isinstance(e, Throughput)] + [
        (p.system, p) for p in r.peers if isinstance(p, Throughput)
    ]:
        if item.cost is None:
            continue
        commits, wal = item.cost.per(item.n)
        is_dispatch = label.startswith("Dispatch")
        pg_us = item.cpu.postgres / item.n * 1e6 if item.cpu else None
        rows.append([
            f"4. cost per task, {label}",
            f"{commits:.2f} commits, {_f(wal, 0)} B WAL, {item.cost.xids / item.n:.2f} write "
            f"xacts, {item.cost.wal_fpi} full-page images"
            + (f", {_f(pg_us, 0)} us Postgres CPU" if pg_us is not None else ""),
            "<= 2 commits, <= 3 KB WAL, <= 1 ms Postgres CPU" if is_dispatch else "",
            _verdict(commits <= 2 and wal <= 3072 and (pg_us or 0) <= 1000)
            if is_dispatch else "",
        ])
    if isinstance(rest, RestResult):
        commits, wal = rest.cost.per(rest.n)
        rows.append([
            "4. cost per task, Dispatch over REST (serve's loops included)",
            f"{commits:.2f} commits, {_f(wal, 0)} B WAL, {rest.cost.xids / rest.n:.2f} write "
            f"xacts, {rest.cost.wal_fpi} full-page images",
            "<= 3 commits", _verdict(commits <= 3),
        ])
    # 5
    if isinstance(r.scale, list) and len(r.scale) == 3:
        small, large, stranded = r.scale
        for name, a, b in (("claim (task_claim)", small.claim, large.claim),
                           (f"assign (task_assign batch {small.assign_batch})",
                            small.assign, large.assign)):
            ratio = b.p(99) / a.p(99)
            rows.append([
                f"5. {name} p99, {small.terminal_rows:,} vs {large.terminal_rows:,} terminal rows",
                f"p50 {_f(a.p(50), 2)} / p99 {_f(a.p(99), 2)} ms vs p50 {_f(b.p(50), 2)} / p99 "
                f"{_f(b.p(99), 2)} ms (table {_f(small.table_mb)} vs {_f(large.table_mb)} MB); "
                f"ratio {ratio:.2f}",
                "p99 within 1.5x", _verdict(ratio <= 1.5),
            ])
        for name, a, b in (("claim", small.claim, stranded.claim),
                           ("assign", small.assign, stranded.assign)):
            ratio = b.p(99) / a.p(99)
            rows.append([
                f"5. {name} p99 behind {stranded.stranded_rows:,} pending no agent can take, vs "
                f"{small.terminal_rows:,} terminal rows",
                f"p50 {_f(b.p(50), 2)} / p99 {_f(b.p(99), 2)} ms; ratio {ratio:.2f}",
                "p99 within 1.5x", _verdict(ratio <= 1.5),
            ])
    elif isinstance(r.scale, Unavailable):
        rows.append([f"5. {r.scale.what}", f"not available: {r.scale.why}", "p99 within 1.5x",
                     "n/a"])
    if isinstance(r.backlog, BacklogResult):
        bl = r.backlog
        base = r.scale[0].claim if isinstance(r.scale, list) and r.scale else None
        ratio = bl.claim.p(99) / base.p(99) if base is not None and base.ms else float("nan")
        rows.append([
            f"5. claim p99 with {bl.pending:,} pending behind saturated agents, assigner running",
            f"claim p50 {_f(bl.claim.p(50), 2)} / p99 {_f(bl.claim.p(99), 2)} ms, complete p50 "
            f"{_f(bl.complete.p(50), 2)} / p99 {_f(bl.complete.p(99), 2)} ms; {len(bl.rounds.ms)} "
            f"assign rounds, p50 {_f(bl.rounds.p(50), 2)} / p99 {_f(bl.rounds.p(99), 2)} ms, "
            f"{bl.assigned} assigned; claim p99 ratio to the 10 k-row point {ratio:.2f}",
            "p99 within 1.5x", _verdict(ratio <= 1.5),
        ])
    elif isinstance(r.backlog, Unavailable):
        rows.append([f"5. {r.backlog.what}", f"not available: {r.backlog.why}",
                     "p99 within 1.5x", "n/a"])
    if isinstance(r.replicas, ReplicasResult):
        x = r.replicas
        ok = x.all_done_s is not None and x.all_done_s <= 30
        rows.append([
            f"replicas: {x.replicas} serve, {x.agents} agents (limit {x.limit}), {x.tasks:,} "
            f"backlog, kill -9 of a replica 1 s in, then every {x.kill_every_s:.0f} s",
            (f"all done in {x.all_done_s:.1f} s" if x.all_done_s is not None
             else f"{x.unfinished} unfinished after {x.waited_s:.0f} s")
            + f"; {x.kills} kills, {x.double} double assignments, {x.lost} lost, "
            f"{x.over_limit} over limit"
            + ("" if x.kills else " (done before the first kill: it shows nothing)"),
            "<= 30 s, 0, 0, 0",
            _verdict(ok and x.double == 0 and x.lost == 0 and x.over_limit == 0)
            if x.kills else "n/a",
        ])
    elif isinstance(r.replicas, Unavailable):
        rows.append([f"replicas: {r.replicas.what}", f"not available: {r.replicas.why}",
                     "<= 30 s, 0, 0, 0", "n/a"])
    # Flow control's cost: the median over rounds of drain with / drain without.
    for mode, pairs in r.flow_pairs.items():
        flow_ratios = sorted(w / wo for wo, w in pairs)
        flow_ratio = statistics.median(flow_ratios)
        rounds = ", ".join(f"{w:,.0f}/{wo:,.0f}" for wo, w in pairs)
        rows.append([
            f"flow control overhead, Dispatch engine ({mode}): fair share (4 tenants, 2 weighted), "
            "one concurrency key and one rate limit on every task, limits not binding",
            f"{flow_ratio:.2f}x, the median of {len(pairs)} rounds (drain/s with/without: "
            f"{rounds}; ratios {', '.join(f'{q:.2f}' for q in flow_ratios)})",
            ">= 0.8x", _verdict(flow_ratio >= 0.8),
        ])
    rows.append(["5. dead tuples and claim latency over a soak", "see `make bench-soak` "
                 "(section below when it has been run)", "bounded in a 30-minute soak", "n/a"])
    # 6
    if isinstance(rest, RestResult):
        rows.append([
            "6. peak RSS of `dispatch serve` under the REST lifecycle load",
            f"{rest.hwm_kb / 1024:.1f} MiB (VmHWM; sampled peak {rest.peak_rss_kb / 1024:.1f} "
            f"MiB, idle {rest.idle_rss_kb / 1024:.1f} MiB)", "", "",
        ])
    elif rest is not None:
        rows.append(["6. peak RSS of `dispatch serve`", "not available: no REST lifecycle run",
                     "", "n/a"])
    return rows


def render_text(rows: list[list[str]]) -> str:
    out = []
    for what, measured, target, verdict in rows:
        out.append(f"- {what}\n    {measured}\n    target: {target or '-'}   [{verdict or '-'}]")
    return "\n".join(out)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(r: Report, rows: list[list[str]]) -> str:
    m = machine()
    v = versions()
    lines = [
        f"## Run on the {r.build} build: PostgreSQL {r.pg_settings.get('server_version', '?')}"
        f" (jit={r.pg_settings.get('jit', '?')})",
        "",
        "Written by `make bench` (bench/). Every number below comes from one run on",
        "one Postgres on the machine described here; nothing is copied from elsewhere.",
        "",
        f"- command: `{r.command}`",
        f"- started {r.started}, finished {r.finished} (UTC)",
        f"- machine: {m['cpu']}, {m['memory']} RAM, Linux {m['kernel']}, Python {m['python']}",
        f"- load average before / after: {r.load_before} / {r.load_after} "
        "(the machine is shared; see the notes)",
        f"- git: {m['git']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- PostgreSQL settings: " + ", ".join(f"{k}={val}" for k, val in r.pg_settings.items()),
        "- sizes: " + ", ".join(f"{k}={val}" for k, val in vars(r.sizes).items()
                                if not k.startswith("soak")),
        "",
        "## Results",
        "",
        "| what | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    lines += ["", "## How each row is measured", "", METHOD, ""]
    if r.notes:
        lines += ["## Notes from this run", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(lines)


METHOD = """\
- One PostgreSQL of the build the section names (`BENCH_PG`: pgserver's embedded 16 without
  JIT, or the distribution's packaged server with its stock settings, JIT on) with the
  server's default durability: fsync, synchronous_commit and full_page_writes on. Every system gets
  its own database on that server, created fresh for its phase; a CHECKPOINT precedes each measured
  phase so full-page images start from the same state. Clients reach it over its Unix socket;
  HTTP goes to 127.0.0.1 only.
- 1: `dispatch serve` (one process, its own assigner) with 4 registered idle agents that have room
  for every task; a client sends `POST /api/v1/tasks` open-loop at the given rate (32 keep-alive
  connections). Latency = `assigned` event `created_at` minus `created` event `created_at` in
  dispatch.task_events (each is its transaction's start time); the first second is warm-up.
- 2: `dispatch serve` again; requesters create as fast as they can while each agent, on its own
  keep-alive connection, works as the protocol lets an agent on one connection work: a claim
  that starts what it takes (`POST /tasks/claim {"start": true}`: what the assigner pushed to it
  first, then new tasks), then one completion per task that claims and starts the next in the same
  request, waiting up to 0.5 s for one when there is none yet (`"next": {"start": true,
  "wait_seconds": 0.5}`). Tasks/s = N / wall time until the last completion's commit (its
  `completed_at`). Latencies: `complete` until the answer, which includes the wait of a `next`
  that found nothing; `complete-commit` from the request to the completion's commit (its
  `completed_at`). The ceiling is a one-handler Litestar app (`POST /echo`, msgspec body, JSON
  response) served by uvicorn exactly as `dispatch serve` serves its API (one process,
  uvloop, httptools, no access log), closed loop with the same number of connections. The load
  generator (bench/http.py, a minimal keep-alive HTTP/1.1 client) runs on the same 2 cores.
  serve's CPU per request: the CPU of the serve process and its workers during the lifecycle
  over every request the load generator sent; the trivial handler's: its server's CPU during the
  closed loop over the requests answered.
- 3: every system does N single-row enqueues from the same number of concurrent producers, then
  drains them: Dispatch through dispatch.broker on one psycopg pool (push: `task_assign` batches
  handed to agent workers that start and complete, each agent sending the completions its slots
  finish while one is in flight together in one request, whose `next` claims a task for each slot,
  as the SDK's worker does; pull: each agent claims, started, as many tasks as it has idle slots
  (`task_claim`), and sends its completions the same way, their `next` refilling the slots; in
  both, as many agents as pgqueuer has consumers, with as many slots as its batch); pgqueuer
  with its own drain benchmark's shape (asyncpg, a QueueManager per consumer, batch 10,
  mode=drain); procrastinate with an async task and
  `run_worker_async(wait=False)`; the floor with one `UPDATE ... WHERE id = (SELECT ... FOR UPDATE
  SKIP LOCKED)` claim and one `UPDATE` complete per row. "lifecycle" = N / (enqueue time + drain
  time); "drain" = N / drain time. The peers do enqueue, claim, complete; Dispatch also writes
  `start` and an event per step.
- flow control overhead: the Dispatch engine drain of row 3 (push and pull) beside the same drain
  with flow control configured: tasks spread round-robin over 4 tenants (requesters; two with
  weights 2 and 0.5), and every task under one concurrency key (cap 1,000,000) and one rate key
  (bucket of 10^12 tokens, refilling 10^12 a second), so that each assignment pays for the checks,
  the key rows' locks and the bucket's update without ever being held back. BENCH_FLOW_ROUNDS
  rounds (3) of the two drains, each in a fresh database, the order alternating from round to
  round (the first round is row 3's pair): a checkpoint, autovacuum or other work on the machine
  that lands on one drain of a round does not decide the ratio, the median of the rounds' ratios.
- 4: `xact_commit` of the system's database in pg_stat_database (read-only transactions count
  too) and `pg_current_wal_lsn()` difference (cluster-wide) over the measured phase, divided by N;
  write xacts = transaction ids consumed. All client connections are closed before the second
  reading so their statistics are flushed.
- 5: a fresh database per point, terminal rows bulk-inserted with session_replication_role=replica
  (no triggers, no events), then VACUUM ANALYZE; one connection times `task_claim` (then completes
  the task) and `task_assign` over 4 agents (then completes the batch), BENCH_SCALE_SAMPLES each.
  Behind saturated agents: 12 agents of one slot each that the assigner filled,
  BENCH_BACKLOG_PENDING tasks they could take, the assigner's rounds back to back in a process
  of their own, and one agent that completes what it holds and claims again on one connection,
  BENCH_BACKLOG_SAMPLES times; its claim p99 over the 10 k-row point's.
- 6: VmHWM of the serve process from /proc after the REST lifecycle (and VmRSS sampled every
  100 ms during it)."""


def _soak_markers(build: str) -> tuple[str, str]:
    return f"<!-- soak:{build}:begin -->", f"<!-- soak:{build}:end -->"


def soak_verdict(s: SoakResult) -> str:
    """Dead tuples and claim p99 in the steady state (after one retention period and two prune
    rounds): the first half of those samples against the second."""
    warm = s.retention_minutes * 60 + 2 * s.prune_seconds
    steady = [x for x in s.samples if x.t >= warm]
    if len(steady) < 2:
        return "Too short for a steady state (it starts after one retention period)."
    half = len(steady) // 2
    first, second = steady[:half], steady[half:]

    def dead(xs: list[SoakSample], name: str) -> int:
        return max(x.tables.get(name, (0, 0))[1] for x in xs)

    def p99(xs: list[SoakSample]) -> float:
        return max(x.claim_p99 for x in xs)

    return (
        f"Steady state (t >= {warm:.0f} s, {len(steady)} samples), first half -> second half: "
        f"task_events dead tuples at most {dead(first, 'task_events'):,} -> "
        f"{dead(second, 'task_events'):,}; tasks dead tuples at most {dead(first, 'tasks'):,} -> "
        f"{dead(second, 'tasks'):,}; claim p99 at most {p99(first):.2f} -> {p99(second):.2f} ms; "
        f"history partitions {min(x.partitions for x in steady)}-"
        f"{max(x.partitions for x in steady)}; task_events live rows "
        f"{min(x.tables.get('task_events', (0,))[0] for x in steady):,}-"
        f"{max(x.tables.get('task_events', (0,))[0] for x in steady):,}."
    )


def render_soak(s: SoakResult) -> str:
    begin, end = _soak_markers(s.build)
    lines = [
        begin,
        f"## Soak (`make bench-soak`) on the {s.build} build",
        "",
        f"Run from {s.started} to {s.finished} UTC; load average before / after: {s.load_before} / "
        f"{s.load_after}.",
        "",
        f"In-process pull lifecycle paced at {s.rate} tasks/s for {s.seconds:.0f} s, {s.agents} "
        f"agents (claim woken by NOTIFY), autovacuum at its defaults, the pruner every "
        f"{s.prune_seconds:.0f} s with a retention of {s.retention_minutes:g} minutes (history "
        f"partitions created ahead and dropped whole); {s.completed:,} tasks completed. Dead "
        "tuples from pg_stat_user_tables (a partitioned table's partitions summed); claim "
        "latency of successful claims in each interval.",
        "",
        soak_verdict(s),
        "",
        "| t (s) | completed | tasks live / dead | task_events live / dead | agents live / dead |"
        " autovacuums (tasks, events, agents) | history partitions | pruned tasks |"
        " dropped partitions | claim p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def lv(x: SoakSample, name: str) -> str:
        t = x.tables.get(name)
        return f"{t[0]:,} / {t[1]:,}" if t else "?"

    for x in s.samples:
        av = ", ".join(str(x.tables.get(n, (0, 0, 0))[2]) for n in ("tasks", "task_events",
                                                                     "agents"))
        lines.append(f"| {x.t:.0f} | {x.completed:,} | {lv(x, 'tasks')} | {lv(x, 'task_events')} | "
                     f"{lv(x, 'agents')} | {av} | {x.partitions} | {x.pruned:,} | {x.dropped} | "
                     f"{_f(x.claim_p50, 2)} / {_f(x.claim_p99, 2)} |")
    lines += ["", end]
    return "\n".join(lines)


def _cut(text: str, begin: str, end: str) -> tuple[str, str]:
    """(text without the marked section, the section with its markers) or (text, "")."""
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        return (text[:i] + text[j:]).rstrip() + "\n", text[i:j]
    return text, ""


BUILDS = ("embedded", "distribution", "external")


def _run_markers(build: str) -> tuple[str, str]:
    return f"<!-- run:{build}:begin -->", f"<!-- run:{build}:end -->"


def write(path: Path, main_md: str | None, soak_md: str | None, build: str = "embedded") -> None:
    """Replace one build's run and/or the soak section. The other builds' runs, the soak section
    and the hand-written analysis (between ANALYSIS_BEGIN and ANALYSIS_END) survive a run that
    does not produce them."""
    old = path.read_text() if path.exists() else ""
    old, _ = _cut(old, SOAK_BEGIN, SOAK_END)  # the single soak section of earlier reports
    old, analysis = _cut(old, ANALYSIS_BEGIN, ANALYSIS_END)
    runs: dict[str, str] = {}
    soaks: dict[str, str] = {}
    for name in BUILDS:
        old, runs[name] = _cut(old, *_run_markers(name))
        old, soaks[name] = _cut(old, *_soak_markers(name))
    if main_md is not None:
        begin, end = _run_markers(build)
        runs[build] = f"{begin}\n{main_md.strip()}\n{end}"
    if soak_md is not None:
        soaks[build] = soak_md
    head = old.strip()
    sections = [*runs.values(), *soaks.values(), analysis]
    body = (head + "\n\n" if head else "") + "\n\n".join(x.strip() for x in sections if x)
    path.write_text(body.strip() + "\n")
