"""Usage reports: the daily counters the gateways book (``Usage``), read back per tenant
or across tenants, filtered by day range and adapter, with totals, as JSON or CSV.

A row is one (tenant, UTC day, adapter, version); base-model traffic has adapter ``""``
and version 0. Requests count every admitted request that ended; ``errors`` the ones
that failed on the server's side. Shadow copies are not usage (``registry.shadow``
meters them apart).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlmodel import col, select

from registry.errors import InvalidRequest
from registry.models import Tenant, Usage
from registry.registry import Registry
from registry.store import Store

MAX_DAYS = 366
"""Longest day range one report covers."""


@dataclass(frozen=True)
class UsageQuery:
    """Which counters a report holds."""

    tenant_id: int | None = None
    """One tenant's (None: every tenant's, for admins)."""
    since: dt.date | None = None
    """First UTC day included (None: ``until`` - 30 days)."""
    until: dt.date | None = None
    """Last UTC day included (None: today)."""
    adapter: str | None = None
    """Only this adapter's rows (``""``: the base model's)."""

    def days(self) -> tuple[dt.date, dt.date]:
        """(first, last) day, checked: in order, at most ``MAX_DAYS`` apart."""
        until = self.until or dt.datetime.now(dt.UTC).date()
        since = self.since or until - dt.timedelta(days=30)
        if since > until:
            raise InvalidRequest(f"since ({since}) is after until ({until}); swap them")
        if (until - since).days >= MAX_DAYS:
            raise InvalidRequest(
                f"{since} to {until} spans more than {MAX_DAYS} days; ask for a shorter range"
            )
        return since, until


@dataclass(frozen=True)
class UsageLine:
    """One tenant's counters for one day, adapter and version."""

    tenant: str
    day: dt.date
    adapter: str
    version: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int

    def to_json(self) -> dict[str, Any]:
        return {"object": "usage", **asdict(self), "day": self.day.isoformat()}


COLUMNS = [f.name for f in fields(UsageLine)]
SUMMED = ("requests", "prompt_tokens", "completion_tokens", "errors")


class UsageReports(Store):
    """Reads the usage counters; writes are the gateways' (``Registry.record_usage``)."""

    def __init__(self, registry: Registry) -> None:
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits

    def lines(self, query: UsageQuery) -> list[UsageLine]:
        """The counters ``query`` selects, by day, tenant, adapter and version."""
        since, until = query.days()
        statement = (
            select(Usage, Tenant.name)
            .join(Tenant, col(Tenant.id) == col(Usage.tenant_id))
            .where(col(Usage.day) >= since, col(Usage.day) <= until)
        )
        if query.tenant_id is not None:
            statement = statement.where(Usage.tenant_id == query.tenant_id)
        if query.adapter is not None:
            statement = statement.where(Usage.adapter == query.adapter)
        order = (col(Usage.day), col(Tenant.name), col(Usage.adapter), col(Usage.version))
        with self._read() as s:
            rows = s.exec(statement.order_by(*order)).all()
        return [
            UsageLine(name, u.day, u.adapter, u.version, u.requests, u.prompt_tokens,
                      u.completion_tokens, u.errors)
            for u, name in rows
        ]  # fmt: skip


def totals(lines: list[UsageLine]) -> dict[str, int]:
    return {name: sum(getattr(line, name) for line in lines) for name in SUMMED}


def to_csv(lines: list[UsageLine]) -> str:
    """The lines as CSV with a header row (days as YYYY-MM-DD)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for line in lines:
        writer.writerow([getattr(line, name) for name in COLUMNS])
    return out.getvalue()
