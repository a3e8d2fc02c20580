"""Shared fixtures of the REST route tests: a registry on SQLite and on PostgreSQL, and a
small FastAPI app with the routes under test and the gateway's error handler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from registry import Actor, LocalBlobStore, Registry
from server.errors import install_api_error_handler
from tests.registry.registry_testdata import create_database, drop_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_database("loraplex_api_routes")
    yield url
    drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    registry = Registry(url, LocalBlobStore(tmp_path / "blobs"))
    with registry.database.begin() as conn:  # the PostgreSQL database outlives one test
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())
    yield registry
    registry.close()


def client_for(registry: Registry, *routers: APIRouter) -> TestClient:
    """A TestClient of an app with ``routers`` on ``registry`` (``app.state.registry``)."""
    app = FastAPI()
    app.state.registry = registry
    install_api_error_handler(app)
    for router in routers:
        app.include_router(router)
    return TestClient(app)


ROUTE_TEST_ADMIN = Actor("test-root", admin=True)


def tenant_with_key(registry: Registry, name: str) -> tuple[int, dict[str, str]]:
    """A new tenant ``name``: (its id, the headers of a new tenant key of its)."""
    tenant_id = registry.create_tenant(name, ROUTE_TEST_ADMIN).id
    assert tenant_id is not None
    key = registry.create_api_key(tenant_id, "tenant", ROUTE_TEST_ADMIN)[1]
    return tenant_id, {"authorization": f"Bearer {key}"}
