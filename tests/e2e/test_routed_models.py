"""Routed models on the real vLLM engine, through the official `openai` client: one model
name, the adapter chosen per request by rules or by a classifier adapter asked on the same
engine, and routing evals that gate a routed model's promotion.

The classifier here is a stock PEFT adapter with random weights, not a trained one: its
greedy answers to a few messages are observed first (asked directly, as any client could)
and those answers become the policy's labels. What is tested is the mechanism: that the
gateway asks the classifier, reads its label, and serves the label's adapter; that an
answer outside the labels falls back to the default. (The demo, ``server/dev/demo_routing``,
trains a real classifier.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

import router
from registry import Registry
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.serving import ServeProcess, metric_samples
from tests.registry.registry_testdata import build_adapter

TARGETS = {"billing": 11, "shipping": 12, "general": 13, "clf": 14}
"""Adapter name -> the seed of its random weights."""
MESSAGES = [
    "Where is my parcel?",
    "I was charged twice",
    "Reset my password please",
    "Hello",
    "What are your hours?",
    "Cancel my order",
    "The box arrived broken",
    "Can I pay by card?",
]
CLASSIFIER_TOKENS = 3


@pytest.fixture(scope="module")
def tenant(
    registry: Registry, demo_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> TenantKeys:
    keys = make_tenant(registry, "routing-co")
    root = tmp_path_factory.mktemp("routed")
    for name, seed in TARGETS.items():
        path = build_adapter(
            demo_base, root / name, seed=seed, r=8, target_modules=["q_proj", "v_proj"]
        )
        version = registry.push_adapter(keys.tenant_id, name, path, demo_base.name, OPERATOR)
        registry.promote(keys.tenant_id, name, version.number, OPERATOR)
    return keys


@pytest.fixture(scope="module")
def client(gateway: ServeProcess, tenant: TenantKeys) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def rest(gateway: ServeProcess, tenant: TenantKeys) -> httpx.Client:
    headers = {"authorization": f"Bearer {tenant.key}"}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=300)


def chat(
    client: OpenAI, model: str, text: str, max_tokens: int = 8
) -> tuple[str, dict[str, str], str]:
    """(answer text, response headers, the answer's ``model``) of a greedy chat completion."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
    )
    answer = raw.parse()
    return answer.choices[0].message.content or "", dict(raw.headers), answer.model


def save(
    rest: httpx.Client, name: str, policy: dict[str, Any], promote: bool = False
) -> dict[str, Any]:
    if rest.get(f"/v1/routed_models/{name}").status_code == 404:
        answer = rest.post("/v1/routed_models", json={"name": name, "policy": policy})
    else:
        answer = rest.post(
            f"/v1/routed_models/{name}/versions", json={"policy": policy, "promote": promote}
        )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


RULES = {
    "default": "general",
    "rules": [
        {"target": "billing", "keywords": ["charged", "card", "invoice"]},
        {"target": "shipping", "pattern": r"(?i)\b(parcel|box|delivery)\b"},
    ],
}


def test_rules_pick_the_adapter_and_serve_it_under_the_routed_name(
    client: OpenAI, rest: httpx.Client
) -> None:
    save(rest, "desk", RULES)
    for text, expected, reason in [
        ("I was charged twice", "billing", "rule"),
        ("Where is my parcel?", "shipping", "rule"),
        ("Hello", "general", "default"),
    ]:
        answer, headers, model = chat(client, "desk", text)
        assert (headers["x-loraplex-adapter"], headers["x-loraplex-routing-reason"]) == (
            expected,
            reason,
        )
        assert headers["x-loraplex-routed-model"] == "desk@1"
        assert model == "desk"  # the answer names what the client asked for
        direct, _, _ = chat(client, expected, text)
        assert answer == direct  # served by that adapter: the same greedy output
    listed = {m.id for m in client.models.list().data}
    assert {"desk", "billing", "clf"} <= listed


def _observed_labels(client: OpenAI) -> dict[str, str]:
    """Message -> the classifier adapter's own greedy answer, for messages whose answers
    differ from each other (so each can be a label of its own)."""
    labels: dict[str, str] = {}
    for text in MESSAGES:
        answer, _, _ = chat(client, "clf", text, max_tokens=CLASSIFIER_TOKENS)
        label = router.label_text(answer)
        taken = {v.casefold() for v in labels.values()}
        usable = label and router.label_text(label) == label and len(label) <= 64
        if usable and label.casefold() not in taken:
            labels[text] = label
    return labels


