"""Shadow traffic end to end: a real gateway on PostgreSQL in front of the real vLLM engine.

Tenant acme's adapter ``shadowed`` has v1 in production and v2 as its shadow at share 1.
Every answer the client gets is v1's, token for token as PEFT generates it (never v2's,
whose PEFT answers differ); the gateway sends v2 a copy of each request after its answer,
and the registry's comparison counts exactly the agreements PEFT's two answers predict.
The copies are metered but charged to no limit: at a limit of N requests a minute, N
requests succeed with their N copies. The results recorded as suite ``shadow`` first
keep v2 out of production under a gate, then let it in under a looser one; once v2 is
production, the shadow copies nothing.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI, RateLimitError

from registry import Registry, TenantLimits
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import postgres_gateway
from tests.e2e.serving import ServeProcess
from tests.e2e.test_tenancy import peft_greedy
from tests.registry.registry_testdata import build_adapter

ADAPTER = "shadowed"
PROMPTS = ["The owl sat on", "Where is the kettle", "A cat and a dog", "Tell me about boats"]
TOKENS = 8
SEEDS = (61, 62)
WITHIN = 60.0
"""Seconds the copies may take to be answered and flushed before the test gives up."""


class Site:
    def __init__(self, serve: ServeProcess, registry: Registry, tenant: TenantKeys) -> None:
        self.serve, self.registry, self.tenant = serve, registry, tenant
        headers = {"authorization": f"Bearer {tenant.key}"}
        self.http = httpx.Client(base_url=serve.url, headers=headers, timeout=60)
        self.client = OpenAI(base_url=serve.url + "/v1", api_key=tenant.key, max_retries=0)

    def shadow(self) -> dict[str, Any]:
        reply = self.http.get(f"/v1/adapters/{ADAPTER}/shadow")
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    def compared(self, count: int) -> dict[str, Any]:
        """The shadow's results once ``count`` copies were compared (or failed)."""
        deadline = time.monotonic() + WITHIN
        while (results := self.shadow()["results"])["compared"] + results["failed"] < count:
            assert time.monotonic() < deadline, f"copies not recorded: {results}"
            time.sleep(0.5)
        return results


