"""How the gateway benchmark copes with a noisy host: paired baselines, steal, loop lag."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.gateway import lag_delta, paired_added
from bench.procs import host_cpu, steal_share
from bench.report import _noise_lines


def _run(p50: float, p99: float) -> dict[str, Any]:
    return {"latency": {"count": 100, "p50_ms": p50, "p99_ms": p99}, "host_steal_share": 0.1}


def test_added_latency_is_the_median_of_paired_differences() -> None:
    # The second pair caught a hiccup on both sides: it must not decide the figure.
    repeated = {
        "runs": [_run(1.0, 6.0), _run(9.0, 300.0), _run(1.2, 7.0)],
        "baseline_runs": [_run(0.5, 2.0), _run(8.0, 290.0), _run(0.6, 2.5)],
    }
    assert paired_added(repeated, "p99_ms") == pytest.approx(4.5)
    assert paired_added(repeated, "p50_ms") == pytest.approx(0.6)
    assert paired_added({"runs": [_run(1.0, 2.0)]}, "p99_ms") is None


def test_steal_share_reads_the_steal_column_of_proc_stat() -> None:
    before = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    after = [200, 0, 100, 1600, 0, 0, 0, 150, 0, 0]
    assert steal_share(before, after) == pytest.approx(100 / 1050)
    now = host_cpu()
    assert len(now) >= 8 and 0.0 <= steal_share(now, host_cpu()) <= 1.0


def test_loop_lag_is_reported_as_shares_within_each_bound() -> None:
    before = {0.001: 10.0, 0.005: 10.0, math.inf: 10.0}
    after = {0.001: 90.0, 0.005: 108.0, math.inf: 110.0}
    delta = lag_delta(before, after)
    assert delta["timers"] == 100
    assert delta["share_within_ms"] == {"1": 0.8, "5": 0.98}


def test_the_report_names_host_steal_and_the_loop_lag() -> None:
    gateway = {
        "targets": {
            "loraplex": {
                "closed_1": {"host_steal_share": 0.02},
                "open": {"1000": {"runs": [{"host_steal_share": 0.3}]}},
                "loop_lag_open": {"timers": 200, "share_within_ms": {"1": 0.9, "5": 0.995}},
            }
        }
    }
    text = "\n".join(_noise_lines(gateway))
    assert "30.0% in the worst" in text
    assert "90.0% within 1 ms, 99.5% within 5 ms" in text
