"""A custom alias on the real engine: set over the gateway's REST API with a tenant key,
requested through the official `openai` client as ``bot:staging``; the answer comes from
the aliased version (labelled ``staging``), the bare name still from production, and an
alias nobody set, or another tenant's, is the same 404 as an unknown model."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from registry import Registry
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.serving import ServeProcess
from tests.registry.registry_testdata import build_adapter

NAME = "alias-bot"


@pytest.fixture(scope="module")
def acme(registry: Registry) -> TenantKeys:
    """A tenant of this module's own: the session's acme lists its adapters elsewhere."""
    return make_tenant(registry, "alias-co")


@pytest.fixture(scope="module")
def client(gateway: ServeProcess, acme: TenantKeys) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=acme.key, max_retries=0)


@pytest.fixture(scope="module")
def staged(
    gateway: ServeProcess,
    registry: Registry,
    acme: TenantKeys,
    demo_base: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """alias-co's alias-bot: v1 in production, v2 under the custom alias ``staging``."""
    root = tmp_path_factory.mktemp(NAME)
    for seed in (11, 12):
        weights = build_adapter(demo_base, root / f"s{seed}", seed=seed, r=8)
        registry.push_adapter(acme.tenant_id, NAME, weights, demo_base.name, OPERATOR)
    registry.promote(acme.tenant_id, NAME, 1, OPERATOR)
    answer = httpx.put(
        f"{gateway.url}/v1/adapters/{NAME}/aliases/staging",
        json={"version": 2},
        headers={"authorization": f"Bearer {acme.key}"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text


def _ask(client: OpenAI, model: str) -> tuple[str, dict[str, str]]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "The cat sat on the"}],
        max_tokens=4,
        temperature=0,
    )
    reply = raw.parse()
    return reply.model, {k: raw.headers[k] for k in ("x-loraplex-route", "x-loraplex-version")}


def test_a_custom_alias_serves_its_version_through_the_openai_client(
    staged: None, client: OpenAI
) -> None:
    model, headers = _ask(client, f"{NAME}:staging")
    assert model == f"{NAME}:staging"
    assert headers == {"x-loraplex-route": "staging", "x-loraplex-version": "2"}
    _, bare = _ask(client, NAME)
    assert bare == {"x-loraplex-route": "production", "x-loraplex-version": "1"}


def test_an_unset_or_foreign_alias_is_an_unknown_model(
    staged: None, gateway: ServeProcess, registry: Registry, client: OpenAI
) -> None:
    initech = make_tenant(registry, "initech-aliases")
    foreign = OpenAI(base_url=gateway.url + "/v1", api_key=initech.key, max_retries=0)
    messages = []
    for who, model in [(client, f"{NAME}:nothing"), (foreign, f"{NAME}:staging")]:
        with pytest.raises(openai.NotFoundError) as refused:
            _ask(who, model)
        messages.append(refused.value.message.replace(model, "M"))
    assert messages[0] == messages[1]
