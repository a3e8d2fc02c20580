"""Shared fixtures of the REST route tests: a registry on SQLite and on PostgreSQL, and a
small FastAPI app with the routes under test and the gateway's error handler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from registry import LocalBlobStore, Registry
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
