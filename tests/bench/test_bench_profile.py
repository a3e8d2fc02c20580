"""Folding py-spy's raw output into inclusive/self shares and library buckets."""

from __future__ import annotations

import pytest

from bench.profile_gateway import by_library, category, fold

RAW = [
    "main (server/cli.py:1);send (httpx/_client.py:9);write (asyncio/selector_events.py:1057) 6",
    "main (server/cli.py:1);handle (server/inference.py:152) 3",
    "main (server/cli.py:1);pool (httpcore/_async/connection_pool.py:1) 1",
    "garbage line",
]


def test_fold_counts_inclusive_and_self_samples() -> None:
    total, inclusive, own = fold(RAW)
    assert total == 10
    assert inclusive["main (server/cli.py:1)"] == 10
    assert own["handle (server/inference.py:152)"] == 3
    assert own["write (asyncio/selector_events.py:1057)"] == 6


def test_library_buckets_charge_the_innermost_known_frame() -> None:
    shares = by_library(RAW)
    assert shares["socket write (syscall, runs loopback TCP)"] == pytest.approx(0.6)
    assert shares["server (loraplex)"] == pytest.approx(0.3)
    assert shares["httpcore"] == pytest.approx(0.1)
    assert list(shares) == sorted(shares, key=lambda k: -shares[k])
    assert category(["x (selectors.py:468)"]) == "idle (epoll)"
    assert category(["mystery (nowhere.py:1)"]) == "other"
    assert category(["f (server/app.py:1)", "JoinedWrites.flush (server/app.py:447)"]) == (
        "socket write (syscall, runs loopback TCP)"
    )
    assert category(["Runner.run (asyncio/runners.py:118)"]).startswith("event loop in C")
    assert by_library([]) == {}
