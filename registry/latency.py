"""The usage book's coarse latency histogram: fixed buckets, counts as a JSON list.

Fixed bounds make histograms of any gateway, day or version addable bucket by bucket,
so the book stays a set of sums; a quantile read from them is as precise as the bucket
it falls in (interpolated within it, as Prometheus's ``histogram_quantile`` does).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

BOUNDS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip
"""Upper bounds (seconds) of the buckets; one more bucket holds everything above the last."""
SIZE = len(BOUNDS) + 1


def bucket(seconds: float) -> int:
    """The index of the bucket ``seconds`` falls in (a value on a bound is in that bucket)."""
    return bisect.bisect_left(BOUNDS, seconds)


def added(counts: Iterable[Sequence[int] | None]) -> list[int]:
    """The bucket-by-bucket sum of histograms (None, or a shorter list, adds nothing)."""
    total = [0] * SIZE
    for histogram in counts:
        for index, count in enumerate((histogram or [])[:SIZE]):
            total[index] += count
    return total


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of the histogram, or None when it counts nothing.

    Linear within the bucket it falls in; in the overflow bucket, the last bound (so the
    answer is then a lower bound of the true value).
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[index - 1] if index else 0.0
            return lower + (BOUNDS[index] - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]
