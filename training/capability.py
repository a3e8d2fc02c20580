"""A job's part in the base's capability suites (``registry.capability``).

Before training, the worker looks up the suites of the job's base; the trained adapter is
scored on each of them beside the test split (``training.evaluate.compare_on_test``), and
the base alone too where its reference is not measured yet. Afterwards a newly measured
reference is stored with the base, and the version gets, per suite and metric, an eval
result under ``capability:<name>`` (the candidate) and ``capability:<name>/base`` (the
reference it is held to), each measured on the suite's examples (their SHA-256). Gates
with ``max_below_base`` then decide the promotion as for any other eval result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from registry import BaseModelRecord, Conflict, NotFound, Registry
from registry.capability import BASE_SUFFIX, CapabilityStore, Suite
from registry.registry import Score
from registry.values import Actor
from training.data import Example
from training.evaluate import (
    BASE,
    CANDIDATE,
    CAPABILITY_MAX_LENGTH,
    MAX_NEW_TOKENS,
    EvalMetrics,
    SuiteRun,
)

EVALUATOR = "training.evaluate.Evaluator, greedy decoding"
"""What measures a capability suite (recorded with each base reference)."""


def examples_of(suite: Suite) -> list[Example]:
    """The suite's examples as completion records: the prompt is the user's one turn."""
    return [
        Example(i, "completion", {"prompt": e["prompt"], "completion": e["answer"]})
        for i, e in enumerate(suite.examples, start=1)
    ]


@dataclass(frozen=True)
class Plan:
    """The base of a job and its capability suites, as they were when the job began."""

    base: BaseModelRecord | None
    suites: list[Suite]

    def runs(self) -> list[SuiteRun]:
        """What to score: every suite, and the base on those it has no reference on."""
        return [
            SuiteRun(s.name, examples_of(s), with_base=s.reference is None) for s in self.suites
        ]


def plan(registry: Registry, base_fingerprint: str) -> Plan:
    """The capability suites of the base with this fingerprint (none if it is unknown)."""
    try:
        base = registry.get_base(base_fingerprint)
    except NotFound:
        return Plan(None, [])
    return Plan(base, CapabilityStore(registry).suites(base))


@dataclass
class Recorded:
    """What a job's capability scores become."""

    scores: list[Score] = field(default_factory=list)
    """The version's eval results: the candidate's and the base reference's, per suite."""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Per suite, the job's event: a line with the numbers, and them as data."""
    result: dict[str, Any] = field(default_factory=dict)
    """Per suite: the candidate's and the reference's metrics (the job's ``result``)."""


def details(job_id: str, libraries: Mapping[str, str]) -> dict[str, Any]:
    """How a reference was measured: the evaluator, its budget, the libraries, the job."""
    return {
        "evaluator": EVALUATOR,
        "max_length": CAPABILITY_MAX_LENGTH,
        "max_new_tokens": MAX_NEW_TOKENS,
        "library_versions": dict(libraries),
        "job": job_id,
    }


def record(
    registry: Registry,
    planned: Plan,
    measured: Mapping[str, Mapping[str, EvalMetrics]],
    actor: Actor,
    how: Mapping[str, Any],
) -> Recorded:
    """Store the base references measured now and turn every suite's scores into eval
    results and events. A suite replaced while the job ran keeps no reference from it."""
    recorded = Recorded()
    store = CapabilityStore(registry)
    for suite in planned.suites:
        scored = measured.get(suite.name)
        if scored is None or CANDIDATE not in scored:
            continue
        candidate = scored[CANDIDATE]
        assert planned.base is not None  # a plan without a base has no suites
        reference, origin = _reference(store, planned.base, suite, scored.get(BASE), actor, how)
        add = recorded.scores.append
        for metric, value in candidate.as_metrics().items():
            add(Score(suite.label, metric, value, candidate.samples, suite.examples_sha256))
        if reference is not None:
            for metric, value in reference[0].items():
                label = suite.label + BASE_SUFFIX
                add(Score(label, metric, value, reference[1], suite.examples_sha256))
        shown = {
            "candidate": candidate.as_metrics(),
            "base": None if reference is None else reference[0],
            "samples": candidate.samples,
            "examples_sha256": suite.examples_sha256,
        }
        recorded.result[suite.name] = shown
        message = _event(suite, candidate, reference, origin)
        recorded.events.append((message, {"capability": {"suite": suite.name, **shown}}))
    return recorded


def _reference(
    store: CapabilityStore,
    base_record: BaseModelRecord,
    suite: Suite,
    base: EvalMetrics | None,
    actor: Actor,
    how: Mapping[str, Any],
) -> tuple[tuple[dict[str, float], int] | None, str]:
    """The base's (metrics, sample count) on the suite, and where they came from."""
    if base is None:
        if suite.reference is None:
            return None, "not measured"
        when = suite.reference.created_at.strftime("%Y-%m-%d %H:%M UTC")
        return (suite.reference.metrics, suite.reference.sample_count), f"reference of {when}"
    try:
        store.set_reference(
            base_record,
            suite.name,
            base.as_metrics(),
            actor,
            sample_count=base.samples,
            examples_sha256=suite.examples_sha256,
            details=how,
        )
    except Conflict:
        return None, "the suite was replaced while this job ran; its reference is not stored"
    return (base.as_metrics(), base.samples), "measured now"


def _shown(metrics: Mapping[str, float]) -> str:
    parts = []
    if "exact_match" in metrics:
        parts.append(f"exact match {100 * metrics['exact_match']:.1f} %")
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.3f}")
    return ", ".join(parts)


def _event(
    suite: Suite,
    candidate: EvalMetrics,
    reference: tuple[dict[str, float], int] | None,
    origin: str,
) -> str:
    head = (
        f"Capability suite {suite.name} ({candidate.samples} examples, eval suite "
        f"{suite.label}): {_shown(candidate.as_metrics())}"
    )
    if reference is None:
        return f"{head}; the base alone: {origin}"
    return f"{head}; the base alone: {_shown(reference[0])} ({origin})"
