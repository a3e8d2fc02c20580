"""Base models: registration by fingerprint, lookup by name/revision/fingerprint, deprecation."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from registry import audit
from registry.errors import Conflict, NotFound
from registry.fingerprint import fingerprint_base
from registry.models import AdapterVersion, BaseModelRecord, utcnow
from registry.store import Store
from registry.values import Actor


class BasesMixin(Store):
    """Registered base models."""

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
