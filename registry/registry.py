"""The registry facade: the one object the gateway, CLI, resolver and trainer talk to."""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from registry import audit, lifecycle
from registry.archive import UploadSource, stage_upload
from registry.blobs import BlobStore, Progress
from registry.bundle import build_bundle, unpack_bundle
from registry.db import WRITE_OPTION, make_engine, migrate
from registry.errors import (
    AdapterRejected,
    Conflict,
    GateFailed,
    InvalidLimits,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from registry.fingerprint import engine_name, fingerprint_base
from registry.gates import Gate, gate_failures
from registry.keys import display_prefix, key_sha256, new_key
from registry.limits import UploadLimits
from registry.models import (
    ACTIVE,
    ADMIN_SCOPE,
    ARCHIVED,
    PRODUCTION,
    RETIRED,
    TENANT_SCOPE,
    Adapter,
    AdapterVersion,
    ApiKey,
    AuditEvent,
    BaseModelRecord,
    EvalResult,
    PromotionGate,
    Tenant,
    Usage,
    utcnow,
)
from registry.validation import ValidatedAdapter, validate_adapter
from registry.values import (
    Actor,
    AliasTarget,
    Principal,
    Provenance,
    RoutingView,
    TenantLimits,
    VersionBlob,
)


def _unknown_adapter(name: str) -> NotFound:
    # Same words for foreign and unknown names: tenants must not learn what others own.
    return NotFound(f"adapter {name!r} does not exist; list your adapters to see the names")


class Registry:
    """Adapters, versions, bases, tenants, keys, lifecycle and audit, on SQL + a blob store."""

    def __init__(
        self,
        database_url: str,
        blobs: BlobStore,
        limits: UploadLimits | None = None,
        *,
        auto_migrate: bool = True,
    ) -> None:
        self.engine: Engine = make_engine(database_url)
        self.blobs = blobs
        self.limits = limits or UploadLimits()
        if auto_migrate:
            self.migrate()

    def migrate(self) -> None:
        """Create or upgrade the schema (``alembic upgrade head``)."""
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- sessions ---------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on any error."""
        engine = self.engine.execution_options(**{WRITE_OPTION: True})
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    # -- tenants ----------------------------------------------------------

    def create_tenant(self, name: str, actor: Actor, limits: TenantLimits | None = None) -> Tenant:
        _check_limits(limits or TenantLimits())
        tenant = Tenant(name=name, **asdict(limits or TenantLimits()))
        try:
            with self._write() as s:
                s.add(tenant)
                s.flush()
                audit.record(
                    s,
                    actor.name,
                    "tenant.create",
                    f"tenant:{name}",
                    tenant_id=tenant.id,
                    after=tenant.model_dump(mode="json"),
                )
        except IntegrityError:
            raise Conflict(f"tenant {name!r} already exists; pick another name") from None
        return tenant

    def get_tenant(self, tenant: int | str) -> Tenant:
        with self._read() as s:
            return self._tenant(s, tenant)

    def list_tenants(self) -> list[Tenant]:
        with self._read() as s:
            return list(s.exec(select(Tenant).order_by(col(Tenant.id))).all())

    def set_tenant_limits(self, tenant: int | str, limits: TenantLimits, actor: Actor) -> Tenant:
        _check_limits(limits)
        with self._write() as s:
            row = self._tenant(s, tenant, lock=True)
            before = _limits_of(row)
            for key, value in asdict(limits).items():
                setattr(row, key, value)
            s.add(row)
            audit.record(
                s,
                actor.name,
                "tenant.limits",
                f"tenant:{row.name}",
                tenant_id=row.id,
                before=before,
                after=asdict(limits),
            )
        return row

    def tenant_limits(self, tenant: int | str) -> TenantLimits:
        return TenantLimits(**_limits_of(self.get_tenant(tenant)))

    def _tenant(self, s: Session, tenant: int | str, lock: bool = False) -> Tenant:
        column = Tenant.id if isinstance(tenant, int) else Tenant.name
        query = select(Tenant).where(column == tenant)
        row = s.exec(query.with_for_update() if lock else query).first()
        if row is None:
            raise NotFound(f"tenant {tenant!r} does not exist; create it first")
        return row

    # -- API keys ---------------------------------------------------------

    def create_api_key(
        self, tenant_id: int | None, scope: str, actor: Actor, name: str = ""
    ) -> tuple[ApiKey, str]:
        """A new key; returns the record and the plaintext, which is shown only now."""
        if scope not in (TENANT_SCOPE, ADMIN_SCOPE):
            raise InvalidRequest(f"scope {scope!r} is unknown; use 'tenant' or 'admin'")
        if (scope == TENANT_SCOPE) != (tenant_id is not None):
            raise InvalidRequest("tenant keys need a tenant; admin keys must have none")
        plaintext = new_key()
        record = ApiKey(
            key_sha256=key_sha256(plaintext),
            prefix=display_prefix(plaintext),
            scope=scope,
            tenant_id=tenant_id,
            name=name,
        )
        with self._write() as s:
            if tenant_id is not None:
                self._tenant(s, tenant_id)
            s.add(record)
            s.flush()
            audit.record(
                s,
                actor.name,
                "key.create",
                f"key:{record.id}",
                tenant_id=tenant_id,
                after={"scope": scope, "prefix": record.prefix, "name": name},
            )
        return record, plaintext

    def revoke_api_key(self, key_id: int, actor: Actor) -> ApiKey:
        with self._write() as s:
            record = s.get(ApiKey, key_id, with_for_update=True)
            if record is None:
                raise NotFound(f"API key {key_id} does not exist; list keys to see their ids")
            if record.revoked_at is None:
                record.revoked_at = utcnow()
                s.add(record)
                audit.record(
                    s, actor.name, "key.revoke", f"key:{key_id}", tenant_id=record.tenant_id
                )
        return record

    def list_api_keys(self, tenant_id: int | None = None) -> list[ApiKey]:
        with self._read() as s:
            query = select(ApiKey).order_by(col(ApiKey.id))
            if tenant_id is not None:
                query = query.where(ApiKey.tenant_id == tenant_id)
            return list(s.exec(query).all())

    def authenticate(self, plaintext: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for anything else."""
        digest = key_sha256(plaintext)
        with self._read() as s:
            record = s.exec(select(ApiKey).where(ApiKey.key_sha256 == digest)).first()
        if record is None or not hmac.compare_digest(record.key_sha256, digest):
            return None
        if record.revoked_at is not None:
            return None
        assert record.id is not None
        return Principal(record.tenant_id, record.scope, record.id)

    # -- base models ------------------------------------------------------

    def register_base(
        self, path: Path | str, name: str, revision: str, actor: Actor
    ) -> BaseModelRecord:
        """Fingerprint a Hugging Face model directory and record it; idempotent."""
        info = fingerprint_base(Path(path))
        with self._write() as s:
            existing = s.exec(
                select(BaseModelRecord).where(BaseModelRecord.fingerprint == info.fingerprint)
            ).first()
            if existing is not None:
                if (existing.name, existing.revision) != (name, revision):
                    raise Conflict(
                        f"these weights are already registered as base "
                        f"{existing.name!r} revision {existing.revision!r}"
                    )
                return existing
            base = BaseModelRecord(
                name=name,
                revision=revision,
                fingerprint=info.fingerprint,
                architecture=info.architecture,
                module_table=info.module_table,
            )
            s.add(base)
            try:
                s.flush()
            except IntegrityError:
                raise Conflict(
                    f"base {name!r} revision {revision!r} is already registered "
                    "with other weights; use a new revision"
                ) from None
            audit.record(
                s,
                actor.name,
                "base.register",
                f"base:{name}@{revision}",
                after={"fingerprint": info.fingerprint, "architecture": info.architecture},
            )
        return base

    def list_bases(self) -> list[BaseModelRecord]:
        with self._read() as s:
            return list(s.exec(select(BaseModelRecord).order_by(col(BaseModelRecord.id))).all())

    def get_base(self, ref: str) -> BaseModelRecord:
        with self._read() as s:
            return self._base(s, ref)

    def find_base(self, ref: str) -> BaseModelRecord | None:
        """The base matching ``ref``: a fingerprint, ``name@revision``, a revision or a name."""
        try:
            return self.get_base(ref)
        except NotFound:
            return None

    def _base(self, s: Session, ref: str) -> BaseModelRecord:
        bases = s.exec(select(BaseModelRecord).order_by(col(BaseModelRecord.id))).all()
        matches = [b for b in bases if ref == b.fingerprint] or [
            b for b in bases if ref in (f"{b.name}@{b.revision}", b.name, b.revision)
        ]
        if not matches:
            raise NotFound(
                f"base {ref!r} names no registered base model (by name, revision or "
                "fingerprint); list bases or register it first"
            )
        if len(matches) > 1:
            names = ", ".join(f"{b.name}@{b.revision}" for b in matches)
            raise Conflict(
                f"base {ref!r} is ambiguous ({names}); pin it as name@revision or by fingerprint"
            )
        return matches[0]

    def deprecate_base(self, ref: str, reason: str, actor: Actor) -> int:
        """Mark a base deprecated and flag every version pinned to it; returns that count."""
        with self._write() as s:
            base = self._base(s, ref)
            base = s.get(BaseModelRecord, base.id, with_for_update=True) or base
            versions = s.exec(
                select(AdapterVersion).where(AdapterVersion.base_id == base.id).with_for_update()
            ).all()
            for version in versions:
                version.base_deprecated = True
                s.add(version)
            base.deprecated_at, base.deprecation_reason = utcnow(), reason
            s.add(base)
            audit.record(
                s,
                actor.name,
                "base.deprecate",
                f"base:{base.name}@{base.revision}",
                after={"reason": reason, "flagged_versions": len(versions)},
            )
        return len(versions)

    # -- adapters and versions ---------------------------------------------

    def push_adapter(
        self,
        tenant_id: int,
        name: str,
        source: UploadSource,
        base: str,
        actor: Actor,
        provenance: Provenance | None = None,
        description: str | None = None,
        progress: Progress | None = None,
    ) -> AdapterVersion:
        """Validate and store an upload as the adapter's next version (idempotent per content).

        ``progress(sent, total)`` is called while the blob goes to the blob store.
        """
        self.get_tenant(tenant_id)
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            pinned, adapter = self._stage_and_validate(Path(tmp), source, base)
            with self._read() as s:
                same = self._version_by_fingerprint(s, tenant_id, name, adapter.fingerprint)
            if same is not None:
                return self._existing(same, pinned)
            key = f"adapters/{adapter.fingerprint}.tar"
            sha256, size = build_bundle(adapter, Path(tmp) / "bundle.tar")
            self.blobs.put(key, Path(tmp) / "bundle.tar", progress)
        version = dict(
            fingerprint=adapter.fingerprint,
            engine_name=engine_name(adapter.fingerprint),
            base_id=pinned.id,
            rank=adapter.rank,
            alpha=adapter.alpha,
            target_modules=adapter.target_modules,
            size_bytes=size,
            blob_sha256=sha256,
            blob_key=key,
            created_by=actor.name,
        )
        return self._insert_version(tenant_id, name, version, provenance, description, actor)

    def _stage_and_validate(
        self, tmp: Path, source: UploadSource, base: str
    ) -> tuple[BaseModelRecord, ValidatedAdapter]:
        problems: list[str] = []
        pinned = self.find_base(base)
        if pinned is None:
            problems.append(
                f"base {base!r} names no registered base model (by name, revision "
                "or fingerprint); list bases and pin one of them"
            )
        elif pinned.deprecated_at is not None:
            problems.append(
                f"base {base!r} is deprecated ({pinned.deprecation_reason}); train on its successor"
            )
        try:
            staged = stage_upload(source, self.limits, tmp / "staged")
        except AdapterRejected as exc:
            raise AdapterRejected(problems + exc.problems) from None
        if pinned is None or problems:
            raise AdapterRejected(problems)
        return pinned, validate_adapter(staged, pinned.module_table, self.limits)

    def _existing(self, version: AdapterVersion, pinned: BaseModelRecord) -> AdapterVersion:
        if version.base_id != pinned.id:
            raise Conflict(
                f"version {version.number} already holds these exact weights pinned "
                "to another base; push them as a new adapter"
            )
        return version

    def _version_by_fingerprint(
        self, s: Session, tenant_id: int, name: str, fingerprint: str
    ) -> AdapterVersion | None:
        return s.exec(
            select(AdapterVersion)
            .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
            .where(Adapter.tenant_id == tenant_id, Adapter.name == name)
            .where(AdapterVersion.fingerprint == fingerprint)
        ).first()

    def _insert_version(
        self,
        tenant_id: int,
        name: str,
        version: dict[str, Any],
        provenance: Provenance | None,
        description: str | None,
        actor: Actor,
    ) -> AdapterVersion:
        retries = 2
        while True:
            try:
                return self._insert_version_once(
                    tenant_id, name, version, provenance, description, actor
                )
            except IntegrityError:
                # A concurrent push created the adapter or this very version first; the
                # next attempt finds it (and returns the version if it is this one).
                if retries == 0:
                    raise
                retries -= 1

    def _insert_version_once(
        self,
        tenant_id: int,
        name: str,
        fields: dict[str, Any],
        provenance: Provenance | None,
        description: str | None,
        actor: Actor,
    ) -> AdapterVersion:
        with self._write() as s:
            adapter = self._adapter(s, tenant_id, name, lock=True, create=True)
            same = self._version_by_fingerprint(s, tenant_id, name, fields["fingerprint"])
            if same is not None:
                return same
            if description is not None and description != adapter.description:
                adapter.description = description
                s.add(adapter)
            last = s.exec(
                select(func.max(AdapterVersion.number)).where(
                    AdapterVersion.adapter_id == adapter.id
                )
            ).one()
            version = AdapterVersion(adapter_id=adapter.id or 0, number=(last or 0) + 1, **fields)
            self._apply_provenance(s, adapter, version, provenance)
            s.add(version)
            s.flush()
            audit.record(
                s,
                actor.name,
                "adapter.push",
                self._subject(s, adapter, version.number),
                tenant_id=tenant_id,
                after=_version_summary(version),
            )
        return version

    def _apply_provenance(
        self, s: Session, adapter: Adapter, version: AdapterVersion, provenance: Provenance | None
    ) -> None:
        if provenance is None:
            return
        version.dataset_sha256 = provenance.dataset_sha256
        version.training_config_sha256 = provenance.training_config_sha256
        version.seed = provenance.seed
        version.library_versions = dict(provenance.library_versions)
        version.training_job = provenance.training_job
        if provenance.parent_version is not None:
            version.parent_version_id = self._version(s, adapter, provenance.parent_version).id

    def _adapter(
        self, s: Session, tenant_id: int, name: str, lock: bool = False, create: bool = False
    ) -> Adapter:
        query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        adapter = s.exec(query.with_for_update() if lock else query).first()
        if adapter is None and create:
            adapter = Adapter(tenant_id=tenant_id, name=name)
            s.add(adapter)
            s.flush()
        if adapter is None:
            raise _unknown_adapter(name)
        return adapter

    def _version(self, s: Session, adapter: Adapter, number: int) -> AdapterVersion:
        version = s.exec(
            select(AdapterVersion).where(
                AdapterVersion.adapter_id == adapter.id, AdapterVersion.number == number
            )
        ).first()
        if version is None:
            raise NotFound(f"adapter {adapter.name!r} has no version {number}; list its versions")
        return version

    def _subject(self, s: Session, adapter: Adapter, number: int | None = None) -> str:
        tenant = s.get(Tenant, adapter.tenant_id)
        owner = tenant.name if tenant else adapter.tenant_id
        return f"adapter:{owner}/{adapter.name}" + (f"@{number}" if number else "")

    def list_adapters(self, tenant_id: int) -> list[Adapter]:
        with self._read() as s:
            query = select(Adapter).where(Adapter.tenant_id == tenant_id)
            return list(s.exec(query.order_by(col(Adapter.name))).all())

    def get_adapter(self, tenant_id: int, name: str) -> Adapter | None:
        """The tenant's adapter, or None (for unknown and foreign names alike)."""
        with self._read() as s:
            query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
            return s.exec(query).first()

    def list_versions(self, tenant_id: int, name: str) -> list[AdapterVersion]:
        with self._read() as s:
            adapter = self._adapter(s, tenant_id, name)
            query = select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id)
            return list(s.exec(query.order_by(col(AdapterVersion.number))).all())

    def get_version(self, tenant_id: int, name: str, number: int) -> AdapterVersion:
        with self._read() as s:
            return self._version(s, self._adapter(s, tenant_id, name), number)

    def aliases(self, tenant_id: int, name: str) -> dict[str, AliasTarget]:
        view = self.routing_view(tenant_id, name)
        if view is None:
            raise _unknown_adapter(name)
        return view.aliases

    # -- evals and gates ---------------------------------------------------

    def add_eval_result(
        self,
        tenant_id: int,
        name: str,
        number: int,
        suite: str,
        metric: str,
        value: float,
        actor: Actor,
        sample_count: int | None = None,
        dataset_sha256: str | None = None,
    ) -> EvalResult:
        with self._write() as s:
            adapter = self._adapter(s, tenant_id, name)
            version = self._version(s, adapter, number)
            result = EvalResult(
                version_id=version.id or 0,
                suite=suite,
                metric=metric,
                value=value,
                sample_count=sample_count,
                dataset_sha256=dataset_sha256,
                created_by=actor.name,
            )
            s.add(result)
            audit.record(
                s,
                actor.name,
                "adapter.eval",
                self._subject(s, adapter, number),
                tenant_id=tenant_id,
                after={"suite": suite, "metric": metric, "value": value},
            )
        return result

    def eval_results(self, tenant_id: int, name: str, number: int) -> list[EvalResult]:
        with self._read() as s:
            version = self._version(s, self._adapter(s, tenant_id, name), number)
            query = select(EvalResult).where(EvalResult.version_id == version.id)
            return list(s.exec(query.order_by(col(EvalResult.id))).all())

    def set_gates(self, tenant_id: int, name: str, gates: list[Gate], actor: Actor) -> None:
        """Replace the adapter's promotion gates (an empty list removes them)."""
        with self._write() as s:
            adapter = self._adapter(s, tenant_id, name, lock=True)
            for row in s.exec(select(PromotionGate).where(PromotionGate.adapter_id == adapter.id)):
                s.delete(row)
            s.flush()
            for gate in gates:
                s.add(PromotionGate(adapter_id=adapter.id or 0, **asdict(gate)))
            audit.record(
                s,
                actor.name,
                "adapter.gates",
                self._subject(s, adapter),
                tenant_id=tenant_id,
                after={"gates": [asdict(g) for g in gates]},
            )

    def get_gates(self, tenant_id: int, name: str) -> list[Gate]:
        with self._read() as s:
            adapter = self._adapter(s, tenant_id, name)
            rows = s.exec(select(PromotionGate).where(PromotionGate.adapter_id == adapter.id))
            return [Gate.from_row(row) for row in rows]

    # -- lifecycle ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(
        self, tenant_id: int, name: str, actor: Actor
    ) -> Iterator[tuple[Session, Adapter, lifecycle.Change]]:
        with self._write() as s:
            adapter = self._adapter(s, tenant_id, name, lock=True)
            yield s, adapter, lifecycle.Change(actor.name, self._subject(s, adapter), tenant_id)

    def promote(
        self, tenant_id: int, name: str, number: int, actor: Actor, override: bool = False
    ) -> AdapterVersion:
        """Point ``production`` at a version; gates must pass unless an admin overrides."""
        with self._locked(tenant_id, name, actor) as (s, adapter, change):
            version = self._version(s, adapter, number)
            failures = self._gate_failures(s, adapter, version)
            if failures and not override:
                raise GateFailed(failures)
            if failures and not actor.admin:
                raise PermissionDenied("only admins may override promotion gates")
            extra = {"override": True, "failed_gates": failures} if failures else None
            lifecycle.promote(s, adapter, version, change, extra)
        return version

    def _gate_failures(self, s: Session, adapter: Adapter, version: AdapterVersion) -> list[str]:
        assert adapter.id is not None and version.id is not None
        rows = s.exec(select(PromotionGate).where(PromotionGate.adapter_id == adapter.id)).all()
        if not rows:
            return []
        current = lifecycle.aliases(s, adapter.id).get(PRODUCTION)
        production = s.get(AdapterVersion, current.version_id) if current else None
        return gate_failures(
            s,
            [Gate.from_row(r) for r in rows],
            version.id,
            version.number,
            production.id if production else None,
            production.number if production else None,
        )

    def canary(
        self, tenant_id: int, name: str, number: int, weight: float, actor: Actor
    ) -> AdapterVersion:
        with self._locked(tenant_id, name, actor) as (s, adapter, change):
            version = self._version(s, adapter, number)
            lifecycle.canary(s, adapter, version, weight, change)
        return version

    def clear_canary(self, tenant_id: int, name: str, actor: Actor) -> None:
        with self._locked(tenant_id, name, actor) as (s, adapter, change):
            lifecycle.clear_canary(s, adapter, change)

    def rollback(self, tenant_id: int, name: str, actor: Actor) -> AdapterVersion:
        """Restore the production target before the latest promote; returns that version."""
        with self._locked(tenant_id, name, actor) as (s, adapter, change):
            alias = lifecycle.rollback(s, adapter, change)
            version = s.get(AdapterVersion, alias.version_id)
        assert version is not None
        return version

    def archive(self, tenant_id: int, name: str, number: int, actor: Actor) -> AdapterVersion:
        return self._set_state(tenant_id, name, number, ARCHIVED, actor)

    def retire(self, tenant_id: int, name: str, number: int, actor: Actor) -> AdapterVersion:
        return self._set_state(tenant_id, name, number, RETIRED, actor)

    def _set_state(
        self, tenant_id: int, name: str, number: int, state: str, actor: Actor
    ) -> AdapterVersion:
        with self._locked(tenant_id, name, actor) as (s, adapter, change):
            version = self._version(s, adapter, number)
            change = lifecycle.Change(actor.name, self._subject(s, adapter, number), tenant_id)
            lifecycle.set_state(s, adapter, version, state, change)
        return version

    # -- serving -----------------------------------------------------------

    def routing_view(self, tenant_id: int, name: str) -> RoutingView | None:
        """Servable versions and aliases of a tenant's adapter; None if it has no such adapter."""
        with self._read() as s:
            query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
            adapter = s.exec(query).first()
            if adapter is None or adapter.id is None:
                return None
            versions = s.exec(
                select(AdapterVersion)
                .where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.state == ACTIVE)
                .order_by(col(AdapterVersion.number))
            ).all()
            by_id = {v.id: v for v in versions}
            aliases = {
                alias.name: AliasTarget(
                    by_id[alias.version_id].number,
                    by_id[alias.version_id].engine_name,
                    alias.weight,
                )
                for alias in lifecycle.aliases(s, adapter.id).values()
                if alias.version_id in by_id
            }
        return RoutingView(adapter.id, tenant_id, adapter.name, list(versions), aliases)

    def version_by_engine_name(self, name: str) -> VersionBlob | None:
        """The active version an engine-side name (``lx-...``) refers to, with its blob and base."""
        with self._read() as s:
            row = s.exec(
                select(AdapterVersion, BaseModelRecord)
                .join(BaseModelRecord, col(BaseModelRecord.id) == AdapterVersion.base_id)
                .where(AdapterVersion.engine_name == name, AdapterVersion.state == ACTIVE)
                .order_by(col(AdapterVersion.id))
            ).first()
        if row is None:
            return None
        version, base = row
        return VersionBlob(version, base, version.blob_key, version.blob_sha256, version.size_bytes)

    def fetch_version(self, name: str, dest_dir: Path | str) -> Path:
        """``dest_dir/<name>/`` holding the verified adapter files (fetched once, then reused)."""
        found = self.version_by_engine_name(name)
        if found is None:
            raise NotFound(f"no active adapter version is named {name!r} on engines")
        dest = Path(dest_dir) / name
        if (dest / "adapter_model.safetensors").is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".tar")
        os.close(fd)
        bundle = Path(tmp_name)
        try:
            self.blobs.fetch(found.blob_key, found.blob_sha256, bundle)
            with contextlib.suppress(OSError):  # a concurrent fetch may have won the rename
                unpack_bundle(bundle, dest, found.blob_key)
        finally:
            bundle.unlink(missing_ok=True)
        if not (dest / "adapter_model.safetensors").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            raise NotFound(f"could not unpack {name!r} into {dest}; check the directory")
        return dest

    # -- usage and audit ---------------------------------------------------

    def record_usage(
        self,
        tenant_id: int,
        adapter: str = "",
        version: int = 0,
        *,
        requests: int = 1,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        day: dt.date | None = None,
    ) -> None:
        """Add to a tenant's daily counters (base-model traffic: adapter "" and version 0)."""
        values = {
            "tenant_id": tenant_id,
            "adapter": adapter,
            "version": version,
            "day": day or utcnow().date(),
            "requests": requests,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }
        insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        table = Usage.__table__  # type: ignore[attr-defined]
        stmt = insert(table).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant_id", "adapter", "version", "day"],
            set_={
                k: table.c[k] + stmt.excluded[k]
                for k in ("requests", "prompt_tokens", "completion_tokens")
            },
        )
        with self._write() as s:
            s.execute(stmt)

    def usage(self, tenant_id: int, since: dt.date | None = None) -> list[Usage]:
        with self._read() as s:
            query = select(Usage).where(Usage.tenant_id == tenant_id)
            if since is not None:
                query = query.where(Usage.day >= since)
            return list(s.exec(query.order_by(col(Usage.day), col(Usage.adapter))).all())

    def audit_log(
        self,
        *,
        tenant_id: int | None = None,
        action: str | None = None,
        subject_prefix: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Audit events, oldest first (the newest ``limit`` of them)."""
        with self._read() as s:
            query = select(AuditEvent)
            if tenant_id is not None:
                query = query.where(AuditEvent.tenant_id == tenant_id)
            if action is not None:
                query = query.where(AuditEvent.action == action)
            if subject_prefix is not None:
                query = query.where(col(AuditEvent.subject).startswith(subject_prefix))
            rows = s.exec(query.order_by(col(AuditEvent.id).desc()).limit(limit)).all()
        return list(reversed(rows))


def _check_limits(limits: TenantLimits) -> None:
    bad = [f.name for f in fields(limits) if (v := getattr(limits, f.name)) is not None and v < 1]
    if bad:
        raise InvalidLimits(
            f"tenant limits {', '.join(bad)} must be at least 1, or unset for unlimited"
        )


def _limits_of(tenant: Tenant) -> dict[str, int | None]:
    return {f.name: getattr(tenant, f.name) for f in fields(TenantLimits)}


def _version_summary(version: AdapterVersion) -> dict[str, Any]:
    return {
        "version": version.number,
        "fingerprint": version.fingerprint,
        "engine_name": version.engine_name,
        "base_id": version.base_id,
        "rank": version.rank,
        "size_bytes": version.size_bytes,
    }
