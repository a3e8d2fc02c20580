"""Tenants, limits, API keys and authentication."""

from __future__ import annotations

import pytest
from conftest import ADMIN

from registry import (
    Conflict,
    InvalidLimits,
    InvalidRequest,
    NotFound,
    Registry,
    TenantLimits,
    tenant_ref,
)


def test_tenants_are_unique_and_carry_limits(registry: Registry) -> None:
    acme = registry.create_tenant("acme", ADMIN, TenantLimits(requests_per_minute=60))
    with pytest.raises(Conflict, match="tenant 'acme' already exists"):
        registry.create_tenant("acme", ADMIN)
    assert registry.tenant_limits("acme") == TenantLimits(requests_per_minute=60)
    assert acme.id is not None
    limits = TenantLimits(tokens_per_minute=1000, max_concurrent=4, max_total_tokens=10**9)
    registry.set_tenant_limits(acme.id, limits, ADMIN)
    assert registry.tenant_limits(acme.id) == limits
    assert [t.name for t in registry.list_tenants()] == ["acme"]
    (event,) = registry.audit_log(action="tenant.limits")
    assert event.before == {"requests_per_minute": 60, "tokens_per_minute": None,
                            "max_concurrent": None, "max_total_tokens": None}  # fmt: skip


def test_invalid_limits_are_refused(registry: Registry) -> None:
    with pytest.raises(InvalidLimits, match="max_concurrent must be at least 1"):
        registry.create_tenant("acme", ADMIN, TenantLimits(max_concurrent=0))
    with pytest.raises(NotFound, match="tenant 'ghost' does not exist"):
        registry.set_tenant_limits("ghost", TenantLimits(), ADMIN)


def test_keys_authenticate_until_revoked(registry: Registry) -> None:
    acme = registry.create_tenant("acme", ADMIN)
    record, plaintext = registry.create_api_key(acme.id, "tenant", ADMIN, name="ci")
    assert plaintext.startswith("lpx-") and len(plaintext) > 40
    assert record.prefix == plaintext[:12] and plaintext not in record.key_sha256
    principal = registry.authenticate(plaintext)
    assert principal is not None and not principal.is_admin
    assert (principal.tenant_id, principal.scope, principal.key_id) == (
        acme.id,
        "tenant",
        record.id,
    )
    assert registry.authenticate(plaintext + "x") is None
    assert record.id is not None
    registry.revoke_api_key(record.id, ADMIN)
    assert registry.authenticate(plaintext) is None
    assert registry.list_api_keys(acme.id)[0].revoked_at is not None


def test_admin_keys_have_no_tenant(registry: Registry) -> None:
    _, plaintext = registry.create_api_key(None, "admin", ADMIN)
    principal = registry.authenticate(plaintext)
    assert principal is not None and principal.is_admin and principal.tenant_id is None
    assert principal.actor.admin
    with pytest.raises(InvalidRequest, match="tenant keys need a tenant"):
        registry.create_api_key(None, "tenant", ADMIN)
    with pytest.raises(InvalidRequest, match="scope 'root' is unknown"):
        registry.create_api_key(None, "root", ADMIN)
    with pytest.raises(NotFound, match="API key 99 does not exist"):
        registry.revoke_api_key(99, ADMIN)


def test_usage_upserts_daily_counters(registry: Registry) -> None:
    acme = registry.create_tenant("acme", ADMIN)
    assert acme.id is not None
    for _ in range(3):
        registry.record_usage(acme.id, "bot", 1, prompt_tokens=10, completion_tokens=5)
    registry.record_usage(acme.id, prompt_tokens=7)
    rows = {(u.adapter, u.version): u for u in registry.usage(acme.id)}
    assert set(rows) == {("", 0), ("bot", 1)}
    bot = rows[("bot", 1)]
    assert (bot.requests, bot.prompt_tokens, bot.completion_tokens) == (3, 30, 15)
    assert rows[("", 0)].prompt_tokens == 7


def test_tenant_refs_are_ids_only_when_ascii_digits() -> None:
    assert tenant_ref("42") == 42
    assert tenant_ref("acme") == "acme"
    assert tenant_ref("¹1") == "¹1"  # isdigit() alone would send this to int() and crash
