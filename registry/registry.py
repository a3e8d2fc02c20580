"""The registry facade: the one object the gateway, CLI, resolver and trainer talk to."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from registry import audit, lifecycle
from registry.adapter_names import check_adapter_name
from registry.archive import UploadSource, stage_upload
from registry.bases import BasesMixin
from registry.blobs import BlobStore, Progress
from registry.bundle import build_bundle
from registry.db import migrate, open_database
from registry.errors import AdapterRejected, Conflict, GateFailed, PermissionDenied
from registry.gates import Gate, gate_failures
from registry.limits import UploadLimits
from registry.lora_names import lora_name
from registry.models import (
    ARCHIVED,
    PRODUCTION,
    RETIRED,
    Adapter,
    AdapterVersion,
    AuditEvent,
    BaseModelRecord,
    EvalResult,
    PromotionGate,
    Tenant,
)
from registry.routed_models import refuse_routed_model_name
from registry.serving import ServingMixin
from registry.store import unknown_adapter
from registry.tenancy import TenancyMixin
from registry.validation import ValidatedAdapter, validate_adapter
from registry.values import Actor, AliasTarget, Provenance


@dataclass(frozen=True)
class StagedVersion:
    """An upload validated against its base and its blob stored, to become a version of
    adapter ``name`` (``push_in``); its ``columns`` hold at least its fingerprint, and
    ``existing`` is the version already holding these weights, if one does."""

    tenant_id: int
    name: str
    columns: dict[str, Any]
    existing: AdapterVersion | None = None


@dataclass(frozen=True)
class Score:
    """What one eval result records: a metric's value in a suite, and how many examples,
    with what SHA-256, it was measured on."""

    suite: str
    metric: str
    value: float
    sample_count: int | None = None
    dataset_sha256: str | None = None


GATE_FAILED = "adapter.gate_failed"
"""The audit action of a promote the gates refused (``Registry.promote``)."""


class Registry(TenancyMixin, BasesMixin, ServingMixin):
    """Adapters, versions, bases, tenants, keys, lifecycle and audit, on SQL + a blob store."""

    def __init__(
        self,
        database_url: str,
        blobs: BlobStore,
        limits: UploadLimits | None = None,
        *,
        auto_migrate: bool = True,
    ) -> None:
        self.database: Engine = open_database(database_url)
        self.blobs = blobs
        self.limits = limits or UploadLimits()
        if auto_migrate:
            self.migrate()

    def migrate(self) -> None:
        """Create or upgrade the schema (``alembic upgrade head``)."""
        migrate(self.database)

    def close(self) -> None:
        self.database.dispose()

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

        ``progress(sent, total)`` is called while the blob goes to the blob store. Names
        that no request can address, or that lie in the LoRA namespace, are refused
        (``InvalidRequest``) before anything is uploaded.
        """
        staged = self.stage_adapter(tenant_id, name, source, base, progress)
        if staged.existing is not None:
            return staged.existing

        def push() -> AdapterVersion:
            with self._write() as s:
                return self.push_in(s, staged, actor, provenance, description)

        return self._retrying(push)

    def stage_adapter(
        self,
        tenant_id: int,
        name: str,
        source: UploadSource,
        base: str,
        progress: Progress | None = None,
    ) -> StagedVersion:
        """Validate an upload and store its blob, registering nothing yet (see ``push_in``).

        Staging the same weights again finds the blob stored (a no-op), so a caller
        killed between staging and registering loses nothing by staging again.
        """
        check_adapter_name(name)
        self.get_tenant(tenant_id)
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            pinned, adapter = self._stage_and_validate(Path(tmp), source, base)
            with self._read() as s:
                same = self._version_by_fingerprint(s, tenant_id, name, adapter.fingerprint)
            if same is not None:
                existing = self._existing(same, pinned)
                return StagedVersion(tenant_id, name, {"fingerprint": same.fingerprint}, existing)
            key = f"adapters/{adapter.fingerprint}.tar"
            sha256, size = build_bundle(adapter, Path(tmp) / "bundle.tar")
            self.blobs.put(key, Path(tmp) / "bundle.tar", progress)
        columns = dict(
            fingerprint=adapter.fingerprint,
            lora_name=lora_name(adapter.fingerprint),
            base_id=pinned.id,
            rank=adapter.rank,
            alpha=adapter.alpha,
            target_modules=adapter.target_modules,
            size_bytes=size,
            blob_sha256=sha256,
            blob_key=key,
        )
        return StagedVersion(tenant_id, name, columns)

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

    def push_in(
        self,
        s: Session,
        staged: StagedVersion,
        actor: Actor,
        provenance: Provenance | None = None,
        description: str | None = None,
    ) -> AdapterVersion:
        """Register a staged upload as the adapter's next version in the caller's write
        transaction (locking the adapter's row); the version already holding these
        weights if there is one. A concurrent push of the same weights can make the
        transaction fail with ``IntegrityError``: run it again (``Store._retrying``)."""
        tenant_id, name = staged.tenant_id, staged.name
        refuse_routed_model_name(s, tenant_id, name)  # one model name, one thing
        adapter = self._adapter(s, tenant_id, name, lock=True, create=True)
        same = self._version_by_fingerprint(s, tenant_id, name, staged.columns["fingerprint"])
        if same is not None:
            return same
        assert staged.existing is None, "a registered version is never deleted"
        if description is not None and description != adapter.description:
            adapter.description = description
            s.add(adapter)
        last = s.exec(
            select(func.max(AdapterVersion.number)).where(AdapterVersion.adapter_id == adapter.id)
        ).one()
        version = AdapterVersion(
            adapter_id=adapter.id or 0,
            number=(last or 0) + 1,
            created_by=actor.name,
            **staged.columns,
        )
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
        version.composition = provenance.composition
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
            raise unknown_adapter(name)
        return adapter

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
            raise unknown_adapter(name)
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
        score = Score(suite, metric, value, sample_count, dataset_sha256)
        with self._write() as s:
            version = self._version(s, self._adapter(s, tenant_id, name), number)
            return self.add_eval_result_in(s, version, score, actor)

    def add_eval_result_in(
        self, s: Session, version: AdapterVersion, score: Score, actor: Actor
    ) -> EvalResult:
        """Record an eval result of ``version`` in the caller's write transaction."""
        adapter = s.get(Adapter, version.adapter_id)
        assert adapter is not None  # a version's adapter is never deleted
        result = EvalResult(version_id=version.id or 0, created_by=actor.name, **asdict(score))
        s.add(result)
        after = {"suite": score.suite, "metric": score.metric, "value": score.value}
        audit.record(
            s,
            actor.name,
            "adapter.eval",
            self._subject(s, adapter, version.number),
            tenant_id=adapter.tenant_id,
            after=after,
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
        self, tenant_id: int, name: str, actor: Actor, number: int | None = None
    ) -> Iterator[tuple[Session, Adapter, lifecycle.Change]]:
        """The adapter's row, locked, and the change the audit log records (of ``number``)."""
        with self._write() as s:
            adapter = self._adapter(s, tenant_id, name, lock=True)
            subject = self._subject(s, adapter, number)
            yield s, adapter, lifecycle.Change(actor.name, subject, tenant_id)

    def promote(
        self, tenant_id: int, name: str, number: int, actor: Actor, override: bool = False
    ) -> AdapterVersion:
        """Point ``production`` at a version; gates must pass unless an admin overrides.
        A refusal by the gates is recorded (``adapter.gate_failed``, a public event) in a
        transaction of its own, as the refused change itself writes nothing."""
        try:
            with self._write() as s:
                adapter = self._adapter(s, tenant_id, name, lock=True)
                version = self._version(s, adapter, number)
                self.promote_in(s, adapter, version, actor, override)
        except GateFailed as refused:
            with self._write() as s:
                adapter = self._adapter(s, tenant_id, name)
                after = {"version": number, "failed_gates": refused.failures}
                subject = self._subject(s, adapter, number)
                audit.record(s, actor.name, GATE_FAILED, subject, tenant_id=tenant_id, after=after)
            raise
        return version

    def promote_in(
        self,
        s: Session,
        adapter: Adapter,
        version: AdapterVersion,
        actor: Actor,
        override: bool = False,
    ) -> None:
        """``promote`` in the caller's write transaction, which holds the adapter's row
        lock; ``GateFailed`` and ``PermissionDenied`` come before anything is written."""
        failures = self._gate_failures(s, adapter, version)
        if failures and not override:
            raise GateFailed(failures)
        if failures and not actor.admin:
            raise PermissionDenied("only admins may override promotion gates")
        extra = {"override": True, "failed_gates": failures} if failures else None
        change = lifecycle.Change(actor.name, self._subject(s, adapter), adapter.tenant_id)
        lifecycle.promote(s, adapter, version, change, extra)

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

    def set_shadow(
        self, tenant_id: int, name: str, number: int, share: float, actor: Actor
    ) -> AdapterVersion:
        """Copy ``share`` (0 < share <= 1) of production's requests to version ``number``
        (answers compared, never returned: ``registry.shadow``)."""
        with self._locked(tenant_id, name, actor) as (s, adapter, change):
            version = self._version(s, adapter, number)
            lifecycle.shadow(s, adapter, version, share, change)
        return version

    def clear_shadow(self, tenant_id: int, name: str, actor: Actor) -> None:
        with self._locked(tenant_id, name, actor) as (s, adapter, change):
            lifecycle.clear_shadow(s, adapter, change)

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
        with self._locked(tenant_id, name, actor, number) as (s, adapter, change):
            version = self._version(s, adapter, number)
            lifecycle.set_state(s, adapter, version, state, change)
        return version

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


def _version_summary(version: AdapterVersion) -> dict[str, Any]:
    return {
        "version": version.number,
        "fingerprint": version.fingerprint,
        "lora_name": version.lora_name,
        "base_id": version.base_id,
        "rank": version.rank,
        "size_bytes": version.size_bytes,
    }
