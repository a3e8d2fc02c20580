"""Two engine replicas behind one gateway: adapter affinity, and failover when one dies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from registry import LocalBlobStore, Registry
from tests.e2e.conftest import ENGINE_ARGS, OPERATOR, make_tenant
from tests.e2e.serving import ServeProcess, free_port, metric_samples, wait_gone
from tests.registry.registry_testdata import build_adapter


@pytest.fixture(scope="module")
def two_replicas(
    demo_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    first_port = free_port()
    serve = ServeProcess(
        tmp_path_factory.mktemp("replicas"),
        args=[
            "--base-model",
            str(demo_base),
            "--engine-port",
            str(first_port),
            "--engine-replicas",
            "2",
            *ENGINE_ARGS,
        ],
    ).start()
    try:
        serve.wait_ready(engines=2)
        yield serve
    finally:
        family = serve.all_descendants()
        assert serve.stop()
        assert not wait_gone(family)


def per_engine(serve: ServeProcess) -> dict[str, float]:
    return {
        labels["engine"]: v
        for labels, v in metric_samples(serve.url, "loraplex_engine_requests_total")
    }


def test_affinity_then_failover(
    two_replicas: ServeProcess, demo_base: Path, tmp_path: Path
) -> None:
    serve = two_replicas
    assert httpx.get(serve.url + "/readyz").json()["engines_healthy"] == 2

    registry = Registry(
        f"sqlite:///{serve.home / 'registry.db'}", LocalBlobStore(serve.home / "blobs")
    )
    tenant = make_tenant(registry, "replicated")
    adapter = build_adapter(demo_base, tmp_path / "a", seed=5, r=8)
    version = registry.push_adapter(tenant.tenant_id, "sticky", adapter, demo_base.name, OPERATOR)
    registry.promote(tenant.tenant_id, "sticky", version.number, OPERATOR)
    registry.close()
    client = OpenAI(base_url=serve.url + "/v1", api_key=tenant.key, max_retries=0, timeout=120)

    before = per_engine(serve)
    for _ in range(8):
        client.completions.create(model="sticky", prompt="Hello", max_tokens=2)
    after = per_engine(serve)
    moved = {e: after.get(e, 0) - before.get(e, 0) for e in after}
    [home] = [e for e, n in moved.items() if n == 8]  # one replica took them all

    victim = next(
        p
        for p in serve.engine_processes()
        if f"--port {home.rsplit(':', 1)[1]}" in " ".join(p.cmdline())
    )
    victim.kill()
    for _ in range(8):
        reply = client.completions.create(model="sticky", prompt="Hello", max_tokens=2)
        assert reply.choices[0].text is not None
    final = per_engine(serve)
    other = next(e for e in final if e != home)
    assert final[other] - after.get(other, 0) >= 8
