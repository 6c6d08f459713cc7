"""`python -m bench` runs every phase on one Postgres and writes BENCHMARKS.md;
`python -m bench --soak` runs the soak alone and adds its section."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from bench import backlog, engine, peers, replicas, report, rest, scale, soak
from bench.common import ENV_HELP, Sizes
from bench.pg import Cluster, cluster
from bench.results import Throughput, Unavailable

T = TypeVar("T")
PHASES = ("latency", "rest", "engine", "peers", "scale", "backlog", "replicas")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _command() -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                   if k.startswith("BENCH_") and k != "BENCH_DATABASE_URL")
    return (env + " " if env else "") + "python -m bench"


async def _phase(name: str, what: str, fn: Callable[[], Awaitable[T]]) -> T | Unavailable:
    print(f"[{_now()}] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = await fn()
    except Exception as exc:  # a failed phase is reported as failed; the run goes on
        traceback.print_exc()
        first_line = next(iter(str(exc).splitlines()), "") or "(no message)"
        return Unavailable(what, f"failed: {type(exc).__name__}: {first_line[:200]}")
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return result


async def run_all(cl: Cluster, sizes: Sizes, only: set[str], rep: report.Report) -> None:
    if "rest" in only:
        rep.ceiling = await _phase("ceiling: trivial Litestar JSON endpoint", "ceiling",
                                   lambda: rest.run_ceiling(sizes))
        rep.rest = await _phase("full lifecycle over REST", "full lifecycle over REST",
                                lambda: rest.run_rest_lifecycle(cl, sizes))
    if "latency" in only:
        rep.latency = await _phase(
            f"create->assigned latency at {sizes.latency_rate}/s",
            f"create->assigned latency, HTTP create at {sizes.latency_rate}/s",
            lambda: rest.run_latency(cl, sizes),
        )
    if "engine" in only:
        for mode in ("push", "pull"):
            plain = await _phase(
                f"Dispatch engine in-process ({mode})", f"Dispatch engine ({mode})",
                lambda mode=mode: engine.run_engine(cl, sizes, mode),  # type: ignore[misc]
            )
            # Beside it, the same drain with flow control configured (at least 0.8x its rate).
            flowed = await _phase(
                f"Dispatch engine in-process ({mode}, flow control)",
                f"Dispatch engine ({mode}, flow control)",
                lambda mode=mode: engine.run_engine(cl, sizes, mode, flow=True),  # type: ignore[misc]
            )
            rep.engines += [plain, flowed]
            if isinstance(plain, Throughput) and isinstance(flowed, Throughput):
                rep.flow_pairs[mode] = [(plain.drain_rate, flowed.drain_rate)]
                for r in range(1, sizes.flow_rounds):
                    got: dict[bool, Throughput | Unavailable] = {}
                    for flow in (True, False) if r % 2 else (False, True):
                        label = f"Dispatch engine ({mode}{', flow control' if flow else ''})"
                        got[flow] = await _phase(
                            f"{label}, flow overhead round {r + 1}", label,
                            lambda mode=mode, flow=flow: engine.run_engine(  # type: ignore[misc]
                                cl, sizes, mode, flow=flow),
                        )
                    without, with_flow = got[False], got[True]
                    if isinstance(without, Throughput) and isinstance(with_flow, Throughput):
                        rep.flow_pairs[mode].append((without.drain_rate, with_flow.drain_rate))
    if "peers" in only:
        for name, fn in (("raw SKIP LOCKED (floor)", peers.run_raw),
                         ("pgqueuer", peers.run_pgqueuer),
                         ("procrastinate", peers.run_procrastinate)):
            rep.peers.append(await _phase(name, name, lambda fn=fn: fn(cl, sizes)))  # type: ignore[misc]
    if "scale" in only:
        rep.scale = await _phase("scale: claim/assign with terminal history",
                                 "claim/assign scale", lambda: scale.run_scale(cl, sizes))
    if "backlog" in only:
        rep.backlog = await _phase(
            "backlog: claim/complete while the assigner runs against 10 k pending",
            "claim/complete against a deep backlog", lambda: backlog.run_backlog(cl, sizes),
        )
    if "replicas" in only:
        rep.replicas = await _phase(
            f"replicas: 3 serve replicas, one killed every {sizes.replicas_kill_every:g} s",
            "replicas under kill -9", lambda: replicas.run_replicas(cl, sizes),
        )


def _summaries(rep: report.Report) -> None:
    for item in rep.engines + rep.peers:
        if isinstance(item, Throughput):
            print(f"  {item.system}: lifecycle {item.lifecycle_rate:,.0f}/s, "
                  f"drain {item.drain_rate:,.0f}/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--soak", action="store_true", help="run only the soak (bench-soak)")
    args = parser.parse_args(argv)
    sizes = Sizes()
    out = Path(os.environ.get("BENCH_OUTPUT") or "BENCHMARKS.md")
    only = {p.strip() for p in os.environ.get("BENCH_ONLY", ",".join(PHASES)).split(",")
            if p.strip()}
    try:
        import uvloop

        runner: Callable[[Awaitable[None]], None] = uvloop.run  # type: ignore[assignment]
    except ImportError:  # pragma: no cover
        runner = asyncio.run  # type: ignore[assignment]

    build = os.environ.get("BENCH_PG", "embedded")
    with cluster(os.environ.get("BENCH_DATABASE_URL") or None, build) as cl:
        if args.soak:
            print(f"[{_now()}] soak for {sizes.soak_seconds:.0f} s at {sizes.soak_rate}/s",
                  flush=True)
            holder: list[soak.SoakResult] = []

            started, load_before = _now(), report.load_average()

            async def go_soak() -> None:
                holder.append(await soak.run_soak(cl, sizes))

            runner(go_soak())
            result = holder[0]
            result.started, result.load_before = started, load_before
            result.finished, result.load_after = _now(), report.load_average()
            md = report.render_soak(result)
            print(md)
            report.write(out, None, md, cl.build)
            print(f"wrote the soak section of {out}")
            return 0

        rep = report.Report(command=_command(), sizes=sizes, started=_now(), build=cl.build)
        rep.pg_settings = cl.settings()
        rep.load_before = report.load_average()

        async def go() -> None:
            await run_all(cl, sizes, only, rep)

        runner(go())
        rep.finished = _now()
        rep.load_after = report.load_average()
    _summaries(rep)
    if os.environ.get("BENCH_NOTES"):
        rep.notes.append(os.environ["BENCH_NOTES"])
    rows = report.results_table(rep)
    print()
    print(report.render_text(rows))
    report.write(out, report.render_markdown(rep, rows), None, cl.build)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