def test_a_classifier_picks_by_its_label_and_an_answer_outside_them_falls_back(
    client: OpenAI, rest: httpx.Client, gateway: ServeProcess
) -> None:
    observed = _observed_labels(client)
    assert len(observed) >= 3, f"the classifier's answers are too alike to label: {observed}"
    (to_billing, billing_label), (to_shipping, shipping_label), (unlabelled, _) = list(
        observed.items()
    )[:3]
    policy = {
        "default": "general",
        "classifier": {
            "adapter": "clf",
            "labels": {billing_label: "billing", shipping_label: "shipping"},
            "max_tokens": CLASSIFIER_TOKENS,
        },
    }
    save(rest, "triage", policy)
    _, headers, _ = chat(client, "triage", to_billing)
    assert (headers["x-loraplex-adapter"], headers["x-loraplex-routing-reason"]) == (
        "billing",
        "classifier",
    )
    assert headers["x-loraplex-routing-label"] == billing_label
    _, headers, _ = chat(client, "triage", to_shipping)
    assert (headers["x-loraplex-adapter"], headers["x-loraplex-routing-label"]) == (
        "shipping",
        shipping_label,
    )
    _, headers, _ = chat(client, "triage", unlabelled)
    assert (headers["x-loraplex-adapter"], headers["x-loraplex-routing-reason"]) == (
        "general",
        "fallback",
    )
    decisions = metric_samples(gateway.url, "loraplex_routing_decisions_total")
    by_reason = {s[0]["reason"] for s in decisions if s[0]["routed_model"] == "triage"}
    assert by_reason == {"classifier", "fallback"}
    timings = metric_samples(gateway.url, "loraplex_routing_classifier_seconds_count")
    assert any(labels["outcome"] == "answered" and value >= 3 for labels, value in timings)


def test_a_foreign_adapter_in_a_policy_is_refused_like_an_unknown_one(
    registry: Registry, rest: httpx.Client, demo_base: Path, tmp_path: Path
) -> None:
    rival = make_tenant(registry, "routing-rival")
    path = build_adapter(demo_base, tmp_path / "private", seed=21, r=8, target_modules=["q_proj"])
    registry.push_adapter(rival.tenant_id, "private-bot", path, demo_base.name, OPERATOR)
    foreign = rest.post(
        "/v1/routed_models", json={"name": "leak", "policy": {"default": "private-bot"}}
    )
    unknown = rest.post(
        "/v1/routed_models", json={"name": "leak", "policy": {"default": "nobody-bot"}}
    )
    assert foreign.status_code == unknown.status_code == 400
    assert foreign.json()["error"]["message"].replace("private-bot", "X") == unknown.json()[
        "error"
    ]["message"].replace("nobody-bot", "X")
    assert rest.get("/v1/routed_models/leak").status_code == 404


def test_the_routing_suite_is_stored_per_version_and_gates_a_promotion(
    client: OpenAI, rest: httpx.Client
) -> None:
    observed = _observed_labels(client)
    (first, first_label), (second, second_label) = list(observed.items())[:2]
    suite = [
        {"messages": [{"role": "user", "content": first}], "expected": "billing"},
        {"messages": [{"role": "user", "content": second}], "expected": "shipping"},
        {"messages": [{"role": "user", "content": "my card was charged"}], "expected": "billing"},
    ]
    live = save(rest, "gated", RULES)
    assert live["live"] is True
    assert (
        rest.put(
            "/v1/routed_models/gated/gates", json={"gates": [{"min_accuracy": 1.0}]}
        ).status_code
        == 200
    )
    classifier = {
        "adapter": "clf",
        "labels": {first_label: "billing", second_label: "shipping"},
        "max_tokens": CLASSIFIER_TOKENS,
    }
    candidate = save(
        rest, "gated", {**RULES, "rules": RULES["rules"][:1], "classifier": classifier}
    )
    assert candidate["live"] is False
    refused = rest.post("/v1/routed_models/gated/versions/2/promote")
    assert (
        refused.status_code == 409
        and "record a routing eval first" in refused.json()["error"]["message"]
    )
    evaluated = {}
    for number in (1, 2):
        answer = rest.post(
            f"/v1/routed_models/gated/versions/{number}/evals", json={"examples": suite}
        )
        assert answer.status_code == 200, answer.text
        evaluated[number] = answer.json()
    assert evaluated[2]["accuracy"] == 1.0, evaluated[2]["confusion"]
    assert evaluated[1]["accuracy"] < 1.0  # the rules alone miss the classifier's messages
    history = rest.get("/v1/routed_models/gated/evals").json()["data"]
    assert [(e["version"], e["examples"]) for e in history] == [(1, 3), (2, 3)]
    promoted = rest.post("/v1/routed_models/gated/versions/2/promote")
    assert promoted.status_code == 200, promoted.text
    _, headers, _ = chat(client, "gated", second)
    assert (headers["x-loraplex-routed-model"], headers["x-loraplex-adapter"]) == (
        "gated@2",
        "shipping",
    )
    worse = save(rest, "gated", {"default": "general"})
    for_worse = rest.post(
        f"/v1/routed_models/gated/versions/{worse['version']}/evals", json={"examples": suite}
    )
    assert for_worse.json()["accuracy"] == 0.0
    gate = rest.post(f"/v1/routed_models/gated/versions/{worse['version']}/promote")
    assert gate.status_code == 409 and gate.json()["error"]["code"] == "gate_failed"
