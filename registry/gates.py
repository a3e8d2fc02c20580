"""Promotion gates: eval thresholds a version must meet before it becomes production."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, col, select

from registry.models import EvalResult, PromotionGate


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

    @classmethod
    def from_row(cls, row: PromotionGate) -> Gate:
        return cls(row.suite, row.metric, row.min_value, row.max_regression, row.higher_is_better)


def latest_value(session: Session, version_id: int, suite: str, metric: str) -> float | None:
    row = session.exec(
        select(EvalResult)
        .where(EvalResult.version_id == version_id, EvalResult.suite == suite)
        .where(EvalResult.metric == metric)
        .order_by(col(EvalResult.id).desc())
    ).first()
    return None if row is None else row.value


def _worse(value: float, bound: float, higher_is_better: bool) -> bool:
    return value < bound if higher_is_better else value > bound


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
        label = f"{gate.suite}/{gate.metric}"
        value = latest_value(session, candidate_id, gate.suite, gate.metric)
        if value is None:
            failures.append(f"{label}: version {candidate} has no eval result; evaluate it first")
            continue
        if gate.min_value is not None and _worse(value, gate.min_value, gate.higher_is_better):
            word = "minimum" if gate.higher_is_better else "maximum"
            failures.append(f"{label}: {value:g} misses the {word} {gate.min_value:g}")
        if gate.max_regression is None or production_id is None:
            continue
        baseline = latest_value(session, production_id, gate.suite, gate.metric)
        if baseline is None:
            continue  # nothing to compare against: production predates the gate
        sign = -1 if gate.higher_is_better else 1
        bound = baseline + sign * gate.max_regression
        if _worse(value, bound, gate.higher_is_better):
            failures.append(
                f"{label}: {value:g} is worse than production version {production}'s "
                f"{baseline:g} by more than the tolerance {gate.max_regression:g}"
            )
    return failures
