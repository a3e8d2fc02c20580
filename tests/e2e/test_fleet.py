"""The production topology on loopback (``make fleet``): two bases, a vLLM engine and a
worker per base, two gateways in front of both, Redis, PostgreSQL and SeaweedFS as S3, as
real processes.

The tests run in file order on one fleet; each leaves it whole (every engine and
gateway running) for the next.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from server.dev.demo_site import random_adapter, upload_and_promote
from server.dev.fleet import BUCKET, Fleet, FleetConfig, Proc
from tests.deploy.promql import dashboard_queries, metric_names
from tests.e2e.conftest import running_fleet
from tests.e2e.serving import REPO, metric_families, metric_samples

ADAPTER = "fleet-bot"
"""An adapter of the main base (the demo base)."""
SMALL_ADAPTER = "fleet-small-bot"
"""An adapter of the second base (the small demo base)."""
MODELS = (ADAPTER, SMALL_ADAPTER)
DASHBOARD = REPO / "deploy" / "dashboards" / "loraplex.json"
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@pytest.fixture(scope="module")
def fleet(
    demo_base: Path, small_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    config = FleetConfig(
        tmp_path_factory.mktemp("fleet"),
        [demo_base, small_base],
        database=f"loraplex_fleet_{uuid.uuid4().hex[:10]}",
    )
    with running_fleet(config) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def key(fleet: Fleet) -> str:
    return fleet.create_tenant("fleet-tenant")


def chat(gateway: Proc, key: str, model: str = ADAPTER) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def readyz(gateway: Proc) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(gateway.url + "/readyz", timeout=5).json()
    return answer


def wait_for(what: str, condition: Any, timeout: float) -> float:
    """Poll ``condition`` until true; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def cached_adapters(fleet: Fleet) -> dict[str, list[str]]:
    """Adapter entries in each engine's resolver cache (dot-files are in-progress or evicted)."""
    root = fleet.config.home / "adapter-cache"
    return {
        d.name: sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
        for d in sorted(root.iterdir())
    }


def promote(gateway: Proc, key: str, version: int) -> None:
    httpx.post(
        f"{gateway.url}/v1/adapters/{ADAPTER}/promote",
        json={"version": version},
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    ).raise_for_status()


def test_every_process_listens_where_make_fleet_says(fleet: Fleet) -> None:
    where = dict(fleet.where())
    expected = {"gateway-0", "gateway-1", "engine-0", "engine-1", "worker", "worker-1", "redis"}
    assert expected | {"postgresql"} <= set(where)
    for gateway in fleet.gateways:
        assert where[gateway.name] == gateway.url
        assert httpx.get(gateway.url + "/healthz", timeout=5).status_code == 200
        assert readyz(gateway)["engines_healthy"] == 2
    assert [e.base for e in fleet.engines] == fleet.base_names
    for worker, base in zip(fleet.workers, fleet.base_fingerprints.values(), strict=True):
        assert f"on base {base[:12]}" in worker.tail()  # a worker per base


