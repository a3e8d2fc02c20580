"""Percentile maths of the benchmark reports, checked against numpy."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench.stats import NoSamples, added, percentile, ratio, summarize_ms


@pytest.mark.parametrize("size", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(size: int, q: float) -> None:
    rng = random.Random(size)
    values = [rng.expovariate(1.0) for _ in range(size)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_ignores_input_order() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 25) == 2.0


def test_percentile_of_nothing_says_so() -> None:
    with pytest.raises(NoSamples, match="no successful request"):
        percentile([], 50)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_refuses_q_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], q)


def test_summary_converts_seconds_to_milliseconds() -> None:
    summary = summarize_ms([0.001, 0.002, 0.003])
    assert summary["count"] == 3
    assert summary["p50_ms"] == pytest.approx(2.0)
    assert summary["max_ms"] == pytest.approx(3.0)
    assert summary["mean_ms"] == pytest.approx(2.0)
    assert summarize_ms([]) == {"count": 0}


def test_added_and_ratio_handle_missing_figures() -> None:
    assert added({"p50_ms": 3.0}, {"p50_ms": 1.0}, "p50_ms") == 2.0
    assert added({}, {"p50_ms": 1.0}, "p50_ms") is None
    assert ratio(10.0, 4.0) == 2.5
    assert ratio(None, 4.0) is None
    assert ratio(1.0, 0.0) is None
