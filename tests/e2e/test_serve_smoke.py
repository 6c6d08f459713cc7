from __future__ import annotations

from pathlib import Path

import httpx

from tests.serve import serving


def test_serve_answers_health(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path) as sp:
        r = httpx.get(f"{sp.ops}/health")
        assert r.status_code == 200
        assert r.json()["database"] == "ok"
