"""Registry tables (sqlmodel). The Alembic migrations under ``migrations/`` create them.

Timestamps are UTC. JSON columns hold small structured values (module tables,
provenance library versions, audit before/after snapshots).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel

TENANT_SCOPE = "tenant"
ADMIN_SCOPE = "admin"

ACTIVE = "active"
ARCHIVED = "archived"
RETIRED = "retired"

PRODUCTION = "production"
CANARY = "canary"
SHADOW = "shadow"
"""The alias of the candidate version that gets copies of production's traffic; its
weight is the share of production requests copied (``registry.shadow``)."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def timestamp_column(nullable: bool = False, index: bool = False) -> Any:
    """A timezone-aware timestamp: now when the row is made, or NULL until set (``nullable``)."""
    if nullable:
        return Field(default=None, sa_type=DateTime(timezone=True), index=index)
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True), index=index)


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    created_at: dt.datetime = timestamp_column()
    # Limits are enforced by the gateway; None means unlimited.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    max_total_tokens: int | None = None


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    # Only the SHA-256 of the key is stored; the plaintext is shown once.
    key_sha256: str = Field(unique=True, index=True, max_length=64)
    prefix: str = Field(max_length=16)
    scope: str = Field(max_length=16)
    tenant_id: int | None = Field(default=None, foreign_key="tenants.id", index=True)
    name: str = Field(default="", max_length=128)
    created_at: dt.datetime = timestamp_column()
    revoked_at: dt.datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class BaseModelRecord(SQLModel, table=True):
    __tablename__ = "base_models"
    __table_args__ = (UniqueConstraint("name", "revision"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=256, index=True)
    revision: str = Field(default="", max_length=128)
    fingerprint: str = Field(unique=True, max_length=64)
    architecture: str = Field(default="", max_length=128)
    # module path -> [out_features, in_features] for every 2-D ``*.weight``.
    module_table: dict[str, list[int]] = Field(default_factory=dict, sa_type=JSON)
    created_at: dt.datetime = timestamp_column()
    deprecated_at: dt.datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    deprecation_reason: str = Field(default="", max_length=1024)


class Adapter(SQLModel, table=True):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    name: str = Field(max_length=128)
    description: str = Field(default="", max_length=4096)
    created_at: dt.datetime = timestamp_column()


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),
        UniqueConstraint("adapter_id", "fingerprint"),
    )

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapters.id", index=True)
    number: int
    fingerprint: str = Field(max_length=64, index=True)
    lora_name: str = Field(max_length=32, index=True)
    base_id: int = Field(foreign_key="base_models.id", index=True)
    rank: int
    alpha: float
    target_modules: list[str] = Field(default_factory=list, sa_type=JSON)
    size_bytes: int
    blob_sha256: str = Field(max_length=64)
    blob_key: str = Field(max_length=512)
    state: str = Field(default=ACTIVE, max_length=16)
    base_deprecated: bool = False
    dataset_sha256: str | None = Field(default=None, max_length=64)
    training_config_sha256: str | None = Field(default=None, max_length=64)
    seed: int | None = None
    library_versions: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    parent_version_id: int | None = Field(default=None, foreign_key="adapter_versions.id")
    training_job: str | None = Field(default=None, max_length=128)
    # A composed version's recipe: method, its parameters and every parent (adapter,
    # version, fingerprint, weight); None for uploaded and trained versions.
    composition: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


class EvalResult(SQLModel, table=True):
    __tablename__ = "eval_results"

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="adapter_versions.id", index=True)
    suite: str = Field(max_length=128)
    metric: str = Field(max_length=128)
    value: float
    sample_count: int | None = None
    dataset_sha256: str | None = Field(default=None, max_length=64)
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


class PromotionGate(SQLModel, table=True):
    __tablename__ = "promotion_gates"
    __table_args__ = (UniqueConstraint("adapter_id", "suite", "metric"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapters.id", index=True)
    suite: str = Field(max_length=128)
    metric: str = Field(max_length=128)
    min_value: float | None = None
    # Candidate may be at most this much worse than current production.
    max_regression: float | None = None
    higher_is_better: bool = True
    # Candidate may be at most this much worse than the base alone's capability reference.
    max_below_base: float | None = None


class Alias(SQLModel, table=True):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapters.id", index=True)
    name: str = Field(max_length=64)
    version_id: int = Field(foreign_key="adapter_versions.id")
    weight: float = 1.0
    updated_at: dt.datetime = timestamp_column()


class AliasHistory(SQLModel, table=True):
    """Every alias move; rollback walks it backwards (``undone`` marks walked entries)."""

    __tablename__ = "alias_history"

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapters.id", index=True)
    alias: str = Field(max_length=64)
    action: str = Field(max_length=32)
    version_id: int | None = Field(default=None, foreign_key="adapter_versions.id")
    previous_version_id: int | None = Field(default=None, foreign_key="adapter_versions.id")
    undone: bool = False
    actor: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    actor: str = Field(max_length=256)
    action: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=512, index=True)
    tenant_id: int | None = Field(default=None, index=True)
    before: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    after: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: dt.datetime = timestamp_column()


class Usage(SQLModel, table=True):
    """Daily usage counters; base-model traffic has adapter ``""`` and version 0."""

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("tenant_id", "adapter", "version", "day"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    adapter: str = Field(default="", max_length=128)
    version: int = 0
    day: dt.date
    requests: int = 0
    """Every admitted request that ended: answered, refused by the engine or failed."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    """Requests that failed on the server's side (5xx, or a stream the engine broke off)."""
    latency_seconds: float = 0.0
    """Total time, first byte of the request to the answer's end, of the successful ones."""
    latency_count: int = 0
    """How many successful requests ``latency_seconds`` sums."""
    latency_buckets: list[int] | None = Field(default=None, sa_type=JSON)
    """Those requests counted per ``registry.latency.BOUNDS`` bucket (None: none yet)."""
