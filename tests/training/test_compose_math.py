"""Adapter composition (``training.compose``): PEFT's math from the stored files alone,
validation, the rank cap, and the registry path (tenant's own parents, one base,
provenance, gates)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from registry import BaseModelRecord, Gate, GateFailed, Registry, Tenant
from tests.registry.registry_testdata import build_adapter
from tests.training.conftest import ADMIN
from tests.training.peft_compose import peft_composed_model, peft_deltas
from tests.training.training_testdata import TINY_BASE
from training.compose import (
    METHODS,
    CompositionRejected,
    CompositionSpec,
    LoadedAdapter,
    Parent,
    combine,
    compose,
    default_rank,
)
from training.demo_base import build_demo_base

WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def parents(chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two stock PEFT adapters of different ranks on partly different modules."""
    root = tmp_path_factory.mktemp("parents")
    a = build_adapter(chat_base, root / "a", seed=1, r=8, target_modules=["q_proj", "v_proj"])
    b = build_adapter(chat_base, root / "b", seed=2, r=4, target_modules=["q_proj", "o_proj"])
    return [a, b]


def spec_for(method: str, **fields: object) -> CompositionSpec:
    values: dict[str, object] = {"density": 0.5} if method != "linear" else {}
    values.update(fields)
    parents = [Parent("a", 1, WEIGHTS[0]), Parent("b", 1, WEIGHTS[1])]
    return CompositionSpec(parents, method, **values)  # type: ignore[arg-type]


def deltas(adapter: LoadedAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b) in adapter.modules().items():
        out[module] = (b @ a) * adapter.scaling(module, a.shape[0])
    return out


def assert_same_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-4, atol=1e-5, msg=module)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_equals_peft_add_weighted_adapter(
    method: str, parents: list[Path], chat_base: Path
) -> None:
    loaded = [LoadedAdapter.load(p) for p in parents]
    spec = spec_for(method, seed=11) if method.startswith("dare") else spec_for(method)
    rank = default_rank(loaded, max_rank=64)
    assert rank == 12  # 8 + 4: under the serving rank, so no more than the sum
    composed = combine(loaded, list(WEIGHTS), spec, rank)
    assert {t.shape[0] for n, t in composed.tensors.items() if "lora_A" in n} == {rank}
    assert (composed.config["r"], composed.config["lora_alpha"]) == (rank, rank)
    assert composed.config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    reference = peft_deltas(peft_composed_model(chat_base, parents, spec, rank))
    assert_same_deltas(deltas(composed), reference)


def test_linear_is_the_exact_weighted_sum_of_the_deltas(parents: list[Path]) -> None:
    loaded = [LoadedAdapter.load(p) for p in parents]
    composed = deltas(combine(loaded, list(WEIGHTS), spec_for("linear"), 12))
    a, b = (deltas(p) for p in loaded)
    want = {m: WEIGHTS[0] * a.get(m, 0) + WEIGHTS[1] * b.get(m, 0) for m in a.keys() | b.keys()}
    assert_same_deltas(composed, want)  # type: ignore[arg-type]


def test_a_rank_below_the_sum_is_the_best_approximation_and_peft_s(
    parents: list[Path], chat_base: Path
) -> None:
    loaded = [LoadedAdapter.load(p) for p in parents]
    assert default_rank(loaded, max_rank=8) == 8  # the sum, 12, is capped at the serving rank
    spec = spec_for("linear", target_rank=4)
    composed = combine(loaded, list(WEIGHTS), spec, 4)
    exact = deltas(combine(loaded, list(WEIGHTS), spec, 12))
    for module, delta in deltas(composed).items():
        assert torch.linalg.matrix_rank(delta) <= 4
        top = torch.linalg.svdvals(exact[module])[:4]
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], top, rtol=1e-4, atol=1e-5)
    assert_same_deltas(
        deltas(composed), peft_deltas(peft_composed_model(chat_base, parents, spec, 4))
    )


