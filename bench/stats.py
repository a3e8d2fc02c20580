"""Percentiles and summaries of latency samples (pure functions, tested on their own)."""

from __future__ import annotations

import math
from collections.abc import Sequence


class NoSamples(ValueError):
    """A percentile of an empty sample was asked for; run the workload longer or check errors."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    The same definition as ``numpy.percentile(..., method="linear")``, so figures
    can be checked against numpy.
    """
    if not values:
        raise NoSamples("percentile of no samples: the run recorded no successful request")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of samples given in seconds, reported in milliseconds."""
    if not values_s:
        return {"count": 0}
    ms = [v * 1000 for v in values_s]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": sum(ms) / len(ms),
    }


def added(target: dict[str, float], baseline: dict[str, float], key: str) -> float | None:
    """``target[key] - baseline[key]`` where both exist: the latency a hop adds."""
    if key not in target or key not in baseline:
        return None
    return target[key] - baseline[key]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator
