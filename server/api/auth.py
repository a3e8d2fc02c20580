"""Bearer-key authentication for the registry API.

Tenant keys reach only tenant routes and admin keys only admin routes, so an
admin key leaking into a client config cannot act as some tenant by accident.
"""

from __future__ import annotations

from fastapi import Request

from registry import Principal, Registry
from server.errors import APIError, bearer_token, incorrect_api_key


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def authenticate(request: Request) -> Principal:
    """The caller's principal; 401 for a missing, malformed, unknown or revoked key."""
    token = bearer_token(request.headers.get("authorization", ""))
    principal = registry_of(request).authenticate(token)
    if principal is None:
        raise incorrect_api_key()
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
