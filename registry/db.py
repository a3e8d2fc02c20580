"""Opening the database and migrating it: SQLite (embedded, WAL) or PostgreSQL.

``migrate`` runs ``alembic upgrade head`` with a configuration built in code
(script location inside this package), so it works from an installed wheel
with no alembic.ini around.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option that makes a SQLite transaction take the write lock at BEGIN.
WRITE_OPTION = "loraplex_write"


def open_database(url: str) -> Engine:
    """The database at ``url`` (a pooled SQLAlchemy engine); ``postgresql://`` uses psycopg 3."""
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        return _open_sqlite(url)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _open_sqlite(url: str) -> Engine:
    database = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        # SQLite's JSON paths match keys as the JSON text spells them: "\u00fc" is not "ü",
        # so non-ASCII keys are written as themselves (the stored-completion metadata filter).
        json_serializer=lambda value: json.dumps(value, ensure_ascii=False),
    )

    @event.listens_for(database, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below) so writers can take the lock up front.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(database, "begin")
    def _on_begin(conn: Any) -> None:
        # BEGIN IMMEDIATE for writers: a deferred transaction that later upgrades to a
        # write lock fails at once with "database is locked" under contention.
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return database


def alembic_config(database: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database"] = database
    return config


MIGRATION_LOCK = 0x6C6F7261706C6578  # "loraplex": one PostgreSQL advisory lock id for all of us


def migrate(database: Engine) -> None:
    """Bring the database schema to the newest migration.

    On PostgreSQL the upgrade runs under an advisory lock: gateways, workers and
    the migration Job may start together, and two concurrent ``alembic upgrade``
    runs would race to create the same tables. The others wait, then find the
    schema current. (SQLite serialises writers itself.)
    """
    if database.dialect.name != "postgresql":
        command.upgrade(alembic_config(database), "head")
        return
    with database.connect() as lock:
        lock.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK})
        try:
            command.upgrade(alembic_config(database), "head")
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK})
