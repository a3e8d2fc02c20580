"""Placement at fleet scale (issue 9, item 4), driving the real ``router.placement`` code.

1,000 adapters with Zipf(1.1) popularity, 8 replicas with 32 resident adapter
slots each (LRU eviction per replica). Requests arrive as a Poisson stream;
each occupies its replica for an exponential service time, plus a load penalty
when the adapter was not resident, so in-flight load is real and misses cost
capacity. Reported per policy, after a warm-up: resident-hit rate, adapter
loads per 1,000 requests, and max/mean replica load three ways (requests
served, busy time, and the instantaneous in-flight spread seen by arrivals).

The hit-rate ceiling printed beside the results is the popularity mass of the
top ``replicas x slots`` adapters: no placement that keeps each adapter on one
replica can beat it. Run: ``.venv/bin/python bench/placement.py`` (seeded).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import platform
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from router import PlacementConfig, Placer, Policy

RESULTS = Path(__file__).resolve().parent / "results" / "placement.json"
BASE = "sim-base"
HIT_TARGET = 0.95
LOAD_TARGET = 1.25


@dataclass(frozen=True)
class SimConfig:
    """One simulated fleet and workload."""

    adapters: int = 1000
    """Distinct adapters, ranked by popularity."""
    zipf_s: float = 1.1
    """Zipf exponent: adapter k is requested with weight k**-s."""
    replicas: int = 8
    """Engine replicas, all serving the same base."""
    slots: int = 32
    """Resident adapter slots per replica (LRU eviction)."""
    mean_in_flight: float = 8.0
    """Offered load: mean requests in flight per replica if nothing missed."""
    service_time: float = 1.0
    """Mean service time of a request (exponential), in simulated seconds."""
    load_penalty: float = 0.5
    """Extra service time when the adapter had to be loaded (a miss)."""
    warmup: int = 20_000
    """Requests simulated before counting starts (fills the caches)."""
    requests: int = 100_000
    """Requests counted."""
    seed: int = 2026
    """Seed for arrivals, adapter draws and service times."""


@dataclass(frozen=True)
class Scenario:
    """A policy to simulate on a fleet."""

    label: str
    """Row label in the table."""
    policy: Policy
    """Placement policy under test."""
    load_factor: float = 1.25
    """Affinity's bound c."""
    slots: int | None = None
    """Override of the fleet's slots per replica."""


@dataclass(frozen=True)
class Result:
    """Measured figures of one scenario."""

    label: str
    policy: str
    load_factor: float
    slots: int
    hit_rate: float
    hit_ceiling: float
    lru_ceiling: float
    loads_per_1k: float
    served_max_mean: float
    busy_max_mean: float
    in_flight_max_mean: float
    seconds: float


