"""Subprocesses on loopback: a real `dispatch serve`, and the trivial Litestar ceiling app."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu import children

REPO = Path(__file__).resolve().parents[1]


def port_range() -> range:
    """Where free ports are picked: below the kernel's ephemeral range (32768 and up on Linux),
    so no outgoing connection's source port takes one before its server binds it, and within
    DISPATCH_TEST_PORTS (LOW-HIGH) when set. The two test suites CI runs side by side get
    ranges of their own: serve binds with SO_REUSEPORT, so a port two suites both picked would
    join two unrelated servers into one without an error."""
    low, _, high = os.environ.get("DISPATCH_TEST_PORTS", "20000-32000").partition("-")
    return range(int(low), int(high))


def free_port(count: int = 1) -> int:
    """A port p with p .. p + count - 1 free, in port_range()."""
    ports = port_range()
    while True:
        base = random.randrange(ports.start, ports.stop - count)
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("0.0.0.0", port))
            return base
        except OSError:
            continue


def _status(pid: int, key: str) -> int:
    """A kB value of /proc/PID/status (VmRSS, VmHWM) summed over the process and its live
    children (the workers of `serve --workers N`); 0 when unreadable."""
    total = 0
    for p in (pid, *children(pid)):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class RssSampler:
    """Samples VmRSS of a process every 100 ms in a thread; peak also from VmHWM."""

    pid: int
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(_status(self.pid, "VmRSS"))

    def stop(self) -> tuple[int, int]:
        """(peak sampled VmRSS kB, VmHWM kB)."""
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        return max(self.samples, default=0), _status(self.pid, "VmHWM")


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    base: str
    ops: str | None
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def rss_kb(self) -> int:
        return _status(self.proc.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_http(proc: Process, url: str, timeout: float, ok: tuple[int, ...]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.proc.returncode}:\n{proc.log()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{url} did not answer in {timeout}s:\n{proc.log()}")


ADMIN_TOKEN = "bench-admin-token"


@contextlib.contextmanager
def dispatch_serve(database_url: str, env: Mapping[str, str] | None = None) -> Iterator[Process]:
    """`python -m dispatch serve` on free loopback ports, ready once /health answers 200."""
    api_port, ops_port = free_port(), free_port()
    while ops_port == api_port:  # each was free, but not apart from the other
        ops_port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-serve-"))
    full_env = {
        **os.environ,
        "DISPATCH_DATABASE_URL": database_url,
        "DISPATCH_PORT": str(api_port),
        "DISPATCH_METRICS_PORT": str(ops_port),
        "DISPATCH_HOST": "127.0.0.1",
        "DISPATCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "DISPATCH_LOG_FORMAT": "text",
        "DISPATCH_LOG_LEVEL": "warning",
        "DISPATCH_DATA_DIR": str(tmp / "data"),
        **(env or {}),
    }
    full_env.pop("DISPATCH_CONFIG", None)
    log_path = tmp / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch", "serve"],
            env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    p = Process(proc, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ops_port}", log_path)
    try:
        _wait_http(p, f"{p.ops}/health", 60, (200,))
        yield p
    finally:
        p.stop()


@contextlib.contextmanager
def trivial_serve() -> Iterator[Process]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-trivial-"))
    log_path = tmp / "trivial.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.trivial", str(port)], cwd=REPO,
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    p = Process(proc, f"http://127.0.0.1:{port}", None, log_path)
    try:
        _wait_http(p, f"{p.base}/echo", 30, (404, 405, 200))
        yield p
    finally:
        p.stop()