def test_dare_is_reproducible_by_its_seed_and_leaves_torch_s_random_state(
    parents: list[Path],
) -> None:
    loaded = [LoadedAdapter.load(p) for p in parents]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    runs = [combine(loaded, list(WEIGHTS), spec_for("dare_ties", seed=s), 12) for s in (5, 5, 6)]
    assert torch.equal(torch.random.get_rng_state(), state)
    first, again, other = (r.tensors for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_every_problem_of_a_spec_is_reported_at_once() -> None:
    spec = CompositionSpec(
        [Parent("a", 1, float("nan")), Parent("a", 1, 0.5)],
        "magic",
        density=0.5,
        seed=3,
        target_rank=65,
        majority_sign_method="total",
    )
    assert spec.problems(max_rank=64) == [
        "parent a@1 is listed more than once; give each version once",
        "parent a@1: weight nan is not a finite number",
        "method 'magic' is not one of linear, ties, dare_linear, dare_ties",
        "density is used only by ties, dare_linear, dare_ties",
        "seed is used only by dare_linear, dare_ties",
        "majority_sign_method is used only by ties, dare_ties",
        "target_rank 65 must be between 1 and the serving rank 64",
    ]
    assert spec_for("ties", density=None).problems(64) == ["method ties needs a density in (0, 1]"]
    assert spec_for("dare_linear", density=1.5).problems(64) == [
        "density 1.5 must be in (0, 1] (the share kept)"
    ]
    lonely = CompositionSpec([Parent("a", 1, 1.0)], "ties", density=0.5, majority_sign_method="x")
    assert lonely.problems(64) == [
        "give 2 to 16 parents, not 1",
        "majority_sign_method 'x' is not one of total, frequency",
    ]


# -- through the registry -----------------------------------------------------------


@pytest.fixture
def pushed(registry: Registry, tenant: Tenant, base: BaseModelRecord, parents: list[Path]) -> int:
    assert tenant.id is not None
    for name, path in zip("ab", parents, strict=True):
        registry.push_adapter(tenant.id, name, path, base.name, ADMIN)
    return tenant.id


def test_a_composition_is_the_next_version_with_its_recipe(
    registry: Registry, pushed: int, parents: list[Path], tmp_path: Path
) -> None:
    spec = spec_for("ties", majority_sign_method="frequency")
    version = compose(registry, pushed, "mix", spec, ADMIN, description="a and b")
    assert (version.number, version.rank, version.alpha) == (1, 12, 12.0)
    parent_prints = [registry.get_version(pushed, n, 1).fingerprint for n in "ab"]
    assert version.composition == {
        "method": "ties",
        "peft_combination_type": "ties_svd",
        "density": 0.5,
        "seed": None,
        "majority_sign_method": "frequency",
        "target_rank": 12,
        "parents": [
            {"adapter": n, "version": 1, "weight": w, "fingerprint": f}
            for n, w, f in zip("ab", WEIGHTS, parent_prints, strict=True)
        ],
    }
    assert registry.get_adapter(pushed, "mix").description == "a and b"  # type: ignore[union-attr]
    stored = LoadedAdapter.load(registry.fetch_version(version.lora_name, tmp_path / "cache"))
    loaded = [LoadedAdapter.load(p) for p in parents]
    assert_same_deltas(deltas(stored), deltas(combine(loaded, list(WEIGHTS), spec, 12)))
    again = compose(registry, pushed, "mix", spec, ADMIN)  # content-addressed: the same version
    assert again.number == 1 and len(registry.list_versions(pushed, "mix")) == 1


def test_a_foreign_parent_is_refused_like_an_unknown_one_and_nothing_is_written(
    registry: Registry, pushed: int, base: BaseModelRecord, parents: list[Path]
) -> None:
    other = registry.create_tenant("globex", ADMIN)
    assert other.id is not None
    registry.push_adapter(other.id, "secret", parents[0], base.name, ADMIN)
    answers = []
    for name in ("secret", "nothing"):
        spec = CompositionSpec([Parent("a", 1, 0.5), Parent(name, 1, 0.5)])
        with pytest.raises(CompositionRejected) as refused:
            compose(registry, pushed, "mix", spec, ADMIN)
        answers.append(refused.value.problems)
    assert answers[0] == [
        "parent secret@1: adapter 'secret' does not exist; list your adapters to see the names"
    ]
    assert answers[1] == [answers[0][0].replace("secret", "nothing")]
    spec = CompositionSpec([Parent("a", 1, 0.5), Parent("b", 9, 0.5)], "ties", target_rank=0)
    with pytest.raises(CompositionRejected) as refused:
        compose(registry, pushed, "lx-bad", spec, ADMIN)
    assert len(refused.value.problems) == 4  # density, rank, name and the missing version
    assert "parent b@9: adapter 'b' has no version 9; list its versions" in refused.value.problems
    assert registry.get_adapter(pushed, "mix") is None
    assert registry.audit_log(action="adapter.push")[-1].subject.startswith("adapter:globex/")


def test_parents_on_different_bases_are_refused(
    registry: Registry, pushed: int, tmp_path: Path
) -> None:
    second = build_demo_base(tmp_path / "second", replace(TINY_BASE, num_layers=2), progress=False)
    other = registry.register_base(second, "tiny-chat-2", "r1", ADMIN)
    adapter = build_adapter(second, tmp_path / "c", seed=9, r=4, target_modules=["q_proj"])
    registry.push_adapter(pushed, "c", adapter, other.name, ADMIN)
    spec = CompositionSpec([Parent("a", 1, 0.5), Parent("c", 1, 0.5)])
    with pytest.raises(CompositionRejected, match="pinned to different bases"):
        compose(registry, pushed, "mix", spec, ADMIN)


def test_a_gated_adapter_s_composed_version_needs_passing_evals(
    registry: Registry, pushed: int
) -> None:
    first = compose(registry, pushed, "mix", spec_for("linear"), ADMIN)
    registry.promote(pushed, "mix", first.number, ADMIN)
    registry.set_gates(pushed, "mix", [Gate("held-out", "exact_match", min_value=0.9)], ADMIN)
    spec = CompositionSpec([Parent("a", 1, 0.2), Parent("b", 1, 0.8)])
    second = compose(registry, pushed, "mix", spec, ADMIN)
    assert second.number == 2
    with pytest.raises(GateFailed):
        registry.promote(pushed, "mix", 2, ADMIN)
    registry.add_eval_result(pushed, "mix", 2, "held-out", "exact_match", 0.95, ADMIN)
    assert registry.promote(pushed, "mix", 2, ADMIN).number == 2