def test_adapter_uploaded_through_one_gateway_is_fetched_from_s3_by_engines_that_never_saw_it(
    fleet: Fleet, key: str, tmp_path: Path
) -> None:
    gw0, gw1 = fleet.gateways
    adapter = random_adapter(fleet.config.bases[0], tmp_path / "v1", seed=11)
    assert all(not entries for entries in cached_adapters(fleet).values())

    upload_and_promote(gw0.url, key, ADAPTER, adapter, fleet.settings.resolved_served_model_name)
    stored = fleet.s3.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert stored, "the upload should be in the S3 bucket"

    answer = OpenAI(base_url=gw1.url + "/v1", api_key=key, max_retries=0)
    raw = answer.chat.completions.with_raw_response.create(
        model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert raw.headers["x-loraplex-version"] == "1"
    assert raw.parse().model == ADAPTER
    cached = cached_adapters(fleet)
    print(f"\nresolver caches after one request through the other gateway: {cached}")
    assert any(cached.values()), "an engine should have fetched the adapter into its cache"


def test_both_bases_and_adapters_of_both_are_served_through_both_gateways(
    fleet: Fleet, key: str, tmp_path: Path
) -> None:
    main, small = fleet.base_names
    adapter = random_adapter(fleet.config.bases[1], tmp_path / "small", seed=13)
    upload_and_promote(fleet.gateways[1].url, key, SMALL_ADAPTER, adapter, small)
    for gateway in fleet.gateways:
        client = OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        listed = {m.id: m.model_dump().get("parent") for m in client.models.list()}
        assert listed == {main: None, small: None, ADAPTER: main, SMALL_ADAPTER: small}
        # Each answer proves its route: an engine of the other base has no model of that
        # name, and an adapter of one base cannot load on the other's (other shapes).
        for model in (main, small, ADAPTER, SMALL_ADAPTER):
            reply = client.completions.create(model=model, prompt="Once", max_tokens=4)
            assert reply.model == model and reply.usage and reply.usage.completion_tokens > 0


def test_alias_change_through_one_gateway_is_served_by_the_other_within_1s(
    fleet: Fleet, key: str, tmp_path: Path
) -> None:
    gw0, gw1 = fleet.gateways
    base = fleet.settings.resolved_served_model_name
    adapter = random_adapter(fleet.config.bases[0], tmp_path / "v2", seed=12)
    stale = staleness(
        gw1, key, "2", lambda: upload_and_promote(gw0.url, key, ADAPTER, adapter, base)
    )
    back = staleness(gw0, key, "1", lambda: promote(gw1, key, 1))  # and back, the other way
    print(f"\nold version still served by the other gateway up to {stale:.2f} s and {back:.2f} s")
    assert stale < 1.0 and back < 1.0


def staleness(observer: Proc, key: str, version: str, switch: Callable[[], object]) -> float:
    """How long after ``switch()`` returned ``observer`` still served the old version.

    A request is sent to ``observer`` every 50 ms before, during and for 2 s after the
    switch; what counts is when each request was *sent* (on a loaded 2-core machine one
    answer can take a few hundred milliseconds).
    """
    origin = time.monotonic()
    seen: list[tuple[float, str | None]] = []
    stop = threading.Event()

    def probe() -> None:
        sent = time.monotonic() - origin
        seen.append((sent, chat(observer, key).headers.get("x-loraplex-version")))

    with ThreadPoolExecutor(16) as pool:

        def pace() -> None:
            while not stop.is_set():
                pool.submit(probe)
                time.sleep(0.05)

        pacer = threading.Thread(target=pace)
        pacer.start()
        time.sleep(1.0)
        switch()
        acked = time.monotonic() - origin
        time.sleep(2.0)
        stop.set()
        pacer.join()
    assert any(got != version for sent, got in seen if sent < acked), "old version never seen"
    assert any(got == version for sent, got in seen if sent >= acked), "new version never seen"
    return max([sent - acked for sent, got in seen if sent >= acked and got != version] or [0.0])


def test_engines_join_and_leave_through_discovery_without_gateway_restarts(
    fleet: Fleet, key: str
) -> None:
    small = fleet.base_names[1]
    urls = [engine.url for engine in fleet.engines]
    fleet.write_engine_list(urls[:1])  # the small base's engine leaves: no engine serves it
    left = wait_for(
        "engine-1 leaving both gateways",
        lambda: all(readyz(g)["engines"] == 1 for g in fleet.gateways),
        timeout=15,
    )
    assert all(chat(g, key).status_code == 200 for g in fleet.gateways for _ in range(3))
    for gateway in fleet.gateways:
        assert chat(gateway, key, small).status_code == 404  # served nowhere: unknown here
    fleet.write_engine_list(urls)
    joined = wait_for(
        "engine-1 rejoining both gateways",
        lambda: all(readyz(g)["engines_healthy"] == 2 for g in fleet.gateways),
        timeout=20,
    )
    print(f"\ndiscovery: engine left after {left:.1f} s, rejoined healthy after {joined:.1f} s")
    assert all(chat(g, key, small).status_code == 200 for g in fleet.gateways)
    assert all(g.alive for g in fleet.gateways)


def test_killed_engine_is_ejected_then_readmitted_and_the_other_base_keeps_serving(
    fleet: Fleet, key: str
) -> None:
    victim = fleet.engines[1]  # the small base's only engine
    victim.kill()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda i: chat(fleet.gateways[i % 2], key).status_code, range(24)))
    ejected = wait_for(
        "both gateways ejecting the killed engine",
        lambda: all(readyz(g)["engines_healthy"] == 1 for g in fleet.gateways),
        timeout=15,
    )
    assert statuses == [200] * len(statuses), statuses
    for gateway in fleet.gateways:  # its base: a clean, retryable refusal, not an error page
        refused = chat(gateway, key, SMALL_ADAPTER)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "no_engine"

    victim.start()
    readmitted = wait_for(
        "both gateways readmitting the restarted engine",
        lambda: all(readyz(g)["engines_healthy"] == 2 for g in fleet.gateways),
        timeout=600,
    )
    print(f"\nengine killed: ejected after {ejected:.1f} s, readmitted {readmitted:.0f} s later")
    assert all(chat(g, key, m).status_code == 200 for g in fleet.gateways for m in MODELS)


