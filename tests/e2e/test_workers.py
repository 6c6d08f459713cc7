"""`dispatch serve --workers N`: N full replicas sharing the API port, each with its ops port,
supervised (a dead worker comes back, SIGTERM stops them all, none outlives the supervisor)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx

from dispatch import supervisor
from tests.serve import ServeProcess, serving


def ops(sp: ServeProcess, i: int) -> str:
    port = int(sp.ops.rsplit(":", 1)[1]) + i
    return f"http://127.0.0.1:{port}"


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def worker_pids(supervisor: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == supervisor:
                pids.append(int(entry.name))
    return pids


def requests_served(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(m.group(1))
        for m in re.finditer(
            r'^dispatch_http_requests_total\{[^}]*path="/api/v1/agents/\{agent_id\}"[^}]*\} (\S+)',
            text, re.M,
        )
    )


def test_workers_share_the_api_and_are_supervised(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, env={"DISPATCH_SERVER_WORKERS": "2"}) as sp:
        wait(lambda: healthy(ops(sp, 0)) and healthy(ops(sp, 1)), 30, "both workers")
        for i in range(60):
            with httpx.Client() as client:  # a new connection each time: the kernel spreads them
                r = client.put(f"{sp.api}/api/v1/agents/w{i}", json={},
                               headers={"X-Agent-ID": f"w{i}"})
                assert r.status_code == 200
        served = [requests_served(ops(sp, i)) for i in (0, 1)]
        assert sum(served) == 60 and min(served) > 0, served

        # A worker killed outright is replaced.
        workers = worker_pids(sp.proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        wait(lambda: len(set(worker_pids(sp.proc.pid)) - set(workers)) == 1, 15, "a new worker")
        wait(lambda: healthy(ops(sp, 0)) and healthy(ops(sp, 1)), 30, "both workers again")

        # kill -9 of the supervisor takes its workers with it.
        workers = worker_pids(sp.proc.pid)
        sp.kill()
        wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 15,
             "the workers to exit")


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
        wait(lambda: healthy(ops(sp, 0)) and healthy(ops(sp, 1)), 30, "both workers")
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
        wait(lambda: sum(in_progress(ops(sp, i), "/api/v1/tasks/claim") for i in (0, 1)) == 1,
             15, "the claim to wait")
        workers = worker_pids(sp.proc.pid)
        sp.proc.send_signal(signal.SIGTERM)
        assert sp.proc.wait(30) == 0, sp.log()
        waiting.join(30)
        assert answers == [204], sp.log()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def in_progress(url: str, path: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(m.group(1))
        for m in re.finditer(
            rf'^dispatch_http_requests_in_progress\{{.*path="{re.escape(path)}".*\}} (\S+)$',
            text, re.M,
        )
    )
