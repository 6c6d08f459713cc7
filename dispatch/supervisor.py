"""`dispatch serve --workers N`: N processes on one machine, each a full replica (API, loops, its
own pool), the way several replicas share one database. They share the API port (SO_REUSEPORT:
the kernel spreads connections over them). This process owns what must exist once: the embedded
Postgres, the migration, a generated admin token, and the one ops endpoint on metrics_port
(dispatch.serve_ops: every worker's metrics summed, every worker's health), and the one LISTEN
whose notifications it passes on to every worker (dispatch.notify.Fanout). It restarts a worker
that dies and stops them all on SIGTERM/SIGINT."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import httpx
from prometheus_client import multiprocess

from dispatch.banner import OPS_SOCKET_ENV, SUPERVISED_ENV, banner, print_banner
from dispatch.migrate import migrate
from dispatch.notify import NOTIFY_SOCKET_ENV, Fanout, FanoutThread
from dispatch.preflight import (
    StartupError,
    check_listen,
    check_pool_mode,
    connection_plan,
    session_url,
)
from dispatch.serve_ops import ServeOps, ServeOpsThread, metrics_dir, worker_socket
from dispatch.service import resolve_database_url
from dispatch.settings import Settings

RUN_DIR_PREFIX = "dispatch-serve-"
SUPERVISOR_PID_FILE = "supervisor.pid"
NOTIFY_SOCKET = "notify.sock"

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 20.0
# A worker gone this soon after its start failed to start.
QUICK_EXIT_SECONDS = 5.0


def worker_count(settings: Settings) -> int:
    return settings.server.workers or available_cpus()


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, bounded by a cgroup CPU quota (a container's
    --cpus), which os.cpu_count() ignores."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return n


def _start(
    i: int, env: dict[str, str], config: str | None, run_dir: Path
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "dispatch", *(["--config", config] if config else []), "serve"]
    sock = worker_socket(run_dir, i)
    sock.unlink(missing_ok=True)  # a dead predecessor's
    return subprocess.Popen(
        args, env={**env, OPS_SOCKET_ENV: str(sock)}, preexec_fn=_die_with_parent
    )


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when this supervisor dies, even by kill -9, so no
    worker outlives it (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _healthy(run_dir: Path, i: int) -> bool:
    """Worker i's /health answers 200."""
    transport = httpx.HTTPTransport(uds=str(worker_socket(run_dir, i)))
    try:
        with httpx.Client(transport=transport, timeout=0.5) as client:
            return client.get("http://worker/health").status_code == 200
    except httpx.HTTPError:
        return False


def _remove_orphaned_run_dirs() -> None:
    """A supervisor killed outright (kill -9) leaves its run directory (metrics files, sockets);
    the next one to start removes those whose supervisor is gone."""
    for found in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            pid = int((found / SUPERVISOR_PID_FILE).read_text())
            if found.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(found, ignore_errors=True)
        except (OSError, ValueError):
            # Not ours, not a run directory, or its supervisor is alive: left alone.
            continue


def run(settings: Settings, config: str | None) -> int:
    """Supervise the workers until SIGTERM/SIGINT; the exit status of the whole."""
    check_pool_mode(settings.database)
    url = resolve_database_url(settings)
    session = session_url(settings.database, url)
    check_listen(settings.database, url)
    applied = migrate(session)
    if applied:
        log.info("migrations applied: %s", applied)
    plan = connection_plan(session, settings, worker_count(settings))
    n = plan.workers
    _remove_orphaned_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    (run_dir / SUPERVISOR_PID_FILE).write_text(str(os.getpid()))
    try:
        fanout = FanoutThread(Fanout(session, run_dir / NOTIFY_SOCKET))
        try:
            fanout.start()
        except OSError as exc:
            raise StartupError(f"{exc}; see the error above") from None
        try:
            return _supervise(settings, config, url, plan.pool_min, plan.pool_max, n, run_dir)
        finally:
            fanout.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _supervise(
    settings: Settings, config: str | None, url: str, pool_min: int, pool_max: int, n: int,
    run_dir: Path,
) -> int:
    metrics_dir(run_dir).mkdir()
    ops = ServeOpsThread(ServeOps(run_dir, n), settings.server.host, settings.server.metrics_port)
    ops.start()
    while not (ops.started or ops.failed):
        time.sleep(0.02)
    if ops.failed:
        raise StartupError(
            f"cannot serve the ops endpoint on port {settings.server.metrics_port}"
            " (server.metrics_port); see the error above"
        )
    token = settings.server.admin_token or secrets.token_urlsafe(32)  # shown by the banner
    env = {
        **os.environ,
        SUPERVISED_ENV: "1",
        NOTIFY_SOCKET_ENV: str(run_dir / NOTIFY_SOCKET),
        "DISPATCH_DATABASE_URL": url,
        "DISPATCH_SERVER_ADMIN_TOKEN": token,
        "DISPATCH_SERVER_WORKERS": "1",
        "DISPATCH_SERVER_REUSE_PORT": "true",
        # Each worker's share of the connection budget.
        "DISPATCH_DATABASE_POOL_MIN": str(pool_min),
        "DISPATCH_DATABASE_POOL_MAX": str(pool_max),
        # Each worker records its metrics into files here; the ops endpoint sums them.
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir(run_dir)),
    }
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = [_start(i, env, config, run_dir) for i in range(n)]
    log.info("dispatch serving with %d workers", n, extra={"port": settings.server.port})
    started = [time.monotonic()] * n
    early = [0] * n  # each worker's exits in a row within QUICK_EXIT_SECONDS of its start
    status = 0
    announced = False
    while not stopping:
        time.sleep(0.2)
        if not announced and all(_healthy(run_dir, i) for i in range(n)):
            print_banner(banner(settings, token, generated=not settings.server.admin_token,
                                workers=n))
            announced = True
        for i, proc in enumerate(procs):
            if proc.poll() is None or stopping:
                continue
            early[i] = early[i] + 1 if time.monotonic() - started[i] < QUICK_EXIT_SECONDS else 0
            if early[i] >= 2:
                # It cannot start at all (a port taken since, the database gone): restarting
                # it again would only repeat that, so everything stops, saying so.
                log.error("worker %d exited with %s at start-up twice in a row; stopping",
                          i, proc.returncode)
                stopping, status = True, 1
                break
            log.error("worker %d exited with %s; restarting it", i, proc.returncode)
            # Its counters stay in the sums; its live gauges (requests in progress) go.
            multiprocess.mark_process_dead(proc.pid, str(metrics_dir(run_dir)))
            if early[i]:
                time.sleep(2)
            procs[i], started[i] = _start(i, env, config, run_dir), time.monotonic()
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ops.stop()
    return status
