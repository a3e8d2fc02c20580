"""A custom alias resolves through the gateway's resolver (``model: "bot:staging"``) from
the routing view the registry hands over: its version, labelled with the alias's name (the
``x-loraplex-route`` header), bypassing the canary split and getting no shadow copies; an
unknown alias, and another tenant's, answer exactly like an unknown model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry, TenantLimits
from registry.custom_aliases import CustomAliases
from server.errors import APIError, model_not_found
from server.gateway.resolution import Resolver, Route
from server.gateway.tenancy import Caller, Tenancy
from tests.registry.registry_testdata import build_adapter, build_tiny_base

OPS = Actor("ops", admin=True)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """Tenant acme's bot: v1 production, v2 canary at 100 % and shadow, v3 staging;
    tenant globex, with no adapters."""
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    ids = [registry.create_tenant(name, OPS, TenantLimits()).id for name in ("acme", "globex")]
    assert ids == [1, 2]  # a fresh database: the tests name the tenants by these ids
    base = build_tiny_base(tmp_path / "tiny")
    registry.register_base(base, "tiny", "r1", OPS)
    for n in (1, 2, 3):
        registry.push_adapter(
            1, "bot", build_adapter(base, tmp_path / f"v{n}", seed=n), "tiny", OPS
        )
    registry.promote(1, "bot", 1, OPS)
    registry.canary(1, "bot", 2, 1.0, OPS)
    registry.set_shadow(1, "bot", 2, 1.0, OPS)
    CustomAliases(registry).set_alias(1, "bot", "staging", 3, OPS)
    yield registry
    registry.close()


async def _resolver(registry: Registry, tenant_id: int) -> tuple[Resolver, Caller]:
    _, key = registry.create_api_key(tenant_id, "tenant", OPS, name="k")
    tenancy = Tenancy(registry, ttl=60, max_age=60)
    caller = await tenancy.caller(key)
    assert isinstance(caller, Caller)
    return Resolver(tenancy, {"tiny": "fp"}, lambda: False), caller


def _header(route: Route, name: bytes) -> bytes:
    return dict(route.headers())[name]


async def test_a_custom_alias_resolves_to_its_version_past_the_canary_split(
    registry: Registry,
) -> None:
    resolver, caller = await _resolver(registry, 1)
    staged = await resolver.resolve(caller, {"model": "bot:staging", "user": "u1"})
    assert staged.version is not None
    assert (staged.version.number, staged.version.label) == (3, "staging")
    assert _header(staged, b"x-loraplex-route") == b"staging"
    assert staged.engine_model == registry.get_version(1, "bot", 3).lora_name
    assert staged.shadow is None  # copies go with production requests only
    bare = await resolver.resolve(caller, {"model": "bot", "user": "u1"})
    assert bare.version is not None and (bare.version.number, bare.version.label) == (2, "canary")


async def test_an_unknown_or_foreign_alias_answers_like_an_unknown_model(
    registry: Registry,
) -> None:
    resolver, caller = await _resolver(registry, 1)
    foreign, globex = await _resolver(registry, 2)
    models = ["bot:nothing", "bot:staging", "nobody:staging"]
    for (who, by), model in zip(
        [(resolver, caller), (foreign, globex), (foreign, globex)], models, strict=True
    ):
        with pytest.raises(APIError) as refused:
            await who.resolve(by, {"model": model})
        assert refused.value.body() == model_not_found(model).body(), model
