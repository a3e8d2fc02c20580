"""Training fixtures: a tiny chat base, and registries on SQLite and on PostgreSQL.

PostgreSQL (127.0.0.1:5432) being down fails the PostgreSQL-backed tests; nothing skips.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import SQLModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from registry_testdata import create_database, drop_database

from registry import Actor, BaseModelRecord, LocalBlobStore, Registry, Tenant
from registry.jobs import JobStore
from tests.training.training_testdata import build_tiny_chat_base

ADMIN = Actor("test-admin", admin=True)


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_base(tmp_path_factory.mktemp("chat-base") / "base")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_database("loraplex_training_test")
    yield url
    drop_database(url)


def _empty(url: str) -> None:
    registry = Registry(url, LocalBlobStore(Path("/nonexistent-unused")))
    tables = ", ".join(t.name for t in SQLModel.metadata.sorted_tables)
    with registry.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE TABLE {tables} RESTART IDENTITY CASCADE"))
    registry.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("pg_url")
    _empty(url)
    return url


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(database_url, LocalBlobStore(tmp_path / "blobs"))
    yield registry
    registry.close()


@pytest.fixture
def store(registry: Registry) -> JobStore:
    return JobStore(registry, stale_after=60, max_attempts=2)


@pytest.fixture
def tenant(registry: Registry) -> Tenant:
    return registry.create_tenant("acme", ADMIN)


@pytest.fixture
def base(registry: Registry, chat_base: Path) -> BaseModelRecord:
    return registry.register_base(chat_base, "tiny-chat", "r1", ADMIN)