@pytest.fixture(scope="module")
def references(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two versions' weights and PEFT's greedy answers of each to every prompt."""
    root = tmp_path_factory.mktemp("shadow-weights")
    weights = [build_adapter(demo_base, root / f"v{s}", seed=s, r=8) for s in SEEDS]
    answers = [{p: peft_greedy(demo_base, w, p, TOKENS) for p in PROMPTS} for w in weights]
    assert answers[0] != answers[1], "pick seeds whose adapters PEFT can tell apart"
    return {"weights": weights, "answers": answers}


@pytest.fixture(scope="module")
def site(
    gateway: ServeProcess,
    registry: Registry,
    demo_base: Path,
    engine_port: int,
    engine_key: str,
    references: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("shadow") / "home"
    with postgres_gateway("loraplex_shadow_e2e", home, engine_port, engine_key, demo_base) as (
        serve,
        own,
    ):
        run = uuid.uuid4().hex[:6]
        tenant = make_tenant(own, f"acme-{run}")
        # The session's engine loads adapters from the session gateway's registry and blobs.
        holder = make_tenant(registry, f"shadow-engine-side-{run}")
        for weights in references["weights"]:
            own.push_adapter(tenant.tenant_id, ADAPTER, weights, demo_base.name, OPERATOR)
            registry.push_adapter(holder.tenant_id, ADAPTER, weights, demo_base.name, OPERATOR)
        own.promote(tenant.tenant_id, ADAPTER, 1, OPERATOR)
        limits = TenantLimits(requests_per_minute=len(PROMPTS))
        own.set_tenant_limits(tenant.tenant_id, limits, OPERATOR)
        yield Site(serve, own, tenant)


def _shadow_copies(serve: ServeProcess, tenant: str) -> dict[str, float]:
    text = httpx.get(serve.url + "/metrics", timeout=10).text
    pattern = rf'loraplex_shadow_copies_total{{outcome="(\w+)",tenant="{tenant}"}} ([\d.]+)'
    return {outcome: float(n) for outcome, n in re.findall(pattern, text)}


def test_clients_get_production_while_the_candidate_answers_copies(
    site: Site, references: dict[str, Any]
) -> None:
    set_ = site.http.post(f"/v1/adapters/{ADAPTER}/shadow", json={"version": 2, "share": 1.0})
    assert set_.status_code == 200, set_.text
    assert (set_.json()["version"], set_.json()["production_version"]) == (2, 1)
    production, candidate = references["answers"]
    used = 0  # completion tokens the client was told it used
    for prompt in PROMPTS[:-1]:
        answer = site.client.completions.create(
            model=ADAPTER, prompt=prompt, max_tokens=TOKENS, temperature=0
        )
        assert answer.choices[0].text == production[prompt], prompt
        used += answer.usage.completion_tokens if answer.usage else 0
    chunks = list(
        site.client.completions.create(
            model=ADAPTER,
            prompt=PROMPTS[-1],
            max_tokens=TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == production[PROMPTS[-1]]
    used += sum(c.usage.completion_tokens for c in chunks if c.usage)
    over = site.http.post(
        "/v1/completions", json={"model": ADAPTER, "prompt": "x", "max_tokens": 1}
    )
    assert over.status_code == 429  # the tenant's 4 a minute, its copies not charged

    results = site.compared(len(PROMPTS))
    agreeing = sum(production[p].strip() == candidate[p].strip() for p in PROMPTS)
    assert (results["compared"], results["failed"]) == (len(PROMPTS), 0)
    assert results["agreed"] == agreeing and results["agreement"] == agreeing / len(PROMPTS)
    assert results["prompt_tokens"] > 0 and 0 < results["completion_tokens"] <= TOKENS * len(
        PROMPTS
    )
    assert _shadow_copies(site.serve, site.tenant.name) == {"answered": len(PROMPTS)}
    time.sleep(1.5)  # the usage book is flushed once a second
    booked = site.registry.usage(site.tenant.tenant_id)
    assert sum(row.requests for row in booked) == len(PROMPTS)  # the copies are not billed
    assert sum(row.completion_tokens for row in booked) == used
    report = site.http.get("/v1/usage").json()  # the same counters through the usage API
    assert report["totals"]["requests"] == len(PROMPTS)
    assert report["totals"]["completion_tokens"] == used


def test_shadow_results_gate_the_promotion_then_the_shadow_copies_nothing(site: Site) -> None:
    http = site.http
    gate = {"suite": "shadow", "metric": "agreement", "min_value": 0.99}
    assert http.put(f"/v1/adapters/{ADAPTER}/gates", json={"gates": [gate]}).status_code == 200
    refused = http.post(f"/v1/adapters/{ADAPTER}/promote", json={"version": 2})
    assert refused.status_code == 409 and "no eval result" in refused.text, refused.text
    recorded = http.post(f"/v1/adapters/{ADAPTER}/shadow/evals")
    assert recorded.status_code == 200, recorded.text
    [agreement] = [r for r in recorded.json()["data"] if r["metric"] == "agreement"]
    assert agreement["sample_count"] == len(PROMPTS) and agreement["value"] < 0.99
    refused = http.post(f"/v1/adapters/{ADAPTER}/promote", json={"version": 2})
    assert refused.status_code == 409 and "shadow/agreement" in refused.text, refused.text
    gate["min_value"] = 0.0
    assert http.put(f"/v1/adapters/{ADAPTER}/gates", json={"gates": [gate]}).status_code == 200
    promoted = http.post(f"/v1/adapters/{ADAPTER}/promote", json={"version": 2})
    assert promoted.status_code == 200, promoted.text

    limits = TenantLimits(requests_per_minute=1000)
    site.registry.set_tenant_limits(site.tenant.tenant_id, limits, OPERATOR)
    deadline = time.monotonic() + 10  # the gateway applies new limits within a second,
    while True:  # keeping what the tenant used: its next request may wait a moment
        try:
            site.client.completions.create(
                model=ADAPTER, prompt="The owl", max_tokens=2, temperature=0
            )
            break
        except RateLimitError:
            assert time.monotonic() < deadline, "the raised limit was not applied"
            time.sleep(0.5)
    time.sleep(3)  # a copy, had one been sent, would be answered and flushed by now
    status = site.shadow()
    assert status["production_version"] == 2
    assert _shadow_copies(site.serve, site.tenant.name) == {"answered": len(PROMPTS)}
