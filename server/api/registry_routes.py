"""REST routes of the registry: tenants manage their own adapters; admins everything.

Tenant routes live under ``/v1/adapters``; admins reach any tenant's adapters
through the same routes under ``/admin/tenants/{tenant}/adapters``, plus
tenants, keys, base models and the audit log. Handlers are plain functions, so
FastAPI runs the (blocking) registry calls in its thread pool. They call the
registry directly: its errors, blob-store failures and database outages reach
the handler ``server.errors.install_api_error_handler`` installs.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route closures at definition time.
"""

import contextlib
import datetime as dt
import lzma
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, Field

from registry import (
    Actor,
    Adapter,
    AdapterVersion,
    ApiKey,
    AuditEvent,
    BaseModelRecord,
    Gate,
    NotFound,
    Principal,
    Registry,
    Tenant,
    TenantLimits,
    tenant_ref,
)
from registry.eval_history import eval_history
from registry.online_metrics import record_online_metrics
from server.api.alias_routes import add_alias_routes, search_listing
from server.api.auth import registry_of, require_admin, require_tenant
from server.api.composition_routes import add_composition_routes
from server.api.shadow_routes import add_shadow_routes
from server.errors import APIError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")

routes = APIRouter(tags=["registry"])


# -- JSON shapes ----------------------------------------------------------------


def version_json(v: AdapterVersion) -> dict[str, Any]:
    return {
        "object": "adapter.version",
        "version": v.number,
        "fingerprint": v.fingerprint,
        "lora_name": v.lora_name,
        "base_id": v.base_id,
        "rank": v.rank,
        "alpha": v.alpha,
        "target_modules": v.target_modules,
        "size_bytes": v.size_bytes,
        "state": v.state,
        "base_deprecated": v.base_deprecated,
        "created_by": v.created_by,
        "created_at": v.created_at.isoformat(),
        "provenance": {
            "dataset_sha256": v.dataset_sha256,
            "training_config_sha256": v.training_config_sha256,
            "seed": v.seed,
            "library_versions": v.library_versions,
            "training_job": v.training_job,
            "composition": v.composition,
        },
    }


def adapter_json(registry: Registry, tenant_id: int, adapter: Adapter) -> dict[str, Any]:
    aliases = registry.aliases(tenant_id, adapter.name)
    return {
        "object": "adapter",
        "id": adapter.name,
        "description": adapter.description,
        "created_at": adapter.created_at.isoformat(),
        "aliases": {name: asdict(target) for name, target in aliases.items()},
    }


