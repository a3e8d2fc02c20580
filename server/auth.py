"""Bearer-key authentication for the registry API.

Tenant keys reach only tenant routes and admin keys only admin routes, so an
admin key leaking into a client config cannot act as some tenant by accident.
"""

from __future__ import annotations

from fastapi import Request

from registry import Principal, Registry
from server.errors import APIError


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    return token.strip()


def authenticate(request: Request) -> Principal:
    """The caller's principal; 401 for a missing, unknown or revoked key."""
    principal = registry_of(request).authenticate(_bearer(request))
    if principal is None:
        raise APIError(
            401,
            "Incorrect API key provided (unknown or revoked); ask your admin for a new key.",
            code="invalid_api_key",
        )
    return principal


def require_tenant(request: Request) -> Principal:
    """FastAPI dependency: a tenant key (admin keys are refused with 403)."""
    principal = authenticate(request)
    if principal.tenant_id is None:
        raise APIError(
            403,
            "Admin keys cannot use tenant routes; use the /admin routes or a tenant key.",
            code="tenant_key_required",
        )
    return principal


def require_admin(request: Request) -> Principal:
    """FastAPI dependency: an admin key (tenant keys are refused with 403)."""
    principal = authenticate(request)
    if not principal.is_admin:
        raise APIError(403, "This route needs an admin API key.", code="admin_key_required")
    return principal
