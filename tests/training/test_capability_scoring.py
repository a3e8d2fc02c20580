"""Layered evaluation in training: the task suite's regex check, and the base's capability
suites scored by the worker, the base's reference measured once and gates holding the
candidate to it (on the tiny chat base; a few examples)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import PRODUCTION, Actor, Gate
from registry.capability import CapabilityStore
from registry.jobs import SUCCEEDED
from tests.training.conftest import Bench
from tests.training.training_testdata import fixed_answer_records
from training.data import Example
from training.evaluate import BASE, CANDIDATE, Evaluator, SuiteRun, compare_on_test
from training.schema import RegexError, check_regex, matches_regex
from training.worker import TEST_SUITE

ADMIN = Actor("test-admin", admin=True)
SUITE = [
    {"prompt": f"Question number {i}: what do you say?", "answer": "Paris."} for i in (3, 5, 9)
]
LABEL = "capability:generic"


def _examples(count: int) -> list[Example]:
    return [
        Example(i, "completion", {"prompt": f"Say something {i}.", "completion": "Banana."})
        for i in range(count)
    ]


def test_regex_match_is_the_share_of_answers_matching_in_full() -> None:
    pattern = check_regex(r"Banana\. \d+")
    assert matches_regex("  Banana. 12\n", pattern)
    assert not matches_regex("Banana. 12 and more", pattern)
    for bad, message in (("", "must not be empty"), ("(", "not a valid regular expression"),
                         ("a" * 1025, "at most 1024")):  # fmt: skip
        with pytest.raises(RegexError, match=message):
            check_regex(bad)


def test_the_evaluator_scores_regex_match_only_when_given_one(chat_base: Path) -> None:
    examples = _examples(3)
    anything, nothing = (Evaluator(chat_base, examples, 64, regex=r) for r in (r"(?s).*", "Z{9}"))
    assert anything.score(BASE).regex_match == 1.0
    assert nothing.score(BASE).regex_match == 0.0
    plain = Evaluator(chat_base, examples, 64).score(BASE)
    assert plain.regex_match is None and "regex_match" not in plain.as_metrics()


def test_capability_suites_are_scored_beside_the_test_split(
    chat_base: Path, tmp_path: Path
) -> None:
    from tests.registry.registry_testdata import build_adapter

    adapter = build_adapter(chat_base, tmp_path / "adapter", seed=1, r=4)
    suite = [Example(1, "completion", {"prompt": "Capital of France?", "completion": "Paris."})]
    runs = [SuiteRun("generic", suite, with_base=True), SuiteRun("known", suite, False)]
    compared = compare_on_test(chat_base, _examples(2), adapter, max_length=64, suites=runs)
    assert set(compared.test) == {CANDIDATE, BASE}
    assert set(compared.suites["generic"]) == {CANDIDATE, BASE}
    assert set(compared.suites["known"]) == {CANDIDATE}
    assert compared.suites["generic"][BASE].samples == 1
    alone = compare_on_test(chat_base, [], adapter, max_length=64, suites=runs[:1])
    assert alone.test == {} and alone.suites["generic"][CANDIDATE].samples == 1


def _messages(bench: Bench, job_id: str) -> list[str]:
    return [e.message for e in reversed(bench.store.events(bench.tenant_id, job_id, limit=100))]


def test_the_worker_measures_the_base_once_and_stores_both_beside_the_version(
    bench: Bench,
) -> None:
    capabilities = CapabilityStore(bench.registry)
    capabilities.set_suite(bench.base, "generic", SUITE, ADMIN)
    first = bench.submit(fixed_answer_records(24), answer_regex=r"Banana\. \d+")
    worker = bench.worker()
    worker.run_once()
    done = bench.job(first.id)
    assert done.status == SUCCEEDED, done.error
    assert done.result is not None and "regex_match" in done.result["metrics"][CANDIDATE]
    reference = capabilities.reference(bench.base, "generic")
    assert reference is not None and reference.sample_count == len(SUITE)
    assert reference.details["job"] == first.id and "torch" in reference.details["library_versions"]
    stored = {
        (r.suite, r.metric): r for r in bench.registry.eval_results(bench.tenant_id, "bot", 1)
    }
    assert {(LABEL, "loss"), (LABEL, "exact_match"), (f"{LABEL}/base", "loss")} <= set(stored)
    assert (TEST_SUITE, "regex_match") in stored
    assert stored[(f"{LABEL}/base", "loss")].value == reference.metrics["loss"]
    assert stored[(LABEL, "loss")].dataset_sha256 == reference.examples_sha256
    (line,) = [m for m in _messages(bench, first.id) if m.startswith("Capability suite generic")]
    assert line.endswith("(measured now)")
    second = bench.submit(fixed_answer_records(24, "Cherry."))
    worker.run_once()
    (again,) = [m for m in _messages(bench, second.id) if m.startswith("Capability suite")]
    assert "(reference of " in again  # not measured a second time
    assert capabilities.reference(bench.base, "generic") == reference


@pytest.mark.parametrize("margin", [10.0, 0.0])
def test_a_gate_holds_the_candidate_to_the_base_s_capability_reference(
    bench: Bench, tmp_path: Path, margin: float
) -> None:
    """Trained to answer the suite's own prompts otherwise, the candidate's loss there rises
    above the base's: within a wide margin it is promoted, with none it is not."""
    from tests.registry.registry_testdata import build_adapter

    CapabilityStore(bench.registry).set_suite(bench.base, "generic", SUITE, ADMIN)
    uploaded = build_adapter(bench.chat_base, tmp_path / "v1", seed=1, r=4)
    bench.registry.push_adapter(bench.tenant_id, "bot", uploaded, bench.base.name, ADMIN)
    gates = [Gate(LABEL, "loss", higher_is_better=False, max_below_base=margin)]
    bench.registry.set_gates(bench.tenant_id, "bot", gates, ADMIN)
    job = bench.submit(fixed_answer_records(24))
    bench.worker().run_once()
    done = bench.job(job.id)
    assert done.status == SUCCEEDED, done.error
    stored = {(r.suite, r.metric): r.value
              for r in bench.registry.eval_results(bench.tenant_id, "bot", 2)}  # fmt: skip
    assert stored[(LABEL, "loss")] > stored[(f"{LABEL}/base", "loss")]
    aliases = bench.registry.aliases(bench.tenant_id, "bot")
    if margin:
        assert done.fine_tuned_model == "bot" and aliases[PRODUCTION].version == 2
        return
    assert done.fine_tuned_model == "bot@2" and PRODUCTION not in aliases
    (refused,) = [m for m in _messages(bench, job.id) if m.startswith("Not promoted")]
    assert f"{LABEL}/loss: {stored[(LABEL, 'loss')]:g} is above the base's" in refused
    assert refused.endswith("by more than 0")
