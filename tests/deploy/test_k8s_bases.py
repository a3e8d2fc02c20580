"""Several base models behind the same gateways: each base's pods hang together, and apart.

Each base (``loraplex.dev/base``) has one engine Deployment and its training workers,
which serve and train on the same volume under the same served name; every name is
unique, so each engine's ``/v1/models`` maps to exactly one registered base (what
``server/gateway/bases.py`` asks of it). The ``two-bases`` overlay renders two.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from itertools import permutations

from manifests import (
    Obj,
    base_label,
    claim_mounts,
    component,
    containers,
    key,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    selects,
    workloads,
    written_env,
)

SERVED_NAME = "LORAPLEX_SERVED_MODEL_NAME"


def by_base(fleet: list[Obj], name: str) -> dict[str, list[Obj]]:
    """The workloads of component ``name``, grouped by the base their pods carry."""
    grouped: dict[str, list[Obj]] = defaultdict(list)
    for workload in component(fleet, name):
        grouped[base_label(workload)].append(workload)
    return dict(grouped)


def only_claim(workload: Obj, container: Obj) -> tuple[str, str]:
    """(claim, mount path) of the one model volume ``container`` mounts."""
    mounts = claim_mounts(pod_spec(workload), container)
    assert len(mounts) == 1, f"{key(workload)}/{container['name']} mounts {mounts}"
    return next(iter(mounts.items()))


def served_names(workload: Obj, fleet: list[Obj]) -> set[str | None]:
    return {written_env(c, fleet).get(SERVED_NAME) for c in containers(pod_spec(workload))}


def engine_model_dir(engine: Obj) -> str:
    """The directory the engine's vLLM serves (its ``--model``)."""
    argv = shlex.split(engine["command"][2])
    return argv[argv.index("--model") + 1]


def test_the_two_bases_overlay_serves_two_bases(fleets: dict[str, list[Obj]]) -> None:
    assert len(by_base(fleets["two-bases"], "engine")) == 2
    assert all(len(by_base(fleets[name], "engine")) == 1 for name in ("small", "large"))


def test_each_base_has_one_engine_deployment_and_workers(fleet: list[Obj]) -> None:
    """A base without workers would leave its fine-tuning jobs queued for ever."""
    engines, workers = by_base(fleet, "engine"), by_base(fleet, "worker")
    assert set(engines) == set(workers)
    assert all(len(found) == 1 for found in engines.values()), engines


def test_every_base_is_served_under_a_name_of_its_own(fleet: list[Obj]) -> None:
    """One name per base in all its containers (the init container registers it, vLLM serves
    it, the worker registers it too), and no two bases share one: the gateway maps an
    engine to a base by that name, and refuses traffic to a name registered twice."""
    names = {}
    for base, found in by_base(fleet, "engine").items():
        workers = by_base(fleet, "worker")[base]
        declared = set().union(*(served_names(w, fleet) for w in [*found, *workers]))
        assert len(declared) == 1 and None not in declared, f"base {base}: {declared}"
        names[base] = declared.pop()
    assert len(set(names.values())) == len(names), names


def test_engines_and_workers_of_a_base_use_its_own_weights(fleet: list[Obj]) -> None:
    """vLLM's --model, the registered directory and the worker's LORAPLEX_BASE_MODEL are
    the mount of the same claim, and that claim belongs to that base and to no other."""
    claims = {}
    for base, (engine_workload,) in by_base(fleet, "engine").items():
        spec = pod_spec(engine_workload)
        engine = next(c for c in spec["containers"] if c["name"] == "engine")
        claim, path = only_claim(engine_workload, engine)
        assert engine_model_dir(engine) == path
        for init in spec.get("initContainers", []):
            assert only_claim(engine_workload, init) == (claim, path)
            assert f"bases register {path}" in init["command"][2]
        for worker_workload in by_base(fleet, "worker")[base]:
            worker = pod_spec(worker_workload)["containers"][0]
            worker_claim, worker_path = only_claim(worker_workload, worker)
            assert worker_claim == claim, key(worker_workload)
            assert written_env(worker, fleet).get("LORAPLEX_BASE_MODEL") == worker_path
        assert base_label(named(fleet, "PersistentVolumeClaim", claim)) == base
        claims[base] = claim
    assert len(set(claims.values())) == len(claims), claims


def test_each_workload_selects_its_own_pods_and_no_others(fleet: list[Obj]) -> None:
    """Two Deployments whose selectors overlap fight over each other's pods."""
    for workload in workloads(fleet):
        selector = workload["spec"].get("selector")
        assert selector is None or selects(selector, pod_labels(workload)), key(workload)
    for one, other in permutations(workloads(fleet), 2):
        selector = one["spec"].get("selector")
        if selector is not None:
            assert not selects(selector, pod_labels(other)), f"{key(one)} selects {key(other)}"


def test_disruption_budgets_and_stable_services_cover_one_workload(fleet: list[Obj]) -> None:
    """An engine PDB spanning two bases would let a drain take one base's last engine;
    the per-base ClusterIP Service must not mix bases. The headless Service alone
    (discovery) spans every base's engines."""
    selectors = [(key(p), p["spec"]["selector"]) for p in of_kind(fleet, "PodDisruptionBudget")]
    selectors += [
        (key(s), s["spec"]["selector"])
        for s in of_kind(fleet, "Service")
        if s["spec"].get("clusterIP") != "None"
    ]
    for name, selector in selectors:
        covered = [key(w) for w in workloads(fleet) if selects(selector, pod_labels(w))]
        assert len(covered) == 1, f"{name} selects {covered}"
