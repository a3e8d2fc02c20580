"""The routing benchmark's in-process part and its report lines (``bench.routing``); its
gateway and engine parts run in ``make bench``."""

from __future__ import annotations

from typing import Any

import router
from bench.routing import RoutingBenchConfig, messages, rules_policy, summary_lines, time_rules


def test_the_policy_has_twelve_rules_that_parse_and_the_messages_reach_several() -> None:
    policy = router.RoutingPolicy.from_json(rules_policy(("b", "s", "a")))
    assert len(policy.rules) == 12
    decided = [policy.by_rules(text) for text in messages()]
    rules_hit = {d.rule for d in decided if d is not None}
    assert len(rules_hit) >= 6 and any(d is None for d in decided)


def test_the_rules_timing_reports_every_decision() -> None:
    timed = time_rules(RoutingBenchConfig(passes=1))
    assert timed["decisions"] == timed["messages"] == 300
    assert sum(timed["matched"].values()) == 300
    assert 0 < timed["by_rules_us"]["p50_us"] <= timed["by_rules_us"]["p99_us"]


def _latency(p50: float, p99: float) -> dict[str, float]:
    return {"count": 40, "p50_ms": p50, "p99_ms": p99}


def test_summary_lines_name_each_measurement() -> None:
    rules = time_rules(RoutingBenchConfig(passes=1))
    side = {"p50_ms": 0.3, "p99_ms": 5.0, "cpu_us_per_request": 250.0}
    micro: dict[str, Any] = {
        "medians": {"direct": side, "routed": {**side, "cpu_us_per_request": 300.0}},
        "added_by_routing": {"p50_ms": 0.1, "p99_ms": 0.2, "cpu_us_per_request": 50.0},
    }
    modes = ("direct", "classifier_alone", "routed_no_cache", "routed_cached")
    engine: dict[str, Any] = {
        "latency": {m: _latency(100.0 + i, 120.0 + i) for i, m in enumerate(modes)},
        "added_by_routing": {
            m: {"p50_ms": 2.0, "p99_ms": 3.0, "paired_median_ms": 1.5}
            for m in ("routed_no_cache", "routed_cached")
        },
    }
    lines = summary_lines(rules, micro, engine)
    assert len(lines) == 5 and "CPU +50 µs" in lines[1] and "added p50 +2.0" in lines[3]


def test_the_engine_report_pairs_each_round_with_its_direct_request() -> None:
    from bench.routing import MODES, Sample, _engine_report

    seconds = {"direct": 0.1, "classifier_alone": 0.05, "routed_no_cache": 0.16}
    samples = {
        m: [Sample(seconds.get(m, 0.1) + i / 100, "t", "classifier", 10) for i in range(5)]
        for m in MODES
    }
    report = _engine_report(samples, "label", "label.", 60.0, ("t", "d", "c"))
    added = report["added_by_routing"]
    assert round(added["routed_no_cache"]["paired_median_ms"], 6) == 60.0
    assert round(added["routed_cached"]["paired_median_ms"], 6) == 0.0
    assert report["completion_tokens"]["direct"] == [10]