class SimReplica:
    """A replica as placement sees it, mutated by the simulator."""

    __slots__ = ("base_fingerprint", "busy", "healthy", "id", "in_flight", "resident", "served")

    def __init__(self, index: int) -> None:
        self.id = f"replica-{index}"
        self.base_fingerprint = BASE
        self.healthy = True
        self.in_flight = 0
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.served = 0
        self.busy = 0.0

    def use(self, adapter: str, slots: int) -> bool:
        """Serve ``adapter`` here; returns whether it was already resident."""
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            return True
        self.resident[adapter] = None
        if len(self.resident) > slots:
            self.resident.popitem(last=False)
        return False


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised popularity of ranks 1..n."""
    raw = [k**-s for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def hit_ceiling(weights: Sequence[float], resident_total: int) -> float:
    """Best hit rate when each adapter lives on one replica: the top-``resident_total`` mass."""
    return sum(sorted(weights, reverse=True)[:resident_total])


def slots_for_ceiling(weights: Sequence[float], replicas: int, target: float) -> int:
    """Fewest slots per replica whose ceiling reaches ``target``."""
    ranked = sorted(weights, reverse=True)
    cumulative = itertools.accumulate(ranked)
    needed = next((i + 1 for i, mass in enumerate(cumulative) if mass >= target), len(ranked))
    return -(-needed // replicas)


def draw_adapters(config: SimConfig) -> list[str]:
    """The engine-side adapter names of all requests, warm-up first, drawn by popularity."""
    weights = zipf_weights(config.adapters, config.zipf_s)
    names = [f"lx-{rank:016x}" for rank in range(config.adapters)]
    total = config.warmup + config.requests
    rng = random.Random(config.seed)
    return rng.choices(names, cum_weights=list(itertools.accumulate(weights)), k=total)


def lru_ceiling(draws: Sequence[str], warmup: int, capacity: int) -> float:
    """Hit rate of ONE shared LRU cache of ``capacity`` adapters over the counted requests.

    Engines evict LRU, so no placement over LRU caches of the same total size
    does much better (a perfect partition behaves like one shared LRU).
    """
    cache: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for n, adapter in enumerate(draws):
        if adapter in cache:
            cache.move_to_end(adapter)
            hits += n >= warmup
            continue
        cache[adapter] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return hits / (len(draws) - warmup)


def slots_for_lru_ceiling(
    draws: Sequence[str], warmup: int, replicas: int, target: float, most: int
) -> int:
    """Fewest slots per replica (up to ``most``) whose LRU ceiling reaches ``target``."""
    low, high = 1, most
    while low < high:
        middle = (low + high) // 2
        if lru_ceiling(draws, warmup, middle * replicas) >= target:
            high = middle
        else:
            low = middle + 1
    return low


def simulate(config: SimConfig, scenario: Scenario, draws: Sequence[str]) -> Result:
    """Run one scenario through ``router.Placer`` on requests for ``draws`` and measure it."""
    started = time.perf_counter()
    slots = scenario.slots or config.slots
    rng = random.Random(config.seed + 1)
    weights = zipf_weights(config.adapters, config.zipf_s)
    placer = Placer(PlacementConfig(policy=scenario.policy, load_factor=scenario.load_factor))
    fleet = [SimReplica(i) for i in range(config.replicas)]
    rate = config.mean_in_flight * config.replicas / config.service_time
    completions: list[tuple[float, int]] = []
    now, hits, spread = 0.0, 0, 0.0
    for n, adapter in enumerate(draws):
        now += rng.expovariate(rate)
        while completions and completions[0][0] <= now:
            fleet[heapq.heappop(completions)[1]].in_flight -= 1
        counted = n >= config.warmup
        if counted:
            spread += _spread(fleet)
        replica = placer.candidates(fleet, BASE, adapter)[0]
        hit = replica.use(adapter, slots)
        duration = rng.expovariate(1 / config.service_time) + (0.0 if hit else config.load_penalty)
        replica.in_flight += 1
        heapq.heappush(completions, (now + duration, fleet.index(replica)))
        if counted:
            hits += hit
            replica.served += 1
            replica.busy += duration
    return Result(
        label=scenario.label,
        policy=scenario.policy.value,
        load_factor=scenario.load_factor,
        slots=slots,
        hit_rate=hits / config.requests,
        hit_ceiling=hit_ceiling(weights, slots * config.replicas),
        lru_ceiling=lru_ceiling(draws, config.warmup, slots * config.replicas),
        loads_per_1k=1000 * (config.requests - hits) / config.requests,
        served_max_mean=_max_over_mean([r.served for r in fleet]),
        busy_max_mean=_max_over_mean([r.busy for r in fleet]),
        in_flight_max_mean=spread / config.requests,
        seconds=time.perf_counter() - started,
    )


def _spread(fleet: Sequence[SimReplica]) -> float:
    loads = [r.in_flight for r in fleet]
    return _max_over_mean(loads) if any(loads) else 1.0


def _max_over_mean(values: Sequence[float]) -> float:
    return max(values) * len(values) / sum(values)


def scenarios(config: SimConfig, draws: Sequence[str]) -> list[Scenario]:
    """The issue's policies, affinity's bound swept, and the slots the hit target needs."""
    weights = zipf_weights(config.adapters, config.zipf_s)
    static = slots_for_ceiling(weights, config.replicas, HIT_TARGET)
    lru = slots_for_lru_ceiling(
        draws, config.warmup, config.replicas, HIT_TARGET, most=config.adapters
    )
    return [
        Scenario("affinity c=1.25", Policy.AFFINITY),
        Scenario("round-robin", Policy.ROUND_ROBIN),
        Scenario("least-loaded", Policy.LEAST_LOADED),
        Scenario("affinity c=1.1", Policy.AFFINITY, load_factor=1.1),
        Scenario("affinity c=1.5", Policy.AFFINITY, load_factor=1.5),
        Scenario("affinity c=2.0", Policy.AFFINITY, load_factor=2.0),
        Scenario(f"affinity c=1.25, {static} slots", Policy.AFFINITY, slots=static),
        Scenario(f"least-loaded, {static} slots", Policy.LEAST_LOADED, slots=static),
        Scenario(f"affinity c=1.25, {lru} slots", Policy.AFFINITY, slots=lru),
    ]


def table(results: Sequence[Result]) -> str:
    """A plain aligned table of the results."""
    header = (
        "scenario",
        "slots",
        "hit",
        "ceiling",
        "LRU ceil",
        "loads/1k",
        "served",
        "busy",
        "in-flight",
    )
    rows = [
        (
            r.label,
            str(r.slots),
            f"{r.hit_rate:.1%}",
            f"{r.hit_ceiling:.1%}",
            f"{r.lru_ceiling:.1%}",
            f"{r.loads_per_1k:.1f}",
            f"{r.served_max_mean:.3f}",
            f"{r.busy_max_mean:.3f}",
            f"{r.in_flight_max_mean:.3f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))
    return "\n".join([head, "-" * len(head), *lines])


def verdict(config: SimConfig, result: Result) -> str:
    """Whether the issue's target is met by the issue's own configuration, said plainly."""
    met = result.hit_rate >= HIT_TARGET and result.busy_max_mean <= LOAD_TARGET
    return (
        f"target (hit >= {HIT_TARGET:.0%}, max/mean <= {LOAD_TARGET}) with "
        f"{config.replicas}x{config.slots} slots: {'MET' if met else 'NOT MET'} "
        f"(hit {result.hit_rate:.1%}, busy max/mean {result.busy_max_mean:.3f}); "
        f"the ceiling for {config.replicas * config.slots} resident slots is "
        f"{result.hit_ceiling:.1%} (static placement of the most popular adapters), "
        f"{result.lru_ceiling:.1%} with LRU caches (one shared LRU of that size)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=SimConfig.requests)
    parser.add_argument("--warmup", type=int, default=SimConfig.warmup)
    parser.add_argument("--seed", type=int, default=SimConfig.seed)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = replace(SimConfig(), requests=args.requests, warmup=args.warmup, seed=args.seed)
    draws = draw_adapters(config)
    results = [simulate(config, scenario, draws) for scenario in scenarios(config, draws)]
    print(table(results))
    print(verdict(config, results[0]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "placement",
        "command": ".venv/bin/python bench/placement.py",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": asdict(config),
        "targets": {"hit_rate": HIT_TARGET, "max_mean_load": LOAD_TARGET},
        "verdict": verdict(config, results[0]),
        "results": [asdict(r) for r in results],
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