def registry_state(gateway: Proc, key: str) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {key}"}
    shown = httpx.get(f"{gateway.url}/v1/adapters/{ADAPTER}", headers=auth, timeout=10)
    versions = httpx.get(f"{gateway.url}/v1/adapters/{ADAPTER}/versions", headers=auth, timeout=10)
    shown.raise_for_status()
    versions.raise_for_status()
    return {"adapter": shown.json(), "versions": versions.json()}


def test_killed_gateway_loses_no_registry_state(fleet: Fleet, key: str) -> None:
    gw0, gw1 = fleet.gateways
    promote(gw0, key, 2)  # acknowledged, then the gateway dies
    before = registry_state(gw1, key)
    registry = fleet.registry()
    try:
        audit_before = len(registry.audit_log())
    finally:
        registry.close()
    gw0.kill()

    after = registry_state(gw1, key)
    assert after == before
    assert after["adapter"]["aliases"]["production"]["version"] == 2
    gw0.start()
    wait_for("the restarted gateway", lambda: _ready(gw0), timeout=120)
    assert registry_state(gw0, key) == before
    assert chat(gw0, key).headers["x-loraplex-version"] == "2"
    registry = fleet.registry()
    try:
        assert len(registry.audit_log()) == audit_before
    finally:
        registry.close()


def _ready(gateway: Proc) -> bool:
    try:
        return bool(readyz(gateway)["engines_healthy"] == 2)
    except (httpx.HTTPError, ValueError):
        return False


def live_names(url: str, headers: dict[str, str] | None = None) -> tuple[set[str], set[str]]:
    """(series names with samples, series names declared) on a live /metrics endpoint."""
    sampled: set[str] = set()
    declared: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for family in metric_families(url, headers):
        declared.update(family.name + s for s in suffixes.get(family.type, [""]))
        sampled.update(sample.name for sample in family.samples)
    return sampled, declared


def test_every_metric_the_dashboard_queries_is_on_a_live_metrics_endpoint(
    fleet: Fleet, key: str
) -> None:
    chat(fleet.gateways[0], key)
    httpx.post(
        fleet.gateways[1].url + "/v1/chat/completions",
        json={"model": ADAPTER, "messages": [{"role": "user", "content": "x"}], "stream": True},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    engine_key = {"authorization": f"Bearer {fleet.settings.engine_api_key}"}
    sampled: set[str] = set()
    declared: set[str] = set()
    for proc, headers in [
        *((g, None) for g in fleet.gateways),
        *((e, engine_key) for e in fleet.engines),
    ]:
        s, d = live_names(proc.url, headers)
        sampled |= s
        declared |= d
    queried = {
        name
        for _, expr in dashboard_queries(json.loads(DASHBOARD.read_text()))
        for name in metric_names(expr)
    } - PROMETHEUS_SERIES
    missing = sorted(queried - declared - sampled)
    unsampled = sorted(queried - sampled)
    print(f"\ndashboard queries {len(queried)} series; without samples yet: {unsampled}")
    assert not missing, f"the dashboard queries series no live endpoint exports: {missing}"
    assert metric_samples(fleet.gateways[0].url, "loraplex_requests_total")
