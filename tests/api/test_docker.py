"""docker/: no Docker engine runs here, so check what can be checked without one: the compose file
runs the same `dispatch serve` the end-to-end tests run, with settings that load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dispatch.settings import load_settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def test_compose_has_postgres_nats_with_jetstream_and_two_replicas() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "-js" in services["nats"]["command"]
    replicas = [s for name, s in services.items() if name.startswith("dispatch-")]
    assert len(replicas) == 2
    urls = {r["environment"]["DISPATCH_DATABASE_URL"] for r in replicas}
    assert len(urls) == 1 and "@postgres:5432/" in urls.pop()  # one shared database
    host_ports = [p for r in replicas for p in r["ports"]]
    assert len(host_ports) == len(set(host_ports)) == 4


def test_replicas_run_serve_with_settings_that_load() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dispatch"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    image_env = dict(re.findall(r"(DISPATCH_[A-Z_]+)=(\S+)", dockerfile))
    budgets = []
    for name, service in compose()["services"].items():
        if not name.startswith("dispatch-"):
            continue
        assert service["command"] == ["serve"]
        env = {
            k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
            for k, v in {**image_env, **service["environment"]}.items()
        }
        settings = load_settings(None, env)
        assert settings.database.url.startswith("postgresql://")
        assert settings.hermes.url == "nats://nats:4222"
        assert settings.server.host == "0.0.0.0" and settings.server.admin_token
        budgets.append(settings.database.max_connections)
    # Both replicas' budgets together leave psql room on the stock max_connections (100).
    assert len(budgets) == 2 and all(budgets) and sum(budgets) <= 100 - 3 - 10
