"""Plain values the registry hands out or takes in (not tables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from registry.models import ADMIN_SCOPE, AdapterVersion, BaseModelRecord


@dataclass(frozen=True)
class Actor:
    """Who makes a change, as the audit log records it."""

    name: str
    """E.g. ``key:12`` for an API key, ``cli:alice`` for an operator."""
    admin: bool = False
    """Admins may override promotion gates."""


@dataclass(frozen=True)
class Principal:
    """What an API key authenticates as."""

    tenant_id: int | None
    """The key's tenant; None for admin keys."""
    scope: str
    """``tenant`` or ``admin``."""
    key_id: int

    @property
    def is_admin(self) -> bool:
        return self.scope == ADMIN_SCOPE

    @property
    def actor(self) -> Actor:
        return Actor(f"key:{self.key_id}", admin=self.is_admin)


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits the gateway enforces; None means unlimited."""

    requests_per_minute: int | None = None
    """Requests per rolling minute."""
    tokens_per_minute: int | None = None
    """Prompt + completion tokens per rolling minute."""
    max_concurrent: int | None = None
    """Requests in flight at once."""
    max_total_tokens: int | None = None
    """Tokens over the tenant's lifetime (a hard budget)."""


@dataclass(frozen=True)
class Provenance:
    """Where a version came from (training fills all of it; uploads usually none)."""

    dataset_sha256: str | None = None
    """SHA-256 of the training data."""
    training_config_sha256: str | None = None
    """SHA-256 of the training configuration."""
    seed: int | None = None
    """Random seed of the training run."""
    library_versions: dict[str, str] = field(default_factory=dict)
    """torch, transformers, peft... versions used for training."""
    parent_version: int | None = None
    """Number of the version of the same adapter this one was trained from."""
    training_job: str | None = None
    """Id of the training job that produced it."""
    composition: dict[str, Any] | None = None
    """How it was composed from other versions (``training.compose``): method, its
    parameters and the parents with their weights; None when it was not."""


@dataclass(frozen=True)
class AliasTarget:
    """Where an alias points, for the router."""

    version: int
    lora_name: str
    weight: float


@dataclass(frozen=True)
class RoutingView:
    """What the router needs for one adapter: servable versions and aliases."""

    adapter_id: int
    tenant_id: int
    name: str
    versions: list[AdapterVersion]
    """Active versions, oldest first."""
    aliases: dict[str, AliasTarget]
    """``production`` and ``canary`` (when set)."""


@dataclass(frozen=True)
class VersionBlob:
    """An adapter version and what an engine needs to load it."""

    version: AdapterVersion
    base: BaseModelRecord
    blob_key: str
    blob_sha256: str
    size_bytes: int
