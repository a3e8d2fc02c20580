"""A job's version gets the sketch of its training prompts as its drift reference (a
version pushed without training data has none: see tests/registry/test_drift.py)."""

from __future__ import annotations

from registry import PRODUCTION
from registry.drift import DriftStore, sketch_prompts
from registry.jobs import SUCCEEDED
from tests.training.conftest import ADMIN, Bench
from tests.training.training_testdata import chat_records, fixed_answer_records, jsonl
from training.data import load_jsonl
from training.worker import reference_sketch


def test_the_reference_holds_the_prompt_of_every_example_in_every_split() -> None:
    examples = load_jsonl(jsonl(chat_records(3) + fixed_answer_records(2)))
    expected = [f"Tell me thing {i}." for i in range(3)]
    expected += [f"Question number {i}: what do you say?" for i in range(2)]
    splits = {"train": examples[:4], "validation": [], "test": examples[4:]}
    assert reference_sketch(splits) == sketch_prompts(expected)


def test_a_trained_version_has_its_training_prompts_as_reference(bench: Bench) -> None:
    records = fixed_answer_records(40)
    job = bench.submit(records)
    assert bench.worker().run_once() is not None
    assert bench.job(job.id).status == SUCCEEDED
    (version,) = bench.registry.list_versions(bench.tenant_id, "bot")
    drift = DriftStore(bench.registry)
    assert version.id is not None
    assert drift.reference(version.id) == sketch_prompts(r["prompt"] for r in records)
    if PRODUCTION not in bench.registry.aliases(bench.tenant_id, "bot"):
        bench.registry.promote(bench.tenant_id, "bot", version.number, ADMIN)
    report = drift.report(bench.tenant_id, "bot")
    assert (report.reference_prompts, report.version, report.score) == (40, version.number, None)
