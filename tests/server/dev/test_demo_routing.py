"""The routing demo's data, policy and table helpers (``server.dev.demo_routing``); the
demo itself runs against a real server and worker."""

from __future__ import annotations

import pytest

import router
from server.dev.demo_loop import INTENTS, intent_of
from server.dev.demo_routing import (
    DESKS,
    RULE_MESSAGES,
    confusion_lines,
    desk_records,
    eval_examples,
    routing_policy,
    split_messages,
)
from training.demo_data import intent_records

NAMES = {"billing": "b-desk", "shipping": "s-desk", "refund": "r-desk"}


def test_the_split_is_disjoint_and_balanced() -> None:
    split = split_messages(intent_records(10_000))
    prompts = [{r["prompt"] for r in part} for part in (split.train, split.held_out, split.shown)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2])
    assert not (prompts[1] & prompts[2])
    for intent in INTENTS:
        assert sum(intent_of(r["completion"]) == intent for r in split.held_out) == 20
        assert sum(intent_of(r["completion"]) == intent for r in split.shown) == 2


def test_too_few_messages_are_refused() -> None:
    with pytest.raises(ValueError, match="only"):
        split_messages(intent_records(30))


def test_a_desk_trains_on_its_own_intent_with_its_reply() -> None:
    records = desk_records(intent_records(60), "shipping")
    assert records and {r["completion"] for r in records} == {DESKS["shipping"][1]}


def test_the_policy_parses_and_its_rules_decide_the_rule_messages() -> None:
    policy = router.RoutingPolicy.from_json(routing_policy(NAMES, "clf", "base"))
    decided = [
        policy.by_rules(router.RequestText(text, metadata=meta or {}))
        for text, meta in RULE_MESSAGES
    ]
    assert [d.target if d else None for d in decided] == ["b-desk", "s-desk", "r-desk"]
    split = split_messages(intent_records(10_000))
    # the held-out messages are the classifier's to decide, not a rule's
    assert all(policy.by_rules(router.RequestText(r["prompt"])) is None for r in split.held_out)
    assert policy.by_label('{"intent": "refund"}').target == "r-desk"


def test_eval_examples_expect_the_desk_and_the_matrix_is_aligned() -> None:
    [example] = eval_examples(
        [{"prompt": "Please refund the cat.", "completion": '{"intent": "refund"}'}], NAMES
    )
    assert example["expected"] == "r-desk"
    lines = confusion_lines({"b": {"b": 18, "base": 2}, "s": {"s": 20}}, ["b", "s"])
    assert lines[0].split() == ["expected", "\\", "chosen", "b", "s", "base"]
    assert lines[1].split() == ["b", "18", "0", "2"]
    assert len({len(line) for line in lines}) == 1
