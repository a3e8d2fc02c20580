"""Whether a finished job's version is clearly better than what clients get today.

With no promotion gates on the adapter, a job promotes its version only when it beats
both the bare base and the current production version on the job's own held-out test
split by a clear margin (gates, when the adapter has any, decide instead). A job that
learned nothing otherwise replaces a working adapter, or ships one that answers like the
base, as production.

Which metric decides depends on the task. When the reference answers repeat (a fixed
taxonomy, a fixed format: at most half of them distinct), exact match is what the user
wants, and a lower loss alone proves little: an adapter that answers the same label to
every prompt lowers the loss by learning the format. Otherwise (free-form answers, which
exact match rarely scores) the answer loss decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from training.evaluate import BASE, CANDIDATE, EvalMetrics

EXACT_MATCH_MARGIN = 0.05
"""Exact match must beat the base's and production's by this much (5 points)."""
LOSS_MARGIN = 0.05
"""Where loss decides, it must be this share (5 %) lower than the base's and production's."""


@dataclass(frozen=True)
class Verdict:
    better: bool
    """True when the candidate beats every reference by the margin."""
    summary: str
    """The numbers compared and the rule, for the job's events."""


def exact_match_decides(answers: Sequence[str]) -> bool:
    """True when the reference answers repeat: at most half of them are distinct."""
    return bool(answers) and 2 * len(set(answers)) <= len(answers)


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def verdict(metrics: Mapping[str, EvalMetrics], by_exact_match: bool) -> Verdict:
    """Compare the candidate with the base and (if scored) production in ``metrics``."""
    candidate = metrics.get(CANDIDATE)
    if candidate is None or candidate.samples == 0:
        return Verdict(False, "no held-out test split to compare on; add more examples")
    others = {name: m for name, m in metrics.items() if name != CANDIDATE}
    both = "both" if len(others) > 1 else BASE
    if by_exact_match:
        # Shares of the same sample count: 0.95 - 0.90 must count as 5 points, not 4.99...
        better = all(
            candidate.exact_match - m.exact_match >= EXACT_MATCH_MARGIN - 1e-9
            for m in others.values()
        )
        shown = ", ".join(f"{name} {_percent(m.exact_match)}" for name, m in others.items())
        head = f"exact match {_percent(candidate.exact_match)}"
        rule = f"≥ +{100 * EXACT_MATCH_MARGIN:g} points over {both}"
    else:
        better = all(candidate.loss <= m.loss * (1 - LOSS_MARGIN) for m in others.values())
        shown = ", ".join(f"{name} {m.loss:.3f}" for name, m in others.items())
        head = f"loss {candidate.loss:.3f}"
        rule = f"≥ {100 * LOSS_MARGIN:g} % lower than {both}"
    needs = "clears" if better else "needs"
    summary = f"{head} on {candidate.samples} held-out examples, {shown}; {needs} {rule}"
    return Verdict(better, summary)
