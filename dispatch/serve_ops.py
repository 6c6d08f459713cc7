"""The one ops endpoint of `dispatch serve --workers N`, served by the supervisor on
server.metrics_port: GET /metrics sums every worker's counters and histograms (prometheus_client's
multiprocess mode: each worker records into files of one directory) and adds the database gauges
once, read by one worker; GET /health asks every worker. Each worker serves its own ops app on a
Unix socket of the serve's run directory, for this endpoint (and for whoever wants one worker's
view: `curl --unix-socket <dir>/worker-0.sock http://worker/metrics`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from litestar import Litestar, Response, get
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dispatch.api.ops import ops_app
from dispatch.sdk.client import LIMITS

log = logging.getLogger(__name__)

# How long /health and /metrics wait for a worker's answer.
WORKER_TIMEOUT_SECONDS = 2.0
DATABASE_DOWN = (
    b"# HELP dispatch_database_up 1 when the scrape could read the database\n"
    b"# TYPE dispatch_database_up gauge\ndispatch_database_up 0.0\n"
)


def worker_socket(run_dir: Path, i: int) -> Path:
    return run_dir / f"worker-{i}.sock"


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


class ServeOps:
    """What the serve's ops endpoint reads: the workers' metric files and their ops sockets."""

    def __init__(self, run_dir: Path, workers: int) -> None:
        self.run_dir = run_dir
        self.workers = workers
        self.registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(self.registry, path=str(metrics_dir(run_dir)))
        self._clients: list[httpx.AsyncClient] = []

    def _client(self, i: int) -> httpx.AsyncClient:
        while len(self._clients) <= i:
            path = worker_socket(self.run_dir, len(self._clients))
            self._clients.append(httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(path), limits=LIMITS),
                base_url="http://worker",
                timeout=WORKER_TIMEOUT_SECONDS,
            ))
        return self._clients[i]

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def _ask(self, i: int, path: str) -> httpx.Response | str:
        """Worker i's answer, or why there is none."""
        try:
            return await self._client(i).get(path)
        except httpx.HTTPError as exc:
            return f"down: {type(exc).__name__}"

    async def health(self) -> tuple[bool, dict[str, object]]:
        """Every worker's /health. Healthy (200) while at least one worker is: the API port is
        shared, so the serve answers while the supervisor restarts the others; `status` says
        `degraded` when any worker is not ok."""
        answers = await asyncio.gather(*(self._ask(i, "/health") for i in range(self.workers)))
        workers: list[dict[str, Any]] = []
        for i, answer in enumerate(answers):
            where = {"worker": i, "socket": str(worker_socket(self.run_dir, i))}
            if isinstance(answer, str):
                workers.append({**where, "status": answer})
                continue
            try:
                worker = answer.json()
            except ValueError:
                worker = {"status": f"answered {answer.status_code}"}
            workers.append({**where, **worker})
        up = [w for w in workers if w.get("status") == "ok"]
        report: dict[str, object] = {"status": "ok" if len(up) == self.workers else "degraded"}
        # As one process reports them: ok when any worker's is (each checks on its own connection).
        for key in ("database", "nats"):
            seen = [w[key] for w in workers if w.get(key) is not None]
            report[key] = "ok" if "ok" in seen else (seen[0] if seen else "unknown")
        report["workers"] = workers
        return bool(up), report

    async def metrics(self) -> bytes:
        """Every worker's series summed, then the database gauges of the first worker that
        answers (dispatch_database_up 0 when none does)."""
        summed = generate_latest(self.registry)
        for i in range(self.workers):
            answer = await self._ask(i, "/metrics/database")
            if not isinstance(answer, str) and answer.status_code == 200:
                return summed + answer.content
        return summed + DATABASE_DOWN


def create_serve_ops_app(ops: ServeOps) -> Litestar:
    @get("/metrics")
    async def metrics() -> Response[bytes]:
        return Response(await ops.metrics(), media_type=CONTENT_TYPE_LATEST)

    return ops_app(ops, [metrics], on_shutdown=[ops.close])


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the supervisor owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class ServeOpsThread:
    """The ops endpoint on its own thread and event loop, beside the supervisor's loop."""

    def __init__(self, ops: ServeOps, host: str, port: int) -> None:
        config = uvicorn.Config(
            create_serve_ops_app(ops), host=host, port=port, log_config=None,
            access_log=False, lifespan="on",
        )
        self.server = _Server(config)
        self.thread = threading.Thread(target=self._run, name="dispatch-serve-ops", daemon=True)
        self.failed = False

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException:  # a port taken since the check: the supervisor stops, saying so
            log.exception("the ops endpoint stopped")
            self.failed = True
        if not self.server.started:
            self.failed = True

    def start(self) -> None:
        self.thread.start()

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
