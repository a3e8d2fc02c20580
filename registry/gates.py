"""Promotion gates: eval thresholds a version must meet before it becomes production."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlmodel import Session, col, select

from registry.capability import reference_value, suite_name
from registry.errors import InvalidRequest
from registry.models import AdapterVersion, EvalResult, PromotionGate

TOLERANCE = 1e-9
"""Shares of one sample count compare exactly: 0.56 - 0.05 must not miss 0.51 by 1e-17."""


@dataclass(frozen=True)
class Gate:
    """One promotion gate of an adapter."""

    suite: str
    """Eval suite the result must come from."""
    metric: str
    """Metric within the suite."""
    min_value: float | None = None
    """Threshold the value must reach (a maximum when ``higher_is_better`` is False)."""
    max_regression: float | None = None
    """How much worse than the current production version's value the candidate may be."""
    higher_is_better: bool = True
    """Direction of the metric."""
    max_below_base: float | None = None
    """How much worse than the base alone's reference value the candidate may be, on a
    capability suite (``suite`` is ``capability:<name>``; ``registry.capability``). The
    gate fails while the base has no reference there (a job on the base measures it). A
    negative margin asks the candidate to beat the base by that much."""

    def __post_init__(self) -> None:
        for name in ("min_value", "max_regression", "max_below_base"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidRequest(f"gate {self.label}: {name} must be a finite number")
        if self.max_below_base is not None and suite_name(self.suite) is None:
            raise InvalidRequest(
                f"gate {self.label}: max_below_base applies to capability suites only "
                "(suite 'capability:<name>'), whose base reference it compares with"
            )

    @property
    def label(self) -> str:
        return f"{self.suite}/{self.metric}"

    @classmethod
    def from_row(cls, row: PromotionGate) -> Gate:
        return cls(
            row.suite,
            row.metric,
            row.min_value,
            row.max_regression,
            row.higher_is_better,
            row.max_below_base,
        )


def latest_value(session: Session, version_id: int, suite: str, metric: str) -> float | None:
    row = session.exec(
        select(EvalResult)
        .where(EvalResult.version_id == version_id, EvalResult.suite == suite)
        .where(EvalResult.metric == metric)
        .order_by(col(EvalResult.id).desc())
    ).first()
    return None if row is None else row.value


def _worse(value: float, bound: float, higher_is_better: bool) -> bool:
    if higher_is_better:
        return value < bound - TOLERANCE
    return value > bound + TOLERANCE


def _bound(reference: float, margin: float, higher_is_better: bool) -> float:
    return reference - margin if higher_is_better else reference + margin


def gate_failures(
    session: Session,
    gates: list[Gate],
    candidate_id: int,
    candidate: int,
    production_id: int | None,
    production: int | None,
) -> list[str]:
    """Every gate the candidate version fails, as messages naming the numbers involved."""
    failures = []
    for gate in gates:
        label = gate.label
        value = latest_value(session, candidate_id, gate.suite, gate.metric)
        if value is None:
            failures.append(f"{label}: version {candidate} has no eval result; evaluate it first")
            continue
        if gate.min_value is not None and _worse(value, gate.min_value, gate.higher_is_better):
            word = "minimum" if gate.higher_is_better else "maximum"
            failures.append(f"{label}: {value:g} misses the {word} {gate.min_value:g}")
        if gate.max_below_base is not None:
            failures.extend(_below_base(session, gate, candidate_id, value))
        if gate.max_regression is None or production_id is None:
            continue
        baseline = latest_value(session, production_id, gate.suite, gate.metric)
        if baseline is None:
            continue  # nothing to compare against: production predates the gate
        bound = _bound(baseline, gate.max_regression, gate.higher_is_better)
        if _worse(value, bound, gate.higher_is_better):
            failures.append(
                f"{label}: {value:g} is worse than production version {production}'s "
                f"{baseline:g} by more than the tolerance {gate.max_regression:g}"
            )
    return failures


def _below_base(session: Session, gate: Gate, candidate_id: int, value: float) -> list[str]:
    """The failure of ``gate.max_below_base`` for the candidate's ``value``, if it fails."""
    assert gate.max_below_base is not None
    version = session.get(AdapterVersion, candidate_id)
    assert version is not None
    reference = reference_value(session, version.base_id, gate.suite, gate.metric)
    if reference is None:
        return [
            f"{gate.label}: the base has no reference {gate.metric} on {gate.suite}; measure "
            "the base first (a fine-tuning job on the base measures it)"
        ]
    if not _worse(value, _bound(reference, gate.max_below_base, gate.higher_is_better),
                  gate.higher_is_better):  # fmt: skip
        return []
    word = "below" if gate.higher_is_better else "above"
    return [
        f"{gate.label}: {value:g} is {word} the base's {reference:g} by more than "
        f"{gate.max_below_base:g}"
    ]
