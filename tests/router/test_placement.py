"""Replica ordering: affinity with bounded loads, round-robin, least-loaded, failover."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import HashRing, NoReplica, PlacementConfig, Placer, Policy, Replica

ADAPTERS = [f"lx-{i:016x}" for i in range(1000)]


def fleet(n: int, base: str = "base-a", healthy: bool = True) -> list[Replica]:
    return [Replica(f"{base}-r{i}", base, healthy=healthy) for i in range(n)]


def first_choice(placer: Placer, replicas: list[Replica], adapter: str) -> str:
    return placer.candidates(replicas, "base-a", adapter)[0].id


replica_st = st.builds(
    Replica,
    id=st.sampled_from([f"r{i}" for i in range(12)]),
    base_fingerprint=st.sampled_from(["base-a", "base-b", "base-c"]),
    healthy=st.booleans(),
    in_flight=st.integers(min_value=0, max_value=40),
    resident=st.frozensets(st.sampled_from(ADAPTERS[:5]), max_size=3),
)
fleet_st = st.lists(replica_st, max_size=12, unique_by=lambda r: r.id)


@pytest.mark.parametrize("policy", list(Policy))
@given(
    replicas=fleet_st,
    base=st.sampled_from(["base-a", "base-b", "base-c"]),
    adapter=st.sampled_from([None, *ADAPTERS[:5]]),
)
def test_candidates_are_exactly_the_healthy_replicas_of_the_base(
    policy: Policy, replicas: list[Replica], base: str, adapter: str | None
) -> None:
    placer = Placer(PlacementConfig(policy=policy))
    expected = {r.id for r in replicas if r.healthy and r.base_fingerprint == base}
    if not expected:
        with pytest.raises(NoReplica):
            placer.candidates(replicas, base, adapter)
        return
    got = [r.id for r in placer.candidates(replicas, base, adapter)]
    assert len(got) == len(set(got))
    assert set(got) == expected


def test_no_replica_messages_tell_configured_from_ejected() -> None:
    placer = Placer()
    with pytest.raises(NoReplica, match="no engine replica serves base"):
        placer.candidates(fleet(2, "base-b"), "base-a", ADAPTERS[0])
    with pytest.raises(NoReplica, match="all 2 engine replica"):
        placer.candidates(fleet(2, healthy=False), "base-a", ADAPTERS[0])


def test_affinity_sends_an_adapter_to_the_same_home_every_time() -> None:
    placer, replicas = Placer(), fleet(8)
    for adapter in ADAPTERS[:100]:
        homes = {first_choice(placer, replicas, adapter) for _ in range(5)}
        assert len(homes) == 1


def test_affinity_homes_spread_over_replicas() -> None:
    placer, replicas = Placer(), fleet(8)
    homes = Counter(first_choice(placer, replicas, adapter) for adapter in ADAPTERS)
    assert set(homes) == {r.id for r in replicas}
    assert max(homes.values()) <= 1.5 * len(ADAPTERS) / 8
    assert min(homes.values()) >= 0.5 * len(ADAPTERS) / 8


def test_ejecting_a_replica_moves_only_its_adapters() -> None:
    placer, replicas = Placer(), fleet(8)
    before = {a: first_choice(placer, replicas, a) for a in ADAPTERS}
    replicas[3] = replace(replicas[3], healthy=False)
    after = {a: first_choice(placer, replicas, a) for a in ADAPTERS}
    moved = {a for a in ADAPTERS if before[a] != after[a]}
    assert moved == {a for a in ADAPTERS if before[a] == replicas[3].id}


def test_affinity_prefers_a_replica_where_the_adapter_is_resident() -> None:
    placer, replicas = Placer(), fleet(4)
    adapter = ADAPTERS[7]
    order = [r.id for r in placer.candidates(replicas, "base-a", adapter)]
    warm = order[2]
    replicas = [replace(r, resident=frozenset({adapter})) if r.id == warm else r for r in replicas]
    got = [r.id for r in placer.candidates(replicas, "base-a", adapter)]
    assert got == [warm, *(rid for rid in order if rid != warm)]


def test_affinity_spreads_over_warm_replicas_by_load() -> None:
    placer, replicas = Placer(), fleet(4)
    adapter = ADAPTERS[3]
    order = [r.id for r in placer.candidates(replicas, "base-a", adapter)]
    # 16 in flight: bound = ceil(1.25 * 17 / 4) = 6, so all four are under it.
    loads = {order[0]: 5, order[1]: 3, order[2]: 4, order[3]: 4}
    warm = {order[0], order[1], order[2]}
    replicas = [
        replace(r, in_flight=loads[r.id], resident=frozenset({adapter} if r.id in warm else ()))
        for r in replicas
    ]
    got = [r.id for r in placer.candidates(replicas, "base-a", adapter)]
    assert got == [order[1], order[2], order[0], order[3]]


def test_affinity_skips_overloaded_home_and_keeps_it_last() -> None:
    placer, replicas = Placer(), fleet(4)
    adapter = ADAPTERS[11]
    order = [r.id for r in placer.candidates(replicas, "base-a", adapter)]
    # Home holds 10 of 10 in flight: bound = ceil(1.25 * 11 / 4) = 4.
    replicas = [
        replace(r, in_flight=10, resident=frozenset({adapter})) if r.id == order[0] else r
        for r in replicas
    ]
    got = [r.id for r in placer.candidates(replicas, "base-a", adapter)]
    assert got == [*order[1:], order[0]]


@pytest.mark.parametrize("load_factor", [1.0, 1.25, 2.0])
@given(
    requests=st.lists(st.sampled_from(ADAPTERS[:50]), min_size=1, max_size=300),
    n=st.integers(min_value=1, max_value=9),
)
def test_bounded_load_is_never_exceeded_as_requests_pile_up(
    load_factor: float, requests: list[str], n: int
) -> None:
    placer = Placer(PlacementConfig(load_factor=load_factor))
    loads = dict.fromkeys((f"base-a-r{i}" for i in range(n)), 0)
    for total, adapter in enumerate(requests, start=1):
        replicas = [Replica(rid, "base-a", in_flight=load) for rid, load in loads.items()]
        loads[placer.candidates(replicas, "base-a", adapter)[0].id] += 1
        assert max(loads.values()) <= math.ceil(load_factor * total / n)


@given(
    events=st.lists(
        st.tuples(st.booleans(), st.sampled_from(ADAPTERS[:20]), st.integers(0, 7)), max_size=300
    )
)
def test_bounded_load_holds_at_each_assignment_with_departures(
    events: list[tuple[bool, str, int]],
) -> None:
    placer = Placer()
    loads = [0] * 8
    for arrives, adapter, pick in events:
        if not arrives:
            busy = [i for i, load in enumerate(loads) if load]
            if busy:
                loads[busy[pick % len(busy)]] -= 1
            continue
        replicas = [Replica(f"r{i}", "base-a", in_flight=load) for i, load in enumerate(loads)]
        chosen = int(placer.candidates(replicas, "base-a", adapter)[0].id[1:])
        assert loads[chosen] + 1 <= math.ceil(1.25 * (sum(loads) + 1) / 8)
        loads[chosen] += 1


def test_round_robin_rotates_through_healthy_replicas() -> None:
    placer = Placer(PlacementConfig(policy=Policy.ROUND_ROBIN))
    replicas = fleet(3)
    replicas[1] = replace(replicas[1], healthy=False)
    firsts = [placer.candidates(replicas, "base-a", ADAPTERS[0])[0].id for _ in range(4)]
    assert firsts == ["base-a-r0", "base-a-r2", "base-a-r0", "base-a-r2"]


def test_least_loaded_orders_by_in_flight() -> None:
    placer = Placer(PlacementConfig(policy=Policy.LEAST_LOADED))
    replicas = [Replica(f"r{i}", "base-a", in_flight=load) for i, load in enumerate([5, 1, 3])]
    assert [r.id for r in placer.candidates(replicas, "base-a", ADAPTERS[0])] == ["r1", "r2", "r0"]


def test_least_loaded_spreads_ties() -> None:
    placer = Placer(PlacementConfig(policy=Policy.LEAST_LOADED))
    replicas = fleet(4)
    firsts = Counter(placer.candidates(replicas, "base-a", None)[0].id for _ in range(40))
    assert set(firsts.values()) == {10}


def test_affinity_sends_base_requests_to_the_least_loaded() -> None:
    replicas = [Replica(f"r{i}", "base-a", in_flight=load) for i, load in enumerate([4, 2, 9])]
    assert Placer().candidates(replicas, "base-a", None)[0].id == "r1"


def test_ring_orders_every_replica_once() -> None:
    ring = HashRing(["a", "b", "c", "d"], virtual_nodes=10)
    for adapter in ADAPTERS[:50]:
        assert sorted(ring.order(adapter)) == [0, 1, 2, 3]


def test_ring_order_does_not_depend_on_listing_order() -> None:
    ids = [f"r{i}" for i in range(6)]
    forward, backward = HashRing(ids, 50), HashRing(ids[::-1], 50)
    for adapter in ADAPTERS[:50]:
        assert [ids[i] for i in forward.order(adapter)] == [
            ids[::-1][i] for i in backward.order(adapter)
        ]


@pytest.mark.parametrize(
    ("ids", "match"), [(["a", "a"], "must be unique"), ([], "at least one replica")]
)
def test_ring_refuses_bad_replica_sets(ids: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HashRing(ids, 10)


def test_config_refuses_impossible_values() -> None:
    with pytest.raises(ValueError, match="below 1"):
        PlacementConfig(load_factor=0.9)
    with pytest.raises(ValueError, match="at least 1"):
        PlacementConfig(virtual_nodes=0)
