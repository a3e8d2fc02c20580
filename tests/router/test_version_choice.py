"""Choosing the adapter version: aliases, pins, the canary split and its stickiness."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import (
    AliasTarget,
    Choice,
    ModelRef,
    NoServableVersion,
    RefKind,
    RoutingView,
    VersionState,
    VersionView,
    canary_bucket,
    choose_version,
)

BARE = ModelRef(RefKind.ADAPTER, "bot")
KEYS = [f"user-{i}" for i in range(10_000)]


def version(number: int, state: VersionState = VersionState.ACTIVE) -> VersionView:
    return VersionView(number, f"lx-{number:016x}", "base-fp", state)


def view(
    aliases: dict[str, AliasTarget], states: dict[int, VersionState] | None = None
) -> RoutingView:
    states = states or {}
    versions = {n: version(n, states.get(n, VersionState.ACTIVE)) for n in (1, 2, 3)}
    return RoutingView("bot", versions, aliases)


def canary_view(weight: float) -> RoutingView:
    return view({"production": AliasTarget(1), "canary": AliasTarget(2, weight)})


def canary_share(routing: RoutingView, keys: list[str]) -> float:
    labels = [choose_version(routing, BARE, key).label for key in keys]
    return labels.count("canary") / len(labels)


def test_bare_name_resolves_production() -> None:
    choice = choose_version(view({"production": AliasTarget(2)}), BARE, "k")
    assert choice == Choice(version(2), "production")


def test_pinned_version_bypasses_aliases_and_split() -> None:
    ref = ModelRef(RefKind.PINNED, "bot", version=3)
    for key in KEYS[:200]:
        assert choose_version(canary_view(1.0), ref, key) == Choice(version(3), "pinned")


def test_explicit_alias_bypasses_split() -> None:
    routing = canary_view(0.0)
    choice = choose_version(routing, ModelRef(RefKind.ALIAS, "bot", alias="canary"), "k")
    assert choice == Choice(version(2), "canary")
    routing = view({"production": AliasTarget(1), "staging": AliasTarget(3)})
    choice = choose_version(routing, ModelRef(RefKind.ALIAS, "bot", alias="staging"), "k")
    assert choice == Choice(version(3), "staging")


@pytest.mark.parametrize("state", [VersionState.RETIRED, VersionState.ARCHIVED])
def test_withdrawn_versions_are_never_chosen(state: VersionState) -> None:
    routing = view({"production": AliasTarget(1), "old": AliasTarget(2)}, {2: state})
    with pytest.raises(NoServableVersion, match="list its versions"):
        choose_version(routing, ModelRef(RefKind.PINNED, "bot", version=2), "k")
    with pytest.raises(NoServableVersion):
        choose_version(routing, ModelRef(RefKind.ALIAS, "bot", alias="old"), "k")
    routing = view({"production": AliasTarget(2)}, {2: state})
    with pytest.raises(NoServableVersion):
        choose_version(routing, BARE, "k")


def test_withdrawn_canary_falls_back_to_production() -> None:
    routing = view(
        {"production": AliasTarget(1), "canary": AliasTarget(2, 1.0)},
        {2: VersionState.RETIRED},
    )
    assert {choose_version(routing, BARE, key).label for key in KEYS[:500]} == {"production"}


def test_missing_version_or_alias_raises() -> None:
    routing = view({"production": AliasTarget(1)})
    with pytest.raises(NoServableVersion, match="version 9"):
        choose_version(routing, ModelRef(RefKind.PINNED, "bot", version=9), "k")
    with pytest.raises(NoServableVersion, match="no alias 'beta'"):
        choose_version(routing, ModelRef(RefKind.ALIAS, "bot", alias="beta"), "k")
    with pytest.raises(NoServableVersion, match="promote a version"):
        choose_version(view({"canary": AliasTarget(2, 0.5)}), BARE, "k")


def test_refs_naming_no_adapter_are_refused() -> None:
    with pytest.raises(ValueError, match="names no adapter version"):
        choose_version(canary_view(0.5), ModelRef(RefKind.BASE, "x"), "k")


@pytest.mark.parametrize("weight", [0.01, 0.1, 0.25, 0.5, 0.9])
def test_canary_share_is_within_tolerance(weight: float) -> None:
    # 10,000 keys: the binomial standard deviation is at most 0.005; allow 4 of them.
    assert canary_share(canary_view(weight), KEYS) == pytest.approx(weight, abs=0.02)


@pytest.mark.parametrize(("weight", "expected"), [(0.0, 0.0), (1.0, 1.0)])
def test_canary_share_extremes_are_exact(weight: float, expected: float) -> None:
    assert canary_share(canary_view(weight), KEYS) == expected


def test_same_key_always_lands_on_the_same_side() -> None:
    routing = canary_view(0.3)
    first = [choose_version(routing, BARE, key).label for key in KEYS[:2000]]
    again = [choose_version(routing, BARE, key).label for key in KEYS[:2000]]
    assert first == again


def test_split_is_independent_per_adapter() -> None:
    a = [canary_bucket("bot-a", key) < 0.5 for key in KEYS]
    b = [canary_bucket("bot-b", key) < 0.5 for key in KEYS]
    agreement = sum(x == y for x, y in zip(a, b, strict=True)) / len(KEYS)
    assert agreement == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_bucket_agrees_across_processes(hash_seed: str) -> None:
    # Python's hash() differs per process; gateways behind a load balancer must agree.
    code = "from router import canary_bucket; print(repr(canary_bucket('bot', 'alice')))"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert float(out.stdout) == canary_bucket("bot", "alice")


@given(
    key=st.text(max_size=40),
    low=st.floats(min_value=0.0, max_value=1.0),
    high=st.floats(min_value=0.0, max_value=1.0),
)
def test_raising_the_weight_never_moves_a_key_off_the_canary(
    key: str, low: float, high: float
) -> None:
    low, high = sorted((low, high))
    on_low = choose_version(canary_view(low), BARE, key).label == "canary"
    on_high = choose_version(canary_view(high), BARE, key).label == "canary"
    assert on_high or not on_low


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_alias_weight_outside_unit_interval_is_refused(weight: float) -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        AliasTarget(1, weight)
