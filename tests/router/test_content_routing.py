"""Routing policies: parsing (every problem at once), rules, labels, and routing scores."""

from __future__ import annotations

import time
from typing import Any

import pytest

from router import (
    InvalidRoutingPolicy,
    RequestText,
    RoutingPolicy,
    RoutingReason,
    accuracy,
    answer_probability,
    confusion,
    label_text,
)
from router.content import MAX_RULES

SUITE: dict[str, Any] = {
    "default": "general",
    "rules": [
        {"target": "billing", "keywords": ["invoice", "refund", "credit card"]},
        {"target": "shipping", "pattern": r"(?i)\btrack(ing)?\b|\bparcel\b"},
        {"target": "vip", "field": "metadata.tier", "pattern": "^gold$"},
        {"target": "ops", "field": "system", "keywords": ["internal"]},
        {"target": "tester", "field": "user", "pattern": "^qa-"},
    ],
    "classifier": {
        "adapter": "intent-clf",
        "labels": {"billing": "billing", "shipping": "shipping", "account": "account"},
        "instruction": "Answer with one label.",
        "max_tokens": 6,
    },
}


def chat(text: str, **extra: Any) -> RequestText:
    return RequestText.of({"messages": [{"role": "user", "content": text}], **extra})


def test_a_policy_round_trips_through_json() -> None:
    policy = RoutingPolicy.from_json(SUITE)
    assert RoutingPolicy.from_json(policy.to_json()).to_json() == policy.to_json()
    assert policy.targets() == [
        "billing",
        "shipping",
        "vip",
        "ops",
        "tester",
        "account",
        "general",
    ]
    assert policy.references()[-1] == "intent-clf"


@pytest.mark.parametrize(
    ("text", "extra", "target", "rule"),
    [
        ("Where is my INVOICE?", {}, "billing", 1),
        ("my credit card was charged twice", {}, "billing", 1),
        ("invoices", {}, None, None),  # whole words only
        ("tracking number please", {}, "shipping", 2),
        ("hello", {"metadata": {"tier": "gold"}}, "vip", 3),
        ("hello", {"metadata": {"tier": "golden"}}, None, None),
        ("hello", {"user": "qa-7"}, "tester", 5),
    ],
)
def test_rules_match_in_order(
    text: str, extra: dict[str, Any], target: str | None, rule: int | None
) -> None:
    decision = RoutingPolicy.from_json(SUITE).by_rules(chat(text, **extra))
    if target is None:
        assert decision is None
        return
    assert decision is not None
    assert (decision.target, decision.reason, decision.rule) == (target, RoutingReason.RULE, rule)


def test_the_first_matching_rule_wins() -> None:
    decision = RoutingPolicy.from_json(SUITE).by_rules(chat("refund for my parcel"))
    assert decision is not None and decision.target == "billing"


def test_system_messages_and_content_parts_are_read() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "internal tooling"}]},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
        ]
    }
    text = RequestText.of(body)
    assert (text.last_user, text.system) == ("second", "internal tooling")
    decision = RoutingPolicy.from_json(SUITE).by_rules(text)
    assert decision is not None and decision.target == "ops"


def test_a_completion_prompt_is_the_last_user_text() -> None:
    assert RequestText.of({"prompt": "track it"}).last_user == "track it"
    assert RequestText.of({"prompt": ["a", "refund"]}).last_user == "refund"
    assert RequestText.of({"prompt": 5, "metadata": {"k": 1}}) == RequestText()


def test_a_catastrophic_pattern_for_backtracking_engines_runs_in_linear_time() -> None:
    policy = RoutingPolicy.from_json(
        {"default": "general", "rules": [{"target": "slow", "pattern": r"(a|aa)+$"}]}
    )
    started = time.perf_counter()
    assert policy.by_rules(chat("a" * 5000 + "b")) is None  # a backtracking engine: hours
    assert time.perf_counter() - started < 1.0  # RE2: linear (generous for a loaded machine)
    assert policy.by_rules(chat("aaaa")) is not None


def test_lookarounds_and_backreferences_are_refused_with_the_reason() -> None:
    for pattern in (r"(?<!x)y", r"(a)\1"):
        with pytest.raises(InvalidRoutingPolicy, match="RE2 has no lookarounds"):
            rule = {"target": "a", "pattern": pattern}
            RoutingPolicy.from_json({"default": "a", "rules": [rule]})


