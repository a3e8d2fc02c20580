"""Capability suites of a base, its reference scores, and gates that hold a candidate to
them (``Gate.max_below_base``), on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ADMIN
from registry_testdata import BASE_NAME

from registry import (
    Actor,
    BaseModelRecord,
    Conflict,
    Gate,
    GateFailed,
    InvalidRequest,
    NotFound,
    Registry,
    Tenant,
)
from registry.capability import MAX_EXAMPLES, MAX_TEXT_CHARS, CapabilityStore, examples_sha256

USER = Actor("key:7")
EXAMPLES = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
LABEL = "capability:generic"


@pytest.fixture
def store(registry: Registry) -> CapabilityStore:
    return CapabilityStore(registry)


def _measure(store: CapabilityStore, base: BaseModelRecord, exact: float = 0.6) -> None:
    store.set_reference(base, "generic", {"exact_match": exact, "loss": 2.0}, ADMIN,
                        sample_count=5, examples_sha256=examples_sha256(EXAMPLES),
                        details={"evaluator": "test"})  # fmt: skip


def test_a_suite_round_trips_and_its_reference_follows_its_examples(
    registry: Registry, store: CapabilityStore, base: BaseModelRecord
) -> None:
    created = store.set_suite(base, "generic", EXAMPLES, ADMIN)
    assert (created.label, created.reference) == (LABEL, None)
    assert store.reference(base, "generic") is None
    _measure(store, base)
    shown = store.get_suite(base, "generic")
    assert shown.examples == EXAMPLES and shown.examples_sha256 == examples_sha256(EXAMPLES)
    assert shown.reference is not None
    assert shown.reference.metrics == {"exact_match": 0.6, "loss": 2.0}
    assert (shown.reference.sample_count, shown.reference.details) == (5, {"evaluator": "test"})
    store.set_suite(base, "generic", EXAMPLES[:3], ADMIN)  # replaced: to be measured again
    assert store.reference(base, "generic") is None
    assert [s.name for s in store.suites(base)] == ["generic"]
    actions = [e.action for e in registry.audit_log()]
    assert actions.count("base.capability") == 2
    assert actions.count("base.capability.reference") == 1


def test_a_reference_of_replaced_examples_is_refused(
    store: CapabilityStore, base: BaseModelRecord
) -> None:
    store.set_suite(base, "generic", EXAMPLES, ADMIN)
    with pytest.raises(Conflict, match="was replaced while it was being measured"):
        store.set_reference(base, "generic", {"exact_match": 1.0}, ADMIN, sample_count=5,
                            examples_sha256=examples_sha256(EXAMPLES[:1]))  # fmt: skip
    with pytest.raises(InvalidRequest, match="finite"):
        store.set_reference(base, "generic", {"exact_match": float("nan")}, ADMIN, sample_count=5,
                            examples_sha256=examples_sha256(EXAMPLES))  # fmt: skip
    assert store.reference(base, "generic") is None


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([], "at least one example"),
        (EXAMPLES[:1] * (MAX_EXAMPLES + 1), f"at most {MAX_EXAMPLES} examples"),
        ([{"prompt": "hi"}], "example 1: 'answer' must be a non-blank string"),
        ([{"prompt": "x" * (MAX_TEXT_CHARS + 1), "answer": "a"}], "over 2000 characters"),
        ([{"prompt": "a", "answer": "b", "extra": 1}], "unknown field(s) 'extra'"),
        (["just text"], "example 1 is not an object"),
    ],
)
def test_bad_examples_are_refused_and_nothing_is_written(
    store: CapabilityStore, base: BaseModelRecord, examples: list[object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        store.set_suite(base, "generic", examples, ADMIN)
    with pytest.raises(NotFound, match="has no capability suite 'generic'"):
        store.get_suite(base, "generic")


def test_a_bad_suite_name_is_refused(store: CapabilityStore, base: BaseModelRecord) -> None:
    with pytest.raises(InvalidRequest, match="capability suite name"):
        store.set_suite(base, "no/slashes", EXAMPLES, ADMIN)


# -- gates -------------------------------------------------------------------------


@pytest.fixture
def gated(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> int:
    """Tenant id of "bot" (version 1), gated to stay within 0.05 of the base's exact match."""
    assert tenant.id is not None
    registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, USER)
    registry.set_gates(tenant.id, "bot", [Gate(LABEL, "exact_match", max_below_base=0.05)], USER)
    return tenant.id


def _score(registry: Registry, tenant_id: int, value: float) -> None:
    registry.add_eval_result(tenant_id, "bot", 1, LABEL, "exact_match", value, USER)


def test_a_candidate_may_not_fall_below_the_base_by_more_than_the_margin(
    registry: Registry, store: CapabilityStore, base: BaseModelRecord, gated: int
) -> None:
    store.set_suite(base, "generic", EXAMPLES, ADMIN)
    _measure(store, base, exact=0.61)
    _score(registry, gated, 0.52)
    with pytest.raises(GateFailed) as caught:
        registry.promote(gated, "bot", 1, USER)
    assert caught.value.failures == [
        "capability:generic/exact_match: 0.52 is below the base's 0.61 by more than 0.05"
    ]
    _score(registry, gated, 0.56)  # exactly the margin below: allowed
    registry.promote(gated, "bot", 1, USER)
    assert registry.aliases(gated, "bot")["production"].version == 1
    assert registry.get_gates(gated, "bot")[0].max_below_base == 0.05


def test_without_a_base_reference_the_gate_says_to_measure_the_base_first(
    registry: Registry, store: CapabilityStore, base: BaseModelRecord, gated: int
) -> None:
    _score(registry, gated, 0.9)
    with pytest.raises(GateFailed) as caught:
        registry.promote(gated, "bot", 1, USER)
    (failure,) = caught.value.failures
    assert failure.startswith("capability:generic/exact_match: the base has no reference")
    assert "measure the base first" in failure
    store.set_suite(base, "generic", EXAMPLES, ADMIN)  # a suite, but still not measured
    with pytest.raises(GateFailed, match="measure the base first"):
        registry.promote(gated, "bot", 1, USER)


def test_a_lower_is_better_metric_may_not_rise_above_the_base_by_more(
    registry: Registry, store: CapabilityStore, base: BaseModelRecord, gated: int
) -> None:
    registry.set_gates(gated, "bot", [
        Gate(LABEL, "loss", higher_is_better=False, max_below_base=0.5),
    ], USER)  # fmt: skip
    store.set_suite(base, "generic", EXAMPLES, ADMIN)
    _measure(store, base)  # the base's loss: 2.0
    registry.add_eval_result(gated, "bot", 1, LABEL, "loss", 2.75, USER)
    with pytest.raises(GateFailed, match=re.escape("2.75 is above the base's 2 by more than 0.5")):
        registry.promote(gated, "bot", 1, USER)
    registry.add_eval_result(gated, "bot", 1, LABEL, "loss", 2.25, USER)
    registry.promote(gated, "bot", 1, USER)


def test_max_below_base_is_only_for_capability_suites() -> None:
    with pytest.raises(InvalidRequest, match="capability suites only"):
        Gate("fine-tune-test", "exact_match", max_below_base=0.05)
    with pytest.raises(InvalidRequest, match="finite"):
        Gate(LABEL, "exact_match", max_below_base=float("inf"))
