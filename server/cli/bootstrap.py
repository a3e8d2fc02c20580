"""Turning settings into running parts: the registry, the served base, the engines."""

from __future__ import annotations

from registry import Actor, Conflict, NotFound, Registry, UploadLimits, open_blob_store
from server.config import Settings
from server.gateway.engines import EngineSupervisor
from server.gateway.replicas import Engine

SYSTEM = Actor("system:serve", admin=True)


class StartupError(RuntimeError):
    """Serving cannot start; the message says what to do."""


def open_registry(settings: Settings) -> Registry:
    """The registry the settings name, migrated to the current schema."""
    settings.home.mkdir(parents=True, exist_ok=True)
    blobs = open_blob_store(settings.resolved_blob_url, settings.s3_endpoint_url or None)
    limits = UploadLimits(
        max_total_bytes=settings.max_upload_bytes, max_rank=settings.max_lora_rank
    )
    return Registry(settings.resolved_database_url, blobs, limits)


def served_base_fingerprint(settings: Settings, registry: Registry) -> str:
    """Register the local base model (idempotent), or find the named one; its fingerprint."""
    base = settings.resolved_base_model
    if (base / "config.json").is_file():
        try:
            record = registry.register_base(
                base, settings.resolved_served_model_name, settings.base_revision, SYSTEM
            )
        except Conflict as exc:
            raise StartupError(
                f"{exc}; serve it under that name and revision (--served-model-name, "
                "--base-revision), or give these weights a new revision"
            ) from None
        return record.fingerprint
    try:
        return registry.get_base(settings.resolved_served_model_name).fingerprint
    except NotFound:
        raise StartupError(
            f"the base model {settings.resolved_served_model_name!r} is neither a local "
            f"directory ({base}) nor registered; point --base-model at a Hugging Face model "
            "directory, or register it with `loraplex bases register`"
        ) from None


def external_engines(settings: Settings) -> list[Engine]:
    """Engines from ``engine_urls``; each is asked which base it serves (``gateway.bases``)."""
    return [Engine(url.rstrip("/")) for url in settings.engine_urls]


def local_supervisors(settings: Settings, base_fingerprint: str) -> list[EngineSupervisor]:
    """The engines ``serve`` starts itself, each with the registry-backed resolver configured."""
    base = settings.resolved_base_model
    if not (base / "config.json").is_file():
        raise StartupError(
            f"no model at {base} (config.json missing). Build the demo base with "
            "`loraplex demo-base`, or point --base-model / LORAPLEX_BASE_MODEL at a local "
            "Hugging Face model directory."
        )
    settings.ensure_engine_key()
    return [
        EngineSupervisor(
            settings,
            settings.engine_port + index,
            settings.home / "logs" / f"engine-{index}.log",
            base_fingerprint=base_fingerprint,
            cache_dir=settings.home / "adapter-cache" / f"engine-{index}",
        )
        for index in range(settings.engine_replicas)
    ]
