"""Migrations build exactly the schema the models describe, from code (no alembic.ini)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from registry_testdata import create_database, drop_database
from sqlalchemy import inspect
from sqlmodel import SQLModel

from registry import Registry
from registry.db import alembic_config, make_engine, migrate


def test_migrated_schema_matches_the_models(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == []
    assert {"tenants", "api_keys", "base_models", "adapters", "adapter_versions", "eval_results",
            "aliases", "audit_events", "usage", "alembic_version"} <= tables  # fmt: skip


def test_migrate_twice_is_a_no_op_and_reaches_head(registry: Registry) -> None:
    registry.migrate()
    head = ScriptDirectory.from_config(alembic_config(registry.engine)).get_current_head()
    with registry.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head
    assert head is not None and head >= "0001"


def test_sqlite_runs_in_wal_mode(registry: Registry) -> None:
    if registry.engine.dialect.name != "sqlite":
        assert registry.engine.dialect.name == "postgresql"
        return
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


@pytest.mark.postgres
@pytest.mark.timeout(120)  # without the lock the racing upgrades deadlock or fail
def test_gateways_starting_together_migrate_a_fresh_postgres_once() -> None:
    """Racing `alembic upgrade` runs collide on the same tables; the lock serialises them."""
    url = create_database("loraplex_migrate")
    engines = [make_engine(url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(migrate, engines))  # re-raises the first failure
        head = ScriptDirectory.from_config(alembic_config(engines[0])).get_current_head()
        with engines[0].connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
    finally:
        for engine in engines:
            engine.dispose()
        drop_database(url)
