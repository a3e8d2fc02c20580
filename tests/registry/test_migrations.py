"""Migrations build exactly the schema the models describe, from code (no alembic.ini)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from registry_testdata import create_database, drop_database
from sqlalchemy import Engine, MetaData, inspect, select
from sqlmodel import SQLModel

from registry import LocalBlobStore, Registry
from registry.db import alembic_config, migrate, open_database
from registry.models import utcnow


def test_migrated_schema_matches_the_models(registry: Registry) -> None:
    with registry.database.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == []
    assert {"tenants", "api_keys", "base_models", "adapters", "adapter_versions", "eval_results",
            "aliases", "audit_events", "usage", "alembic_version"} <= tables  # fmt: skip


def test_migrate_twice_is_a_no_op_and_reaches_head(registry: Registry) -> None:
    registry.migrate()
    head = ScriptDirectory.from_config(alembic_config(registry.database)).get_current_head()
    with registry.database.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head
    assert head is not None and head >= "0001"


def test_sqlite_runs_in_wal_mode(registry: Registry) -> None:
    if registry.database.dialect.name != "sqlite":
        assert registry.database.dialect.name == "postgresql"
        return
    with registry.database.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


@pytest.mark.postgres
@pytest.mark.timeout(120)  # without the lock the racing upgrades deadlock or fail
def test_gateways_starting_together_migrate_a_fresh_postgres_once() -> None:
    """Racing `alembic upgrade` runs collide on the same tables; the lock serialises them."""
    url = create_database("loraplex_migrate")
    databases = [open_database(url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(databases)) as pool:
            list(pool.map(migrate, databases))  # re-raises the first failure
        head = ScriptDirectory.from_config(alembic_config(databases[0])).get_current_head()
        with databases[0].connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
    finally:
        for database in databases:
            database.dispose()
        drop_database(url)


# -- 0003: adapter_versions.engine_name -> lora_name ----------------------------

OLD_LORA_NAME = "lx-00112233aabbccdd"


def _insert_0002_version(database: Engine) -> None:
    """One tenant, base, adapter and version, written as a 0002 deployment wrote them."""
    tables = MetaData()
    tables.reflect(database)
    now = utcnow()
    rows = {
        "tenants": {"id": 1, "name": "acme", "created_at": now},
        "base_models": {"id": 1, "name": "tiny", "revision": "r1", "fingerprint": "b" * 64,
                        "architecture": "", "module_table": {}, "created_at": now,
                        "deprecation_reason": ""},
        "adapters": {"id": 1, "tenant_id": 1, "name": "bot", "description": "",
                     "created_at": now},
        "adapter_versions": {"id": 1, "adapter_id": 1, "number": 1, "fingerprint": "a" * 64,
                             "engine_name": OLD_LORA_NAME, "base_id": 1, "rank": 8,
                             "alpha": 16.0, "target_modules": ["q_proj"], "size_bytes": 1,
                             "blob_sha256": "c" * 64, "blob_key": "adapters/x.tar",
                             "state": "active", "base_deprecated": False,
                             "library_versions": {}, "created_by": "op", "created_at": now},
    }  # fmt: skip
    with database.begin() as conn:
        for table, row in rows.items():
            conn.execute(tables.tables[table].insert().values(**row))


def _old_column(database: Engine) -> list[str]:
    tables = MetaData()
    tables.reflect(database, only=["adapter_versions"])
    column = tables.tables["adapter_versions"].c.engine_name
    with database.connect() as conn:
        return list(conn.execute(select(column)).scalars())


def _check_rows_survive_the_rename(url: str, blobs: Path) -> None:
    database = open_database(url)
    try:
        config = alembic_config(database)
        command.upgrade(config, "0002")
        _insert_0002_version(database)
        for _ in range(2):  # upgrade, then a downgrade/upgrade round trip
            command.upgrade(config, "head")
            registry = Registry(url, LocalBlobStore(blobs), auto_migrate=False)
            try:
                assert [v.lora_name for v in registry.list_versions(1, "bot")] == [OLD_LORA_NAME]
                found = registry.version_by_lora_name(OLD_LORA_NAME)
                assert found is not None and found.version.number == 1
            finally:
                registry.close()
            command.downgrade(config, "0002")
            assert _old_column(database) == [OLD_LORA_NAME]
    finally:
        database.dispose()


def test_versions_written_before_the_rename_read_back_by_lora_name_on_sqlite(
    tmp_path: Path,
) -> None:
    _check_rows_survive_the_rename(f"sqlite:///{tmp_path / 'old.db'}", tmp_path / "blobs")


@pytest.mark.postgres
def test_versions_written_before_the_rename_read_back_by_lora_name_on_postgres(
    tmp_path: Path,
) -> None:
    url = create_database("loraplex_rename")
    try:
        _check_rows_survive_the_rename(url, tmp_path / "blobs")
    finally:
        drop_database(url)