@pytest.mark.parametrize(
    ("answer", "target", "reason", "label"),
    [
        ("billing", "billing", RoutingReason.CLASSIFIER, "billing"),
        ("  Shipping.\n", "shipping", RoutingReason.CLASSIFIER, "shipping"),
        ('{"intent": "account"}', "account", RoutingReason.CLASSIFIER, "account"),
        ('"billing"', "billing", RoutingReason.CLASSIFIER, "billing"),
        ("refunds maybe", "general", RoutingReason.FALLBACK, "refunds maybe"),
        ('{"a": "billing", "b": "x"}', "general", RoutingReason.FALLBACK, None),
    ],
)
def test_classifier_answers_map_to_targets_or_fall_back(
    answer: str, target: str, reason: RoutingReason, label: str | None
) -> None:
    decision = RoutingPolicy.from_json(SUITE).by_label(answer)
    assert (decision.target, decision.reason) == (target, reason)
    if label is not None:
        assert decision.label == label


def test_an_unsure_classifier_falls_back_to_the_default() -> None:
    document = {**SUITE, "classifier": {**SUITE["classifier"], "min_confidence": 0.8}}
    policy = RoutingPolicy.from_json(document)
    assert policy.by_label("billing", 0.9).reason is RoutingReason.CLASSIFIER
    assert policy.by_label("billing", 0.5).reason is RoutingReason.FALLBACK
    assert policy.by_label("billing", None).reason is RoutingReason.FALLBACK
    assert answer_probability([-0.1, -0.2]) == pytest.approx(0.7408, abs=1e-4)


def test_the_classifier_is_asked_its_instruction_and_the_last_user_message() -> None:
    policy = RoutingPolicy.from_json(SUITE)
    assert policy.classifier_messages(chat("hi")) == [
        {"role": "system", "content": "Answer with one label."},
        {"role": "user", "content": "hi"},
    ]


def test_every_problem_is_reported_at_once() -> None:
    document = {
        "rules": [
            {"target": "a", "pattern": "(unclosed"},
            {"target": "b", "keywords": []},
            {"target": "c", "field": "headers", "keywords": ["x"]},
            {"target": "d", "pattern": "x", "keywords": ["y"]},
            {"target": "", "pattern": "x"},
        ],
        "classifier": {"adapter": "clf", "labels": {"A": "a", "a": "b"}, "max_tokens": 0},
        "extra": 1,
    }
    with pytest.raises(InvalidRoutingPolicy) as raised:
        RoutingPolicy.from_json(document)
    problems = "\n".join(raised.value.problems)
    for expected in (
        "unknown field 'extra'",
        "default must name",
        "rules[0].pattern is not a valid regular expression",
        "rules[1].keywords must be a list",
        "rules[2].field must be one of",
        "rules[3] needs exactly one of pattern and keywords",
        "rules[4].target must name",
        "label 'a' is given twice",
        "max_tokens must be an integer from 1 to",
    ):
        assert expected in problems
    assert len(raised.value.problems) == 9


def test_sizes_are_bounded() -> None:
    rules = [{"target": "a", "keywords": ["x"]}] * (MAX_RULES + 1)
    with pytest.raises(InvalidRoutingPolicy, match=f"at most {MAX_RULES} rules"):
        RoutingPolicy.from_json({"default": "a", "rules": rules})
    with pytest.raises(InvalidRoutingPolicy, match="characters; at most"):
        RoutingPolicy.from_json({"default": "a", "rules": [{"target": "a", "pattern": "x" * 600}]})
    with pytest.raises(InvalidRoutingPolicy, match="must be a JSON object"):
        RoutingPolicy.from_json(["not", "an", "object"])


def test_label_text_reads_the_label_out_of_an_answer() -> None:
    assert label_text(" `billing`. ") == "billing"
    assert label_text('{"intent": " shipping "}') == "shipping"
    assert label_text("{not json") == "{not json"


def test_routing_scores() -> None:
    table = confusion([("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")])
    assert table == {"a": {"a": 1, "b": 1}, "b": {"b": 2}}
    assert accuracy(table) == 0.75
    assert accuracy({}) == 0.0
