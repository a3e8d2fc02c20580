"""The promotion rule: a version must beat the base and production by a clear margin."""

from __future__ import annotations

from training.evaluate import BASE, CANDIDATE, INCUMBENT, EvalMetrics
from training.promotion import exact_match_decides, verdict


def _scores(**exact_and_loss: tuple[float, float]) -> dict[str, EvalMetrics]:
    return {
        name: EvalMetrics(loss, exact, None, 40) for name, (exact, loss) in exact_and_loss.items()
    }


def test_an_adapter_that_answers_one_label_is_not_better_though_its_loss_fell() -> None:
    scores = _scores(candidate=(0.0, 0.4), base=(0.0, 3.1), production=(0.85, 0.2))
    judged = verdict(scores, by_exact_match=True)
    assert not judged.better
    assert judged.summary == (
        "exact match 0.0 % on 40 held-out examples, base 0.0 %, production 85.0 %; "
        "needs ≥ +5 points over both"
    )


def test_exact_match_must_clear_both_by_five_points() -> None:
    assert verdict(_scores(candidate=(0.95, 1.0), base=(0.0, 3.0)), True).better
    close = _scores(**{CANDIDATE: (0.92, 1.0), BASE: (0.0, 3.0), INCUMBENT: (0.9, 1.0)})
    assert not verdict(close, True).better
    assert verdict(
        _scores(candidate=(0.95, 1.0), base=(0.0, 3.0), production=(0.9, 1.0)), True
    ).better


def test_where_loss_decides_it_must_be_five_percent_lower() -> None:
    assert verdict(_scores(candidate=(0.0, 2.8), base=(0.0, 3.0)), False).better
    same = verdict(_scores(candidate=(0.0, 2.9), base=(0.0, 3.0)), False)
    assert not same.better and same.summary.endswith("needs ≥ 5 % lower than base")


def test_no_test_split_is_never_better() -> None:
    assert not verdict({}, True).better
    assert not verdict({BASE: EvalMetrics(1.0, 0.0, None, 0)}, False).better


def test_exact_match_decides_when_the_answers_repeat() -> None:
    assert exact_match_decides(['{"intent": "billing"}', '{"intent": "billing"}'])
    assert exact_match_decides(["a", "b", "a", "b"])
    assert not exact_match_decides(["a", "b", "c", "a"])
    assert not exact_match_decides([])
