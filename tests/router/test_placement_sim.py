"""The placement simulator (bench/placement.py): its maths and a short run of each policy."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from router import Policy

BENCH = Path(__file__).resolve().parents[2] / "bench" / "placement.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_placement", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = load_bench()
SMALL = bench.SimConfig(adapters=200, replicas=4, slots=8, warmup=1000, requests=4000)


def test_zipf_weights_are_normalised_and_decreasing() -> None:
    weights = bench.zipf_weights(1000, 1.1)
    assert sum(weights) == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(weights))
    assert weights[0] / weights[9] == pytest.approx(10**1.1)


def test_hit_ceiling_is_the_top_mass() -> None:
    weights = [0.5, 0.1, 0.3, 0.1]
    assert bench.hit_ceiling(weights, 2) == pytest.approx(0.8)
    assert bench.hit_ceiling(weights, 10) == pytest.approx(1.0)


def test_slots_for_ceiling_reaches_the_target_and_no_fewer_do() -> None:
    weights = bench.zipf_weights(1000, 1.1)
    slots = bench.slots_for_ceiling(weights, 8, 0.95)
    assert bench.hit_ceiling(weights, 8 * slots) >= 0.95
    assert bench.hit_ceiling(weights, 8 * (slots - 1)) < 0.95


def test_lru_ceiling_counts_only_after_warmup() -> None:
    draws = ["a", "b", "a", "c", "a", "b"]
    # capacity 2: a b a(hit) c(evicts b) a(hit) b(miss); counted from index 2: 2 hits of 4.
    assert bench.lru_ceiling(draws, 2, 2) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def results() -> dict[Policy, Any]:
    draws = bench.draw_adapters(SMALL)
    return {
        policy: bench.simulate(SMALL, bench.Scenario(policy.value, policy), draws)
        for policy in Policy
    }


def test_affinity_beats_load_only_policies_on_hits(results: dict[Policy, Any]) -> None:
    affinity = results[Policy.AFFINITY]
    for other in (Policy.ROUND_ROBIN, Policy.LEAST_LOADED):
        assert affinity.hit_rate > results[other].hit_rate + 0.1


def test_figures_are_consistent(results: dict[Policy, Any]) -> None:
    for result in results.values():
        assert 0.0 <= result.hit_rate <= 1.0
        assert result.loads_per_1k == pytest.approx(1000 * (1 - result.hit_rate))
        assert result.busy_max_mean >= 1.0
    assert results[Policy.ROUND_ROBIN].served_max_mean == pytest.approx(1.0)


def test_runs_are_seeded(results: dict[Policy, Any]) -> None:
    again = bench.simulate(
        SMALL, bench.Scenario("affinity", Policy.AFFINITY), bench.draw_adapters(SMALL)
    )
    assert again.hit_rate == results[Policy.AFFINITY].hit_rate


def test_main_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "placement.json"
    assert bench.main(["--requests", "500", "--warmup", "200", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["results"]][:3] == [p.value for p in Policy]
    assert "ceiling" in report["verdict"]
    assert "affinity c=1.25" in capsys.readouterr().out
