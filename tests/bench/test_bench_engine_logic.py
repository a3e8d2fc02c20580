"""Pure parts of the engine benchmarks: request mixes, cold-start verdicts, metric deltas."""

from __future__ import annotations

from collections import Counter

from bench import cold_start, multi_adapter


def test_uniform_mix_uses_every_adapter_equally() -> None:
    names = [f"a{i}" for i in range(8)]
    counts = Counter(multi_adapter.models_for(names, 64, "uniform", 1.1, seed=1))
    assert counts == dict.fromkeys(names, 8)


def test_zipf_mix_prefers_the_first_adapters() -> None:
    names = [f"a{i}" for i in range(32)]
    counts = Counter(multi_adapter.models_for(names, 20_000, "zipf", 1.1, seed=1))
    harmonic = sum((k + 1) ** -1.1 for k in range(32))
    assert abs(counts["a0"] / 20_000 - 1 / harmonic) < 0.02
    assert counts["a0"] > counts["a1"] > counts["a7"] > counts["a31"]


def _rows(cold: float, warm: float) -> list[dict[str, float | None]]:
    return [
        {"cold_ttft_s": cold, "warm_ttft_s": warm, "engine_fetch_s": None},
        {"cold_ttft_s": cold, "warm_ttft_s": warm, "engine_fetch_s": 0.01},
    ]


def _direct(load: float, first: float, warm: float) -> list[dict[str, float]]:
    return [{"load_call_s": load, "first_ttft_s": first, "warm_ttft_s": warm}]


STEPS = {
    "gateway_lookup_s": 0.001,
    "resolver_lookup_s": 0.001,
    "fetch_local_dir_s": 0.05,
    "fetch_s3_s": 0.08,
    "hash_check_s": 0.002,
    "bundle_bytes": 100_000,
}


def test_cold_start_verdict_allows_twenty_percent_plus_the_fetch() -> None:
    # vLLM direct penalty: 0.2 load + (0.15 - 0.05) first-request extra = 0.3 s.
    budget = 1.2 * 0.3 + 0.05
    met = cold_start.summarize(_rows(0.05 + budget - 0.01, 0.05), _direct(0.2, 0.15, 0.05), STEPS)
    assert abs(met["penalty_vllm_direct_s"] - 0.3) < 1e-9
    assert abs(met["target_budget_s"] - budget) < 1e-9
    assert met["verdict"].endswith(" met")
    missed = cold_start.summarize(
        _rows(0.05 + budget + 0.01, 0.05), _direct(0.2, 0.15, 0.05), STEPS
    )
    assert missed["verdict"].endswith("NOT MET")
    assert any("engine-side fetch" in line for line in missed["summary_lines"])


def test_fetch_metric_delta_sums_histogram_sums_only() -> None:
    before = {'loraplex_adapter_fetch_seconds_sum{store="local"}': 1.0}
    after = {
        'loraplex_adapter_fetch_seconds_sum{store="local"}': 1.5,
        'loraplex_adapter_fetch_seconds_count{store="local"}': 3.0,
        "loraplex_adapter_fetch_seconds_sum": 0.25,
    }
    assert cold_start._metric_delta(before, after) == 0.75
    assert cold_start._metric_delta({}, {}) is None
