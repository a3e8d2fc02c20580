"""Prompt drift end to end: the real vLLM engine, through the official openai client.

A gateway of its own (flushing its drift book every second) in front of the session's
engine and registry serves an adapter whose production version has a reference sketch
made from prompts like the demo's questions. Thirty such questions give a low score on
``/metrics``; thirty off-topic prompts then take it past the threshold: the audit log
records ``adapter.drift`` once, and ``loraplex adapters drift`` shows it. The tenant has
capture off throughout: the sketch does not depend on it.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from registry import Registry
from registry.drift import DRIFT, DriftStore, sketch_prompts
from server.cli.main import main
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import gateway_on_engine
from tests.e2e.serving import ServeProcess, metric_samples, shared_registry_env
from tests.registry.registry_testdata import build_adapter
from training.demo_data import QUESTIONS, SUBJECTS

ADAPTER = "drift-helper"
THRESHOLD = 0.35
SCORED_WITHIN = 30.0
"""Seconds a flushed score may take to show before a test gives up on it."""
OFF_TOPIC = (
    "How do I reset my router password after the firmware update broke the login page?",
    "Explain the tax implications of exercising stock options before the company goes public.",
    "Why does my Kubernetes pod keep restarting with exit code 137 during the nightly batch?",
    "Summarize the main arguments for and against a four-day work week in large companies.",
    "Translate the attached invoice into German and list every total with its currency.",
)


def demo_questions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(QUESTIONS)[1].format(rng.choice(SUBJECTS)) for _ in range(count)]


@pytest.fixture(scope="module")
def drift_gateway(
    gateway: ServeProcess,
    engine_port: int,
    engine_key: str,
    base_name: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeProcess]:
    env = {
        **shared_registry_env(gateway),
        "LORAPLEX_DRIFT_INTERVAL": "1",
        "LORAPLEX_DRIFT_THRESHOLD": str(THRESHOLD),
    }
    home = tmp_path_factory.mktemp("drift")
    serve = gateway_on_engine(
        home, engine_port, engine_key, ["--served-model-name", base_name], env
    )
    try:
        serve.wait_ready(timeout=120)
        yield serve
    finally:
        assert serve.stop(), serve.log_tail()


@pytest.fixture(scope="module")
def owner(
    registry: Registry, demo_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> TenantKeys:
    """A tenant whose adapter's production version has a reference of demo questions."""
    tenant = make_tenant(registry, f"drift-{uuid.uuid4().hex[:6]}")
    adapter_dir = build_adapter(demo_base, tmp_path_factory.mktemp("drift") / ADAPTER, seed=23, r=8)
    version = registry.push_adapter(
        tenant.tenant_id, ADAPTER, adapter_dir, demo_base.name, OPERATOR
    )
    registry.promote(tenant.tenant_id, ADAPTER, version.number, OPERATOR)
    assert version.id is not None
    DriftStore(registry).set_reference(version.id, sketch_prompts(demo_questions(200, seed=1)))
    return tenant


def _ask(client: OpenAI, prompts: list[str]) -> None:
    for prompt in prompts:
        client.chat.completions.create(
            model=ADAPTER,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=1,
            temperature=0,
        )


def _wait_for_score(serve: ServeProcess, tenant: str, holds: Callable[[float], bool]) -> float:
    """The gauge's value once it holds ``holds`` (flushes come every second)."""
    deadline = time.monotonic() + SCORED_WITHIN
    while True:
        values = [
            value
            for labels, value in metric_samples(serve.url, "loraplex_adapter_drift")
            if labels == {"tenant": tenant, "adapter": ADAPTER}
        ]
        if values and holds(values[0]):
            return values[0]
        assert time.monotonic() < deadline, f"drift score never held; last seen {values}"
        time.sleep(0.5)


def _cli(capsys: pytest.CaptureFixture[str], gateway: ServeProcess, tenant: str) -> dict[str, str]:
    home = gateway.home
    flags = ["--home", str(home), "--database-url", f"sqlite:///{home / 'registry.db'}",
             "--blob-url", str(home / "blobs")]  # fmt: skip
    capsys.readouterr()
    assert main(["adapters", "drift", ADAPTER, "--tenant", tenant, *flags]) == 0
    return dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())


def test_off_topic_prompts_take_the_score_past_the_threshold_once(
    drift_gateway: ServeProcess,
    gateway: ServeProcess,
    registry: Registry,
    owner: TenantKeys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = OpenAI(base_url=drift_gateway.url + "/v1", api_key=owner.key, max_retries=0)
    _ask(client, demo_questions(30, seed=2))
    low = _wait_for_score(drift_gateway, owner.name, lambda _: True)
    assert low < THRESHOLD
    assert registry.audit_log(tenant_id=owner.tenant_id, action=DRIFT) == []

    _ask(client, [OFF_TOPIC[i % len(OFF_TOPIC)] for i in range(30)])
    _wait_for_score(drift_gateway, owner.name, lambda score: score > THRESHOLD)
    time.sleep(2.5)  # two more flushes: a crossing is recorded once, not at every check
    high = _wait_for_score(drift_gateway, owner.name, lambda score: score > THRESHOLD)
    events = registry.audit_log(tenant_id=owner.tenant_id, action=DRIFT)
    assert len(events) == 1 and events[0].subject == f"adapter:{owner.name}/{ADAPTER}"
    assert events[0].after is not None and events[0].after["score"] > THRESHOLD

    shown = _cli(capsys, gateway, owner.name)
    assert shown["score"].endswith(f"(past the threshold {THRESHOLD:g})")
    assert float(shown["score"].split()[0]) == pytest.approx(high, abs=1e-3)
    assert shown["state"].startswith("drifting since ")
    assert shown["live"] == "60 prompts in the last 7 days"
