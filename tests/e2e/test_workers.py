"""`dispatch serve --workers N`: N full replicas sharing the API port and one ops endpoint that
sums them, supervised (a dead worker comes back, SIGTERM stops them all, none outlives the
supervisor)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from dispatch import supervisor
from tests.engine.test_fanout import listening_sessions
from tests.serve import ServeProcess, serving


def health(sp: ServeProcess) -> dict[str, Any]:
    try:
        answer = httpx.get(f"{sp.ops}/health", timeout=5)
    except httpx.HTTPError:
        return {}
    return dict(answer.json()) if answer.status_code in (200, 503) else {}


def all_ok(sp: ServeProcess, n: int) -> bool:
    report = health(sp)
    workers = report.get("workers", [])
    return len(workers) == n and all(w["status"] == "ok" for w in workers)


def worker_metrics(socket: str) -> str:
    transport = httpx.HTTPTransport(uds=socket)
    with httpx.Client(transport=transport, timeout=5) as client:
        return client.get("http://worker/metrics").text


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); [] when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def running(pid: int) -> bool:
    """The process exists and has not exited. A worker orphaned by kill -9 of its supervisor
    is reaped by init, which may take seconds; until then it is a zombie, dead but listed."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] not in "ZX"


def worker_pids(supervisor: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields and int(fields[1]) == supervisor:
                pids.append(int(entry.name))
    return pids


def requests_served(text: str) -> float:
    return sum(
        float(m.group(1))
        for m in re.finditer(
            r'^dispatch_http_requests_total\{[^}]*path="/api/v1/agents/\{agent_id\}"[^}]*\} (\S+)',
            text, re.M,
        )
    )


def test_workers_share_the_api_and_one_ops_endpoint(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, env={"DISPATCH_SERVER_WORKERS": "2"}) as sp:
        wait(lambda: all_ok(sp, 2), 30, "both workers")
        for i in range(60):
            with httpx.Client() as client:  # a new connection each time: the kernel spreads them
                r = client.put(f"{sp.api}/api/v1/agents/w{i}", json={},
                               headers={"X-Agent-ID": f"w{i}"})
                assert r.status_code == 200

        r = httpx.post(f"{sp.api}/api/v1/tasks", headers={"X-Agent-ID": "req"},
                       json={"title": "render", "required_capabilities": ["gpu"]})
        assert r.status_code == 201, r.text

        # The serve's one /metrics sums its workers; each worker's own view shows its share.
        text = httpx.get(f"{sp.ops}/metrics").text
        assert requests_served(text) == 60
        sockets = [w["socket"] for w in health(sp)["workers"]]
        served = [requests_served(worker_metrics(s)) for s in sockets]
        assert sum(served) == 60 and min(served) > 0, served
        # The database gauges once, no _created series, no per-process labels.
        assert text.count("# TYPE dispatch_queue_depth gauge") == 1
        assert re.findall(r"^dispatch_database_up (\S+)$", text, re.M) == ["1.0"]
        assert 'dispatch_capability_pending{capability="gpu"} 1.0' in text
        assert 'dispatch_capability_agents{capability="gpu"} 0.0' in text
        assert not re.search(r"^\w+_created[{ ]", text, re.M) and "pid=" not in text
        # The supervisor's calls to its workers at each probe and scrape are not logged.
        assert "HTTP Request:" not in sp.log()

        # A worker killed outright is replaced; its counts stay in the sum.
        workers = worker_pids(sp.proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        wait(lambda: not all_ok(sp, 2), 15, "/health to see the worker gone")
        report = health(sp)
        assert report["status"] == "degraded" and report["database"] == "ok"
        assert httpx.get(f"{sp.ops}/health").status_code == 200  # the other one serves
        wait(lambda: len(set(worker_pids(sp.proc.pid)) - set(workers)) == 1, 15, "a new worker")
        wait(lambda: all_ok(sp, 2), 30, "both workers again")
        assert requests_served(httpx.get(f"{sp.ops}/metrics").text) == 60

        # kill -9 of the supervisor takes its workers with it.
        workers = worker_pids(sp.proc.pid)
        run_dir = Path(health(sp)["workers"][0]["socket"]).parent
        sp.kill()
        wait(lambda: not any(running(pid) for pid in workers), 15,
             "the workers to exit")
    # Its run directory (metrics files, sockets) is left behind; the next serve removes it.
    assert run_dir.is_dir()
    with serving(db_url, tmp_path, env={"DISPATCH_SERVER_WORKERS": "2"}) as sp:
        wait(lambda: all_ok(sp, 2), 30, "both workers")
        assert not run_dir.exists()


def test_default_workers_respect_a_container_cpu_quota(tmp_path: Path) -> None:
    # cgroup v2's cpu.max as a container runtime writes it for --cpus.
    cpu_max = tmp_path / "cpu.max"
    cpus = len(os.sched_getaffinity(0))
    for content, expected in (("max 100000\n", cpus), ("50000 100000\n", 1),
                              ("150000 100000\n", min(cpus, 2)),
                              ("6400000 100000\n", cpus), ("garbage\n", cpus)):
        cpu_max.write_text(content)
        assert supervisor.available_cpus(cpu_max) == expected, content
    assert supervisor.available_cpus(tmp_path / "absent") == cpus


def test_sigterm_answers_waiting_claims_and_stops_the_workers(db_url: str, tmp_path: Path) -> None:
    """A long-polling claim does not hold a stopping worker open for its whole wait (beyond the
    supervisor's grace, which then kills the worker and drops the request): it answers 204."""
    with serving(db_url, tmp_path, env={"DISPATCH_SERVER_WORKERS": "2"}) as sp:
        wait(lambda: all_ok(sp, 2), 30, "both workers")
        agent = {"X-Agent-ID": "a1"}
        assert httpx.put(f"{sp.api}/api/v1/agents/a1", json={}, headers=agent).status_code == 200
        answers: list[object] = []

        def claim() -> None:
            try:
                answers.append(httpx.post(f"{sp.api}/api/v1/tasks/claim", headers=agent,
                                          json={"wait_seconds": 30}, timeout=60).status_code)
            except httpx.HTTPError as exc:
                answers.append(repr(exc))

        waiting = threading.Thread(target=claim)
        waiting.start()
        wait(lambda: in_progress(sp.ops, "/api/v1/tasks/claim") == 1, 15, "the claim to wait")
        workers = worker_pids(sp.proc.pid)
        sp.proc.send_signal(signal.SIGTERM)
        assert sp.proc.wait(30) == 0, sp.log()
        waiting.join(30)
        assert answers == [204], sp.log()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_the_workers_share_one_listen_and_every_waiting_claim_wakes(
    db_url: str, tmp_path: Path
) -> None:
    """Postgres signals one session per NOTIFY for the whole serve, not one per worker, and a
    claim waiting on either worker still wakes for the task given to its agent."""
    n = 16
    with serving(db_url, tmp_path, env={"DISPATCH_SERVER_WORKERS": "2"}) as sp:
        wait(lambda: all_ok(sp, 2), 30, "both workers")
        assert listening_sessions(db_url) == 1
        for i in range(n):
            r = httpx.put(f"{sp.api}/api/v1/agents/w{i}", json={"max_concurrent": 1},
                          headers={"X-Agent-ID": f"w{i}"})
            assert r.status_code == 200, r.text
        answers: list[object] = []

        def claim(agent: str) -> None:
            try:  # a new connection each: the kernel spreads them over the workers
                r = httpx.post(f"{sp.api}/api/v1/tasks/claim", headers={"X-Agent-ID": agent},
                               json={"wait_seconds": 30}, timeout=60)
                answers.append((r.status_code, r.json()["assigned_agent"] == agent))
            except (httpx.HTTPError, ValueError, LookupError) as exc:
                answers.append(repr(exc))

        waiting = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(n)]
        for thread in waiting:
            thread.start()
        wait(lambda: in_progress(sp.ops, "/api/v1/tasks/claim") == n, 15, "every claim to wait")
        sockets = [w["socket"] for w in health(sp)["workers"]]
        per_worker = [in_progress_text(worker_metrics(s), "/api/v1/tasks/claim") for s in sockets]
        assert min(per_worker) > 0, per_worker  # both workers hold waiting claims
        for i in range(n):
            r = httpx.post(f"{sp.api}/api/v1/tasks", headers={"X-Agent-ID": "req"},
                           json={"title": f"t{i}"})
            assert r.status_code == 201, r.text
        # Woken, not timed out: each answers with its task well before its 30 s wait ends.
        for thread in waiting:
            thread.join(20)
        assert answers == [(200, True)] * n, answers
        assert listening_sessions(db_url) == 1


def in_progress(url: str, path: str) -> float:
    return in_progress_text(httpx.get(f"{url}/metrics").text, path)


def in_progress_text(text: str, path: str) -> float:
    return sum(
        float(m.group(1))
        for m in re.finditer(
            rf'^dispatch_http_requests_in_progress\{{.*path="{re.escape(path)}".*\}} (\S+)$',
            text, re.M,
        )
    )
