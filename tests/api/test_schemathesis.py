"""Property-based requests generated from the API's own OpenAPI document, against a real
`dispatch serve` process: whatever the generator sends, no response is a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from dispatch.api.app import create_app
from dispatch.broker import Broker
from dispatch.db import create_pool
from dispatch.settings import Settings
from dispatch.store import Store
from tests import pg
from tests.serve import ServeProcess, serving

# The document the API serves at /schema/openapi.json, built from the app's routes (over a pool
# that is never opened: no database is needed for that). Loaded at import time: schemathesis' lazy
# fixture loader predates pytest 9.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(), Broker(Store(create_pool("", min_size=1, max_size=1))))
    .openapi_schema.to_schema()
)


@pytest.fixture(scope="module")
def server(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    url = pg.clone_database(pg_server)
    try:
        with serving(url, Path(tmp_path_factory.mktemp("schemathesis"))) as sp:
            yield sp
    finally:
        pg.drop_database(pg_server, url)


def test_the_served_document_is_the_one_tested(server: ServeProcess) -> None:
    served = httpx.get(f"{server.api}/schema/openapi.json").json()
    assert served["paths"].keys() == schema.raw_schema["paths"].keys()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(case: Any, server: ServeProcess) -> None:
    if isinstance(case.body, dict) and "wait_seconds" in case.body:
        case.body["wait_seconds"] = 0  # a long poll would only make the run slow
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    response = case.call(base_url=server.api, headers=headers, timeout=10)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
    )
