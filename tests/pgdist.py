"""A throwaway PostgreSQL cluster from the machine's distribution binaries (`pg_config --bindir`,
e.g. Debian's postgresql-15), with the build's stock settings: JIT and the planner as users run
them. Only durability is off (this data is thrown away). initdb refuses root, so as root the
cluster belongs to the `postgres` user and its commands run as that user."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.serve import free_port


class DistributionMissing(RuntimeError):
    """No distribution PostgreSQL on this machine."""


def bindir() -> Path:
    """Where the distribution's server binaries are; DistributionMissing when there are none."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        raise DistributionMissing("pg_config is not on PATH (install e.g. postgresql-15)")
    out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    if not (path / "initdb").exists() or not (path / "postgres").exists():
        raise DistributionMissing(f"no initdb/postgres in {path} (only the client is installed)")
    return path


def _as_owner(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    runuser = shutil.which("runuser")
    if runuser is None:
        raise DistributionMissing("running as root and runuser is missing: cannot run initdb")
    return [runuser, "-u", "postgres", "--", *args]


class Cluster:
    """A throwaway cluster that can be stopped and started again (same port, same data), e.g. to
    restart the server under load."""

    def __init__(self, *, durable: bool = False, settings: dict[str, str] | None = None) -> None:
        self.bin = bindir()
        self.root = Path(tempfile.mkdtemp(prefix="dispatch-pgdist-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.root.chmod(0o755)
        port = free_port()
        try:
            subprocess.run(
                _as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                           "postgres", "-E", "UTF8", "--locale", "C"]),
                check=True, capture_output=True,
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        options = {
            "port": str(port), "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root), "max_connections": "400",
            **({} if durable else {"fsync": "off", "synchronous_commit": "off",
                                   "full_page_writes": "off"}),
            **(settings or {}),
        }
        self.flags = " ".join(f"-c {k}={v}" for k, v in options.items())
        # A superuser URL to its `postgres` database.
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def start(self) -> None:
        subprocess.run(
            _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
                       "-l", str(self.root / "server.log"), "-o", self.flags, "start"]),
            check=True, capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode,
                           "stop"]),
                capture_output=True,
            )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running(*, durable: bool = False, settings: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start a cluster; yield it; stop and delete it."""
    c = Cluster(durable=durable, settings=settings)
    try:
        c.start()
        yield c
    finally:
        c.destroy()


@contextlib.contextmanager
def cluster(*, durable: bool = False, settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start a cluster; yield a superuser URL to its `postgres` database; stop and delete it."""
    with running(durable=durable, settings=settings) as c:
        yield c.url


if __name__ == "__main__":
    import sys

    try:
        print(bindir())
    except DistributionMissing as exc:
        print(f"no distribution PostgreSQL: {exc}")
        sys.exit(1)
