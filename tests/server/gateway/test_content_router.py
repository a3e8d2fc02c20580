"""Narrow unit tests of routed models' decisions in the gateway (server/gateway/content_routing.py),
with fakes: a fake forwarder answers as the classifier's engine would, a fake tenancy holds the
classifier adapter's routing view. The real engine, gateway and registry are in
tests/e2e/test_routed_models.py."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

import router
from server.gateway.content_routing import ContentRouter
from server.gateway.metrics import Metrics
from server.gateway.proxy import UpstreamFailure
from server.gateway.routed import RoutedChoice, RoutedModel
from server.gateway.tenancy import Caller, UsageBook
from tests.server.gateway.test_name_hiding import FakeUpstream
from tests.server.gateway.test_shadow_copies import FakeForwarder, FakeReplicas

POLICY = router.RoutingPolicy.from_json({
    "default": "general",
    "rules": [{"target": "billing", "keywords": ["invoice"]}],
    "classifier": {
        "adapter": "clf",
        "labels": {"shipping": "shipping", "account": "account"},
        "instruction": "Label it.",
    },
})  # fmt: skip
ROUTED = RoutedModel("suite", 3, POLICY)
CLF = router.VersionView(1, "lora-clf", "fp")


class FakePrincipal:
    key_id = "k1"


class FakeTenancy:
    def __init__(self, has_classifier: bool = True) -> None:
        self.has_classifier = has_classifier

    async def routing(self, tenant_id: int, adapter: str) -> router.RoutingView | None:
        if not self.has_classifier or adapter != "clf":
            return None
        return router.RoutingView("clf", {1: CLF}, {router.PRODUCTION: router.AliasTarget(1, 1.0)})


def _answer(text: str, logprobs: list[float] | None = None) -> FakeUpstream:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": lp} for lp in logprobs]}
    usage = {"prompt_tokens": 9, "completion_tokens": 2}
    return FakeUpstream(200, orjson.dumps({"choices": [choice], "usage": usage}))


def _router(
    answer: FakeUpstream | Exception, policy: router.RoutingPolicy = POLICY, **tenancy: bool
) -> tuple[ContentRouter, FakeForwarder, UsageBook]:
    forwarder = FakeForwarder(answer)
    forwarder.metrics = Metrics()  # type: ignore[attr-defined]
    usage = UsageBook(None)  # type: ignore[arg-type]
    content = ContentRouter(None, FakeTenancy(**tenancy), FakeReplicas(), forwarder, usage)  # type: ignore[arg-type]
    return content, forwarder, usage


def _decide(content: ContentRouter, text: str, routed: RoutedModel = ROUTED) -> Any:
    caller = Caller(FakePrincipal(), 7, "acme")  # type: ignore[arg-type]
    message = router.RequestText(last_user=text)
    return asyncio.run(content.decide(caller, routed, message))


def _decisions(content: ContentRouter, reason: str, target: str, label: str = "") -> float:
    child = content.metrics.routing_decisions.labels("acme", "suite", reason, label, target)
    return float(child._value.get())  # type: ignore[attr-defined]


def test_a_rule_decides_without_an_engine_call() -> None:
    content, forwarder, _ = _router(_answer("shipping"))
    decision = _decide(content, "my invoice")
    assert (decision.target, decision.reason, decision.rule) == ("billing", "rule", 1)
    assert forwarder.sent == []
    assert _decisions(content, "rule", "billing") == 1


def test_the_classifier_is_asked_and_its_label_cached_for_an_identical_prompt() -> None:
    content, forwarder, usage = _router(_answer(" Shipping\n"))
    first = _decide(content, "where is it?")
    again = _decide(content, "where is it?")
    assert (first.target, first.reason, first.label) == ("shipping", "classifier", "shipping")
    assert again == first
    assert len(forwarder.sent) == 1  # the second decision came from the cache
    sent = forwarder.sent[0]
    assert sent["model"] == "lora-clf" and sent["temperature"] == 0.0
    assert sent["messages"] == [
        {"role": "system", "content": "Label it."},
        {"role": "user", "content": "where is it?"},
    ]
    assert sent["logprobs"] is False
    assert usage._pending[(7, "clf", 1)].prompt_tokens == 9  # the tenant's usage of clf
    assert _decisions(content, "classifier", "shipping", "shipping") == 2


def test_an_answer_outside_the_labels_falls_back_to_the_default() -> None:
    content, _, _ = _router(_answer("I think it is about a refund"))
    decision = _decide(content, "hello")
    assert (decision.target, decision.reason) == ("general", "fallback")
    assert _decisions(content, "fallback", "general") == 1


def test_an_unsure_classifier_falls_back_when_a_floor_is_set() -> None:
    document = POLICY.to_json()
    document["classifier"]["min_confidence"] = 0.5
    unsure = RoutedModel("suite", 4, router.RoutingPolicy.from_json(document))
    content, forwarder, _ = _router(_answer("account", logprobs=[-0.1, -1.5]))
    decision = _decide(content, "hello", unsure)
    assert decision.reason == "fallback"  # exp(-1.6) = 0.20 < 0.5
    assert forwarder.sent[0]["logprobs"] is True
    content, _, _ = _router(_answer("account", logprobs=[-0.1, -0.2]))
    assert _decide(content, "hello", unsure).target == "account"


@pytest.mark.parametrize(
    "failure",
    [
        UpstreamFailure(503, "engine down", "engine_unreachable"),
        FakeUpstream(500, b'{"error": {"message": "boom"}}'),
        FakeUpstream(200, b'{"choices": []}'),
    ],
)
def test_a_classifier_that_cannot_answer_leaves_the_default(
    failure: FakeUpstream | Exception,
) -> None:
    content, _, _ = _router(failure)
    decision = _decide(content, "hello")
    assert (decision.target, decision.reason) == ("general", "fallback")
    failed = content.metrics.routing_classifier_seconds.labels("failed")
    assert failed._sum.get() >= 0 and _decide(content, "hello").reason == "fallback"  # type: ignore[attr-defined]


def test_a_missing_classifier_adapter_leaves_the_default() -> None:
    content, forwarder, _ = _router(_answer("shipping"), has_classifier=False)
    assert _decide(content, "hello").reason == "fallback"
    assert forwarder.sent == []


def test_the_answer_headers_name_the_routed_model_and_why() -> None:
    by_label = router.RoutingDecision("shipping", router.RoutingReason.CLASSIFIER, label="ship")
    assert RoutedChoice("suite", 3, by_label).headers() == [
        (b"x-loraplex-routed-model", b"suite@3"),
        (b"x-loraplex-routing-reason", b"classifier"),
        (b"x-loraplex-routing-label", b"ship"),
    ]
    by_rule = router.RoutingDecision("billing", router.RoutingReason.RULE, rule=2)
    assert (b"x-loraplex-routing-rule", b"2") in RoutedChoice("suite", 3, by_rule).headers()


def test_a_policy_this_gateway_cannot_read_is_a_retryable_503() -> None:
    from registry.routed_models import LiveRoutedModel
    from server.errors import APIError

    class Store:
        def live(self, tenant_id: int, name: str) -> LiveRoutedModel:
            return LiveRoutedModel(name, 2, {"default": "a", "future_field": 1})

    content, _, _ = _router(_answer("x"))
    content.store = Store()  # type: ignore[assignment]
    with pytest.raises(APIError) as raised:
        asyncio.run(content.routed_model(7, "suite"))
    assert (raised.value.status, raised.value.code) == (503, "routed_model_unreadable")
