"""The noisy-neighbour benchmark's own logic: its flood prompts and its verdict."""

from __future__ import annotations

import random
from typing import Any

from bench.noisy_neighbour import NoisyConfig, flood_body, result


def test_flood_prompts_differ_from_their_first_characters() -> None:
    rng = random.Random(7)
    prompts = [flood_body(50, rng)["prompt"] for _ in range(20)]
    assert len({p[:16] for p in prompts}) == 20  # no two share a prefix-cache block
    assert all(len(p.split()) == 51 for p in prompts)


def _phase(p50: float, p99: float) -> dict[str, Any]:
    return {"quiet_ttft": {"p50_ms": p50, "p99_ms": p99}}


def test_the_verdict_compares_fairness_on_with_alone() -> None:
    phases = {"alone": _phase(10, 20), "flood_fairness_on": _phase(20, 29)}
    met = result({"default_engine": {"phases": phases}}, NoisyConfig(), 900)
    assert met["met"] and "1.45x" in met["verdict"]
    phases["flood_fairness_on"] = _phase(20, 31)
    missed = result({"default_engine": {"phases": phases}}, NoisyConfig(), 900)
    assert not missed["met"] and "NOT MET" in missed["verdict"]
    assert missed["engines"]["default_engine"]["ratio_to_alone"]["flood_fairness_on"]["p50"] == 2