def _listing(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": items}


def tenant_json(t: Tenant) -> dict[str, Any]:
    limits = {k: getattr(t, k) for k in asdict(TenantLimits())}
    return {"object": "tenant", "id": t.id, "name": t.name, "limits": limits}


def key_json(k: ApiKey) -> dict[str, Any]:
    return {
        "object": "api_key",
        "id": k.id,
        "prefix": k.prefix,
        "scope": k.scope,
        "tenant_id": k.tenant_id,
        "name": k.name,
        "created_at": k.created_at.isoformat(),
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
    }


def base_json(b: BaseModelRecord) -> dict[str, Any]:
    return {
        "object": "base_model",
        "id": b.id,
        "name": b.name,
        "revision": b.revision,
        "fingerprint": b.fingerprint,
        "architecture": b.architecture,
        "modules": len(b.module_table),
        "deprecated_at": b.deprecated_at.isoformat() if b.deprecated_at else None,
        "deprecation_reason": b.deprecation_reason,
    }


def audit_json(e: AuditEvent) -> dict[str, Any]:
    return {
        "object": "audit_event",
        "id": e.id,
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "tenant_id": e.tenant_id,
        "before": e.before,
        "after": e.after,
        "created_at": e.created_at.isoformat(),
    }


# -- request bodies ---------------------------------------------------------------


class PromoteBody(BaseModel):
    version: int
    override: bool = False


class CanaryBody(BaseModel):
    version: int
    weight: float = Field(ge=0.0, le=1.0)


class EvalBody(BaseModel):
    suite: str
    metric: str
    value: float
    sample_count: int | None = None
    dataset_sha256: str | None = None


class GateBody(BaseModel):
    suite: str
    metric: str
    min_value: float | None = None
    max_regression: float | None = None
    higher_is_better: bool = True
    max_below_base: float | None = None
    """Capability suites (``capability:<name>``) only: how far below the base's reference
    the candidate may fall."""


class GatesBody(BaseModel):
    gates: list[GateBody]


class LimitsBody(BaseModel):
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    max_total_tokens: int | None = None


class TenantBody(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    limits: LimitsBody = LimitsBody()


class KeyBody(BaseModel):
    tenant: str | None = None
    scope: str = "tenant"
    name: str = ""


class BaseBody(BaseModel):
    path: str
    name: str
    revision: str = ""


class DeprecateBody(BaseModel):
    reason: str = ""


# -- scopes: who acts on whose adapters ------------------------------------------------


class LifecycleHooks(Protocol):
    """What the serving side does around alias changes (``app.state.lifecycle_hooks``)."""

    def before_traffic(self, tenant_id: int, adapter: str, number: int) -> None:
        """Called before an alias moves traffic to a version: pre-warm it on the engines."""

    def after_retire(self, lora_name: str) -> None:
        """Called after a version is retired or archived: unload it from the engines."""


class AdapterScope:
    """The tenant whose adapters a request acts on, and the actor for the audit log."""

    def __init__(self, request: Request, registry: Registry, tenant_id: int, actor: Actor) -> None:
        self.registry, self.tenant_id, self.actor = registry, tenant_id, actor
        self.hooks: LifecycleHooks | None = getattr(request.app.state, "lifecycle_hooks", None)

    def before_traffic(self, adapter: str, number: int) -> None:
        if self.hooks is not None:
            self.hooks.before_traffic(self.tenant_id, adapter, number)

    def after_retire(self, version: AdapterVersion) -> None:
        if self.hooks is not None:
            self.hooks.after_retire(version.lora_name)


def _tenant_id(registry: Registry, tenant: str) -> int:
    """The id of the tenant ``tenant`` names (by name or id); NotFound if there is none."""
    row_id = registry.get_tenant(tenant_ref(tenant)).id
    assert row_id is not None  # a stored row always has its primary key
    return row_id


def tenant_scope(
    request: Request, principal: Annotated[Principal, Depends(require_tenant)]
) -> AdapterScope:
    assert principal.tenant_id is not None
    return AdapterScope(request, registry_of(request), principal.tenant_id, principal.actor)


def admin_scope(
    request: Request, tenant: str, principal: Annotated[Principal, Depends(require_admin)]
) -> AdapterScope:
    registry = registry_of(request)
    return AdapterScope(request, registry, _tenant_id(registry, tenant), principal.actor)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"Upload exceeds the {limit}-byte limit; upload only the adapter files.",
        code="upload_too_large",
    )


def bounded_upload(request: Request) -> int:
    """Dependency: refuse an oversized body by its Content-Length before it is parsed."""
    limit = registry_of(request).limits.max_total_bytes
    length = request.headers.get("content-length", "")
    # Multipart framing adds a little; 64 KiB of slack covers field headers.
    if length.isdigit() and int(length) > limit + (64 << 10):
        raise _too_large(limit)
    return limit


def _save_uploads(files: list[UploadFile], tmp: Path, limit: int) -> Path | dict[str, Path]:
    """Uploaded files on disk: one archive as its path, else {client file name: path}."""
    saved: dict[str, Path] = {}
    total = 0
    for index, upload in enumerate(files):
        path = tmp / f"upload-{index}"
        with path.open("wb") as out:
            for chunk in iter(lambda u=upload: u.file.read(1 << 20), b""):  # type: ignore[misc]
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                out.write(chunk)
        saved[upload.filename or f"file-{index}"] = path
    if len(saved) == 1 and next(iter(saved)).lower().endswith(ARCHIVE_SUFFIXES):
        return next(iter(saved.values()))
    return saved


def _adapter_routes(prefix: str, scope_dep: Callable[..., AdapterScope]) -> APIRouter:
    """Adapter routes on ``prefix``, acting for the tenant ``scope_dep`` resolves."""
    adapter_routes = APIRouter(prefix=prefix)
    Acting = Annotated[AdapterScope, Depends(scope_dep)]

    @adapter_routes.get("", summary="List adapters, or search versions by tag and alias")
    def list_adapters(
        scope: Acting,
        tag: Annotated[list[str] | None, Query(description="k=v or k; all must hold")] = None,
        alias: Annotated[list[str] | None, Query(description="an alias the version has")] = None,
    ) -> dict[str, Any]:
        if tag or alias:
            return search_listing(scope, tag or [], alias or [], version_json)
        adapters = scope.registry.list_adapters(scope.tenant_id)
        return _listing([adapter_json(scope.registry, scope.tenant_id, a) for a in adapters])

    @adapter_routes.post(
        "", status_code=201, summary="Upload an adapter version (files or one archive)"
    )
    def push(
        scope: Acting,
        limit: Annotated[int, Depends(bounded_upload)],
        files: Annotated[list[UploadFile], File(description="PEFT files, or one tar/zip")],
        name: Annotated[str, Form(min_length=1, max_length=128)],
        base: Annotated[str, Form(description="base name, name@revision or fingerprint")],
        description: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        with _tempdir() as tmp, _corrupt_archive_is_422():
            source = _save_uploads(files, tmp, limit)
            version = scope.registry.push_adapter(
                scope.tenant_id, name, source, base, scope.actor, description=description
            )
        return version_json(version)

    @adapter_routes.get("/{name}", summary="Show an adapter")
    def show(scope: Acting, name: str) -> dict[str, Any]:
        adapter = scope.registry.get_adapter(scope.tenant_id, name)
        if adapter is None:
            raise NotFound(f"adapter {name!r} does not exist; list your adapters")
        body = adapter_json(scope.registry, scope.tenant_id, adapter)
        versions = scope.registry.list_versions(scope.tenant_id, name)
        return {**body, "versions": [version_json(v) for v in versions]}

    _add_lifecycle_routes(adapter_routes, scope_dep)
    _add_quality_routes(adapter_routes, scope_dep)
    _add_eval_history_routes(adapter_routes, scope_dep)
    add_shadow_routes(adapter_routes, scope_dep)
    add_alias_routes(adapter_routes, scope_dep)
    add_composition_routes(adapter_routes, scope_dep, version_json)
    return adapter_routes


def _add_lifecycle_routes(
    adapter_routes: APIRouter, scope_dep: Callable[..., AdapterScope]
) -> None:
    """Versions and the aliases that send traffic to them: promote, canary, rollback, retire."""
    Acting = Annotated[AdapterScope, Depends(scope_dep)]

    @adapter_routes.get("/{name}/versions", summary="List versions")
    def versions(scope: Acting, name: str) -> dict[str, Any]:
        found = scope.registry.list_versions(scope.tenant_id, name)
        return _listing([version_json(v) for v in found])

    @adapter_routes.post("/{name}/promote", summary="Point production at a version (gates apply)")
    def promote(scope: Acting, name: str, body: PromoteBody) -> dict[str, Any]:
        scope.before_traffic(name, body.version)
        version = scope.registry.promote(
            scope.tenant_id, name, body.version, scope.actor, override=body.override
        )
        return version_json(version)

    @adapter_routes.post("/{name}/canary", summary="Send a share of traffic to a version")
    def canary(scope: Acting, name: str, body: CanaryBody) -> dict[str, Any]:
        scope.before_traffic(name, body.version)
        version = scope.registry.canary(
            scope.tenant_id, name, body.version, body.weight, scope.actor
        )
        return version_json(version)

    @adapter_routes.delete("/{name}/canary", status_code=204, summary="Remove the canary alias")
    def clear_canary(scope: Acting, name: str) -> None:
        scope.registry.clear_canary(scope.tenant_id, name, scope.actor)

    @adapter_routes.post("/{name}/rollback", summary="Restore the previous production version")
    def rollback(scope: Acting, name: str) -> dict[str, Any]:
        return version_json(scope.registry.rollback(scope.tenant_id, name, scope.actor))

    @adapter_routes.post("/{name}/versions/{number}/retire", summary="Retire a version (for good)")
    def retire(scope: Acting, name: str, number: int) -> dict[str, Any]:
        version = scope.registry.retire(scope.tenant_id, name, number, scope.actor)
        scope.after_retire(version)
        return version_json(version)

    @adapter_routes.post(
        "/{name}/versions/{number}/archive", summary="Archive a version (not served)"
    )
    def archive(scope: Acting, name: str, number: int) -> dict[str, Any]:
        version = scope.registry.archive(scope.tenant_id, name, number, scope.actor)
        scope.after_retire(version)
        return version_json(version)


def _add_quality_routes(adapter_routes: APIRouter, scope_dep: Callable[..., AdapterScope]) -> None:
    """Eval results of versions, and the promotion gates they must pass."""
    Acting = Annotated[AdapterScope, Depends(scope_dep)]

    @adapter_routes.post(
        "/{name}/versions/{number}/evals", status_code=201, summary="Add an eval result"
    )
    def add_eval(scope: Acting, name: str, number: int, body: EvalBody) -> dict[str, Any]:
        result = scope.registry.add_eval_result(
            scope.tenant_id,
            name,
            number,
            body.suite,
            body.metric,
            body.value,
            scope.actor,
            sample_count=body.sample_count,
            dataset_sha256=body.dataset_sha256,
        )
        return {"object": "eval_result", **result.model_dump(mode="json")}

    @adapter_routes.get("/{name}/versions/{number}/evals", summary="List eval results")
    def evals(scope: Acting, name: str, number: int) -> dict[str, Any]:
        found = scope.registry.eval_results(scope.tenant_id, name, number)
        return _listing([{"object": "eval_result", **r.model_dump(mode="json")} for r in found])

    @adapter_routes.put("/{name}/gates", summary="Replace the promotion gates")
    def set_gates(scope: Acting, name: str, body: GatesBody) -> dict[str, Any]:
        gates = [Gate(**g.model_dump()) for g in body.gates]
        scope.registry.set_gates(scope.tenant_id, name, gates, scope.actor)
        return _listing([asdict(g) for g in gates])

    @adapter_routes.get("/{name}/gates", summary="Show the promotion gates")
    def get_gates(scope: Acting, name: str) -> dict[str, Any]:
        gates = scope.registry.get_gates(scope.tenant_id, name)
        return _listing([asdict(g) for g in gates])


UnixTime = Annotated[int | None, Query(ge=0, le=253402300799)]
"""Unix seconds, up to 9999-12-31 (later ones do not fit a datetime)."""


def _add_eval_history_routes(
    adapter_routes: APIRouter, scope_dep: Callable[..., AdapterScope]
) -> None:
    """Eval results over versions, and online metrics recorded on demand."""
    Acting = Annotated[AdapterScope, Depends(scope_dep)]

    @adapter_routes.get("/{name}/evals", summary="Latest eval results of every version")
    def eval_table(scope: Acting, name: str) -> dict[str, Any]:
        history = eval_history(scope.registry, scope.tenant_id, name)
        return _listing([v.to_json() for v in history])

    @adapter_routes.post(
        "/{name}/versions/{number}/evals/online",
        summary="Record a version's online metrics (feedback, errors, latency) now",
    )
    def record_online(
        scope: Acting, name: str, number: int, since: UnixTime = None
    ) -> dict[str, Any]:
        start = dt.datetime.fromtimestamp(since, dt.UTC) if since is not None else None
        measured = record_online_metrics(
            scope.registry, scope.tenant_id, name, number, scope.actor, since=start
        )
        return measured.to_json()


CORRUPT_ARCHIVE = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError)
"""What a truncated or corrupt zip/tar raises part-way through reading it."""


@contextlib.contextmanager
def _corrupt_archive_is_422() -> Iterator[None]:
    """A damaged archive is the client's upload problem (422), not a server error."""
    try:
        yield
    except CORRUPT_ARCHIVE as exc:
        raise APIError(
            422,
            f"The uploaded archive is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "create it again and re-upload, or upload the adapter files themselves.",
            code="adapter_rejected",
            param="files",
        ) from exc


@contextlib.contextmanager
def _tempdir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-api-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


AdminPrincipal = Annotated[Principal, Depends(require_admin)]
admin_routes = APIRouter(prefix="/admin")


def _tenant_filter(registry: Registry, tenant: str | None) -> int | None:
    """The tenant id a listing is narrowed to; None (no narrowing) for no or an empty name."""
    return _tenant_id(registry, tenant) if tenant else None


@admin_routes.post("/tenants", status_code=201, summary="Create a tenant")
def create_tenant(request: Request, body: TenantBody, principal: AdminPrincipal) -> dict[str, Any]:
    limits = TenantLimits(**body.limits.model_dump())
    return tenant_json(registry_of(request).create_tenant(body.name, principal.actor, limits))


@admin_routes.get("/tenants", summary="List tenants")
def list_tenants(request: Request, _: AdminPrincipal) -> dict[str, Any]:
    return _listing([tenant_json(t) for t in registry_of(request).list_tenants()])


@admin_routes.get("/tenants/{tenant}", summary="Show a tenant")
def show_tenant(request: Request, tenant: str, _: AdminPrincipal) -> dict[str, Any]:
    return tenant_json(registry_of(request).get_tenant(tenant_ref(tenant)))


@admin_routes.put("/tenants/{tenant}/limits", summary="Set a tenant's limits (null: unlimited)")
def set_limits(
    request: Request, tenant: str, body: LimitsBody, principal: AdminPrincipal
) -> dict[str, Any]:
    limits = TenantLimits(**body.model_dump())
    row = registry_of(request).set_tenant_limits(tenant_ref(tenant), limits, principal.actor)
    return tenant_json(row)


@admin_routes.post(
    "/keys", status_code=201, summary="Create an API key (the key is shown only here)"
)
def create_key(request: Request, body: KeyBody, principal: AdminPrincipal) -> dict[str, Any]:
    registry = registry_of(request)
    tenant_id = _tenant_id(registry, body.tenant) if body.tenant is not None else None
    record, plaintext = registry.create_api_key(
        tenant_id, body.scope, principal.actor, name=body.name
    )
    return {**key_json(record), "key": plaintext}


@admin_routes.get("/keys", summary="List API keys")
def list_keys(request: Request, _: AdminPrincipal, tenant: str | None = None) -> dict[str, Any]:
    registry = registry_of(request)
    keys = registry.list_api_keys(_tenant_filter(registry, tenant))
    return _listing([key_json(k) for k in keys])


@admin_routes.post("/keys/{key_id}/revoke", summary="Revoke an API key")
def revoke_key(request: Request, key_id: int, principal: AdminPrincipal) -> dict[str, Any]:
    return key_json(registry_of(request).revoke_api_key(key_id, principal.actor))


@admin_routes.post(
    "/bases", status_code=201, summary="Register a base model from a server-side path"
)
def register_base(request: Request, body: BaseBody, principal: AdminPrincipal) -> dict[str, Any]:
    path = Path(body.path)
    if not (path / "config.json").is_file():
        raise APIError(
            400, f"{body.path} is not a Hugging Face model directory on the server", param="path"
        )
    registry = registry_of(request)
    return base_json(registry.register_base(path, body.name, body.revision, principal.actor))


@admin_routes.get("/bases", summary="List base models")
def list_bases(request: Request, _: AdminPrincipal) -> dict[str, Any]:
    return _listing([base_json(b) for b in registry_of(request).list_bases()])


@admin_routes.post("/bases/{ref}/deprecate", summary="Deprecate a base; flags every pinned version")
def deprecate_base(
    request: Request, ref: str, body: DeprecateBody, principal: AdminPrincipal
) -> dict[str, Any]:
    registry = registry_of(request)
    flagged = registry.deprecate_base(ref, body.reason, principal.actor)
    return {**base_json(registry.get_base(ref)), "flagged_versions": flagged}


@admin_routes.get("/audit", summary="The audit log, oldest first")
def audit_log(
    request: Request,
    _: AdminPrincipal,
    tenant: str | None = None,
    action: str | None = None,
    limit: int = 1000,
) -> dict[str, Any]:
    registry = registry_of(request)
    tenant_id = _tenant_filter(registry, tenant)
    events = registry.audit_log(tenant_id=tenant_id, action=action, limit=limit)
    return _listing([audit_json(e) for e in events])


routes.include_router(_adapter_routes("/v1/adapters", tenant_scope))
routes.include_router(_adapter_routes("/admin/tenants/{tenant}/adapters", admin_scope))
routes.include_router(admin_routes)
