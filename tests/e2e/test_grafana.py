"""docs/grafana/dispatch.json is built on series the broker exports: every metric its queries name
is in the scrape of a real `serve --workers 2` (the supervisor's one endpoint) after a workload
that touches each of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.serve import serving

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "dispatch.json"
# A PromQL expression's metric names: ours all start with dispatch_ (functions and labels do not).
METRIC = re.compile(r"\bdispatch_[a-z_]+\b")


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def exported(text: str) -> set[str]:
    """The sample names of a scrape (a histogram's _bucket, _sum and _count included)."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_every_dashboard_query_names_an_exported_series(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, env={"DISPATCH_SERVER_WORKERS": "2"}) as sp:
        admin = {"X-Agent-ID": "ops", "Authorization": f"Bearer {sp.admin_token}"}
        with httpx.Client(base_url=f"{sp.api}/api/v1", timeout=10) as api:
            # Flow control on: a weight, a concurrency cap and a rate bucket; one task held back.
            assert api.put("/tenants/alice/weight", json={"weight": 2}, headers=admin).is_success
            assert api.put("/limits/concurrency/repo", json={"max_active": 0},
                           headers=admin).is_success
            assert api.put("/limits/rate/llm", json={"capacity": 10, "refill_per_second": 1},
                           headers=admin).is_success
            alice = {"X-Agent-ID": "alice"}
            for body in ({"title": "held", "concurrency_key": "repo"},
                         {"title": "render", "required_capabilities": ["gpu"]},
                         {"title": "ok", "rate_key": "llm"},
                         {"title": "doomed", "max_retries": 0}):
                assert api.post("/tasks", json=body, headers=alice).status_code == 201
            # An agent takes two tasks: one completes, one fails for good.
            agent = {"X-Agent-ID": "worker-1"}
            assert api.put("/agents/worker-1", json={"capabilities": []}, headers=agent).is_success
            for outcome in ("complete", "fail"):
                claimed = api.post("/tasks/claim", json={"wait_seconds": 5}, headers=agent)
                assert claimed.status_code == 200, claimed.text
                task_id = claimed.json()["task_id"]
                assert api.post(f"/tasks/{task_id}/start", json={}, headers=agent).is_success
                body = {"result": {}} if outcome == "complete" else {"error": "boom",
                                                                      "retry_eligible": False}
                assert api.post(f"/tasks/{task_id}/{outcome}", json=body, headers=agent).is_success
        text = httpx.get(f"{sp.ops}/metrics", timeout=10).text

    names = exported(text)
    missing = {(m, q) for q in queries() for m in METRIC.findall(q) if m not in names}
    assert not missing, sorted(missing)
    # The workload showed what the panels are for.
    assert 'dispatch_capability_agents{capability="gpu"} 0.0' in text
    assert 'dispatch_flow_held_tasks{key="repo",rule="concurrency"} 1.0' in text
    assert re.search(r'^dispatch_tenant_pending\{tenant="alice"\} [1-9]', text, re.M)
    assert re.search(r'^dispatch_task_transitions_total\{event="dlq"\} 1\.0$', text, re.M)
