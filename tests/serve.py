"""Runs `dispatch serve` as a real subprocess on free ports, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.serve import free_port


def serve_ports() -> tuple[int, int]:
    """An API port and an ops port, both free and not the same."""
    api = free_port()
    while True:
        ops = free_port()
        if ops != api:
            return api, ops


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    api: str  # http://127.0.0.1:PORT
    ops: str
    admin_token: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no shutdown at all."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_serve(
    database_url: str,
    tmp_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    admin_token: str = "test-admin-token",
    timeout: float = 30.0,
) -> ServeProcess:
    """Start `python -m dispatch serve` against database_url; return once /health answers 200."""
    api_port, ops_port = serve_ports()
    full_env = {
        **os.environ,
        "DISPATCH_DATABASE_URL": database_url,
        "DISPATCH_PORT": str(api_port),
        "DISPATCH_METRICS_PORT": str(ops_port),
        "DISPATCH_HOST": "127.0.0.1",
        "DISPATCH_ADMIN_TOKEN": admin_token,
        "DISPATCH_LOG_FORMAT": "text",
        "DISPATCH_DATA_DIR": str(tmp_path / "data"),
        # One process unless the test asks for workers (tests/e2e/test_workers.py); the README
        # test runs `make run` with the default, one worker per CPU.
        "DISPATCH_SERVER_WORKERS": "1",
        **(env or {}),
    }
    full_env.pop("DISPATCH_CONFIG", None) if "DISPATCH_CONFIG" not in (env or {}) else None
    log_path = tmp_path / f"serve-{api_port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch", "serve"],
            env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    sp = ServeProcess(
        proc, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ops_port}", admin_token, log_path
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dispatch serve exited with {proc.returncode}:\n{sp.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{sp.ops}/health", timeout=1).status_code == 200:
                return sp
        time.sleep(0.1)
    sp.stop()
    raise RuntimeError(f"dispatch serve did not become healthy in {timeout}s:\n{sp.log()}")


@contextlib.contextmanager
def serving(database_url: str, tmp_path: Path, **kwargs: object) -> Iterator[ServeProcess]:
    sp = start_serve(database_url, tmp_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield sp
    finally:
        sp.stop()
