"""Tenants, their limits and usage, and API keys."""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import asdict, fields
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from registry import audit, latency
from registry.errors import Conflict, InvalidLimits, InvalidRequest, NotFound
from registry.keys import display_prefix, key_sha256, new_key
from registry.models import ADMIN_SCOPE, TENANT_SCOPE, ApiKey, Tenant, Usage, utcnow
from registry.store import Store
from registry.values import Actor, Principal, TenantLimits


def tenant_ref(value: str) -> int | str:
    """A tenant as typed in a URL or on a command line: an id if ASCII digits, else a name.

    ``str.isdigit()`` alone also accepts digits such as '¹', which ``int()`` refuses.
    """
    return int(value) if value.isascii() and value.isdigit() else value


class TenancyMixin(Store):
    """Tenants, limits, API keys and authentication, usage counters."""

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
        errors: int = 0,
        latency_seconds: float = 0.0,
        latency_count: int = 0,
        latency_buckets: list[int] | None = None,
    ) -> None:
        """Add to a tenant's daily counters (base-model traffic: adapter "" and version 0).

        ``latency_buckets`` (counts per ``registry.latency.BOUNDS`` bucket) are added to
        the stored ones bucket by bucket.
        """
        key = {"tenant_id": tenant_id, "adapter": adapter, "version": version}
        key["day"] = day or utcnow().date()
        sums = {
            "requests": requests,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "errors": errors,
            "latency_seconds": latency_seconds,
            "latency_count": latency_count,
        }
        insert = pg_insert if self.database.dialect.name == "postgresql" else sqlite_insert
        table = Usage.__table__  # type: ignore[attr-defined]
        stmt = insert(table).values(**key, **sums)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key),
            set_={k: table.c[k] + stmt.excluded[k] for k in sums},
        )
        with self._write() as s:
            s.execute(stmt)
            if latency_buckets:
                _add_buckets(s, key, latency_buckets)

    def usage(self, tenant_id: int, since: dt.date | None = None) -> list[Usage]:
        with self._read() as s:
            query = select(Usage).where(Usage.tenant_id == tenant_id)
            if since is not None:
                query = query.where(Usage.day >= since)
            return list(s.exec(query.order_by(col(Usage.day), col(Usage.adapter))).all())


def _add_buckets(s: Session, key: dict[str, Any], buckets: list[int]) -> None:
    """Add ``buckets`` to the usage row ``key`` names, in the transaction that upserted it.

    JSON lists cannot be summed in portable SQL, so this reads and writes them; the upsert
    before it holds the row's lock (PostgreSQL) or the database's (SQLite) until commit,
    so no other gateway's flush comes between the read and the write.
    """
    row = s.exec(select(Usage).filter_by(**key)).one()
    row.latency_buckets = latency.added([row.latency_buckets, buckets])
    s.add(row)


def _check_limits(limits: TenantLimits) -> None:
    bad = [f.name for f in fields(limits) if (v := getattr(limits, f.name)) is not None and v < 1]
    if bad:
        raise InvalidLimits(
            f"tenant limits {', '.join(bad)} must be at least 1, or unset for unlimited"
        )


def _limits_of(tenant: Tenant) -> dict[str, int | None]:
    return {f.name: getattr(tenant, f.name) for f in fields(TenantLimits)}
