"""Alembic environment: runs on the database the registry hands over (see registry.db)."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import registry.capability
import registry.captures
import registry.datasets
import registry.drift
import registry.erasures
import registry.jobs
import registry.models
import registry.retraining
import registry.routed_models
import registry.shadow
import registry.upgrades
import registry.version_tags
import registry.webhooks
import registry.workers  # noqa: F401  (each registers its tables on SQLModel.metadata)

database = context.config.attributes["database"]
with database.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
