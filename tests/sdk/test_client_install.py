"""The client install: an agent host runs the worker and the client commands with only the base
dependencies (httpx, msgspec and what they pull in), not the server's stack. The test builds a
virtualenv holding exactly that closure, taken from this install, and runs the real thing in it."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dispatch.sdk.client import DispatchClient
from tests.sdk.conftest import eventually
from tests.serve import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("psycopg", "psycopg_pool", "litestar", "uvicorn", "pgserver", "yaml",
               "prometheus_client", "nats")


def project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["project"]
    assert isinstance(table, dict)
    return table


def closure(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements need, transitively (no extras)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in metadata.requires(name) or [])
    return seen


def link_distribution(name: str, site: Path) -> None:
    """Make one installed distribution importable from `site` (its top-level files, its
    metadata), by symbolic links into this install."""
    dist = metadata.distribution(name)
    tops = set()
    for file in dist.files or []:
        parts = Path(file).parts
        if parts and parts[0] != ".." and not parts[0].endswith(".pth"):
            tops.add(parts[0])
    for top in tops:
        source = Path(str(dist.locate_file(top)))
        if source.exists() and not (site / top).exists():
            (site / top).symlink_to(source)


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with the client's dependency closure and the dispatch package, nothing else."""
    home = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(home)
    python = home / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    dependencies = project()["dependencies"]
    assert isinstance(dependencies, list)
    for name in sorted(closure(dependencies)):
        link_distribution(name, site)
    (site / "dispatch").symlink_to(ROOT / "dispatch")
    return python


def run_client(python: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    return subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout,
                          env={**full_env, **(env or {})}, cwd="/")


def test_the_base_dependencies_are_the_clients_and_dev_installs_the_server() -> None:
    table = project()
    names = {Requirement(r).name for r in table["dependencies"]}  # type: ignore[attr-defined]
    assert names == {"httpx", "msgspec"}
    extras = table["optional-dependencies"]
    assert isinstance(extras, dict)
    server = {Requirement(r).name for r in extras["server"]}
    assert {"psycopg", "litestar", "uvicorn", "pgserver", "pyyaml"} <= server
    assert project()["name"] == "dispatch-broker"
    assert "dispatch-broker[server]" in extras["dev"]


def test_the_client_venv_lacks_the_server_but_imports_the_sdk(client_python: Path) -> None:
    probe = ("import importlib.util, sys\n"
             f"missing = [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)]\n"
             "assert not missing, missing\n"
             "import dispatch.sdk.client, dispatch.sdk.worker, dispatch.sdk.cli\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             f"{SERVER_ONLY!r}))\n")
    done = run_client(client_python, "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_serve_in_the_client_venv_says_what_to_install(client_python: Path) -> None:
    done = run_client(client_python, "-m", "dispatch", "serve")
    assert done.returncode == 2
    assert "pip install 'dispatch-broker[server]'" in done.stderr, done.stderr


def test_client_commands_and_a_worker_run_in_the_client_venv(
    client_python: Path, sp: ServeProcess
) -> None:
    env = {"DISPATCH_URL": sp.api, "DISPATCH_AGENT_ID": "alice"}
    made = run_client(client_python, "-m", "dispatch", "task", "create", "from a client host",
                      "--json", env=env)
    assert made.returncode == 0, made.stderr
    listed = run_client(client_python, "-m", "dispatch", "task", "list", env=env)
    assert listed.returncode == 0 and "from a client host" in listed.stdout, listed.stderr
    worker = subprocess.Popen(
        [client_python, "-m", "dispatch", "worker", "--agent-id", "thin-host", "--poll", "1",
         "--", sys.executable, "-c", "print('done on a thin host')"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
    )
    try:
        with DispatchClient(sp.api, "alice") as alice:
            task = alice.list().tasks[0]
            done = eventually(lambda: alice.get(task.task_id), lambda t: t.status == "completed")
            assert done.result == "done on a thin host" and done.assigned_agent == "thin-host"
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
