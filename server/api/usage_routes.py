"""Usage: ``GET /v1/usage`` (the caller tenant's own) and ``GET /admin/usage`` (every
tenant's, or ``tenant=``), from the gateways' daily counters (``registry.usage``).

Query: ``since`` and ``until`` (UTC days, YYYY-MM-DD; the last 30 days by default, at most
366), ``adapter`` (``""`` is the base model), ``format`` ``json`` (a list with totals) or
``csv`` (a header row, then one row per tenant, day, adapter and version).

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response

from registry import Principal, tenant_ref
from registry.usage import UsageQuery, UsageReports, to_csv, totals
from server.api.auth import registry_of, require_admin, require_tenant

routes = APIRouter(tags=["usage"])
Format = Literal["json", "csv"]


def _report(request: Request, query: UsageQuery, format: Format) -> Any:
    lines = UsageReports(registry_of(request)).lines(query)
    if format == "csv":
        return Response(to_csv(lines), media_type="text/csv")
    since, until = query.days()
    return {
        "object": "list",
        "data": [line.to_json() for line in lines],
        "since": since.isoformat(),
        "until": until.isoformat(),
        "totals": totals(lines),
    }


@routes.get("/v1/usage", summary="The caller tenant's usage by day, adapter and version")
def tenant_usage(
    request: Request,
    principal: Annotated[Principal, Depends(require_tenant)],
    since: dt.date | None = None,
    until: dt.date | None = None,
    adapter: str | None = None,
    format: Format = "json",
) -> Any:
    query = UsageQuery(principal.tenant_id, since, until, adapter)
    return _report(request, query, format)


@routes.get("/admin/usage", summary="Every tenant's usage (or one's) by day, adapter, version")
def admin_usage(
    request: Request,
    _: Annotated[Principal, Depends(require_admin)],
    tenant: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    adapter: str | None = None,
    format: Format = "json",
) -> Any:
    tenant_id = None
    if tenant is not None:
        tenant_id = registry_of(request).get_tenant(tenant_ref(tenant)).id
    return _report(request, UsageQuery(tenant_id, since, until, adapter), format)
