"""Keys never leak (logs, metrics, listings, process lists), and revocation is fast."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from registry import Registry
from tests.e2e.conftest import OPERATOR, make_tenant
from tests.e2e.serving import ServeProcess


def test_revoked_key_stops_working_within_a_second(
    gateway: ServeProcess, registry: Registry, base_name: str
) -> None:
    tenant = make_tenant(registry, "short-lived")
    client = OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0)
    client.completions.create(model=base_name, prompt="hi", max_tokens=1)  # cached now
    [key] = registry.list_api_keys(tenant.tenant_id)
    assert key.id is not None
    registry.revoke_api_key(key.id, OPERATOR)
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=base_name, prompt="hi", max_tokens=1)


def test_no_key_appears_in_logs_metrics_listings_or_process_lists(
    gateway: ServeProcess, registry: Registry, engine_key: str, base_name: str
) -> None:
    tenant = make_tenant(registry, "secretive")
    client = OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0)
    client.completions.create(model=base_name, prompt="hi", max_tokens=1)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    bad = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": base_name},
        headers={"authorization": f"Bearer {tenant.key}x"},
    )
    texts = {
        "error body": str(info.value.body) + bad.text,
        "/metrics": httpx.get(gateway.url + "/metrics").text,
        "/v1/models": client.models.with_raw_response.list().text,
        "/readyz": httpx.get(gateway.url + "/readyz").text,
        "gateway log": gateway.log_path.read_text(errors="replace"),
    }
    for log in (gateway.home / "logs").glob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    for process in gateway.all_descendants():
        texts[f"argv of pid {process.pid}"] = " ".join(process.cmdline())
    for secret in (tenant.key, engine_key):
        leaks = [where for where, text in texts.items() if secret in text]
        assert leaks == [], f"a key appears in {leaks}"
