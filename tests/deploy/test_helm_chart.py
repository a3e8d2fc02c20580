"""The Helm chart (deploy/helm/loraplex) renders, lints, validates, and stays in step with
the kustomize manifests.

Each ``values-SETUP.yaml`` renders (with the release name and namespace the README
installs with) the very objects of ``deploy/k8s/overlays/SETUP``: the same kinds and
names, and field for field the same specs (images, commands, env, ports, probes,
resources, security contexts, volumes and their size limits, selectors), the chart's
Helm-only labels, hook annotations and config checksums aside. So a change to one that
the other lacks fails here. On top of that, every check the overlays get (schemas in
strict mode, ServiceMonitors against their CRD subset, Services, references, policies,
settings, engine flags, bases) runs again on the chart's own renders.
"""

from __future__ import annotations

from inspect import signature
from typing import Any

import pytest
import test_k8s
import test_k8s_bases
import test_k8s_redis
from deploy_paths import K8S, OVERLAYS
from helm_render import (
    HELM_LABELS,
    SETUPS,
    comparable,
    differences,
    helm,
    label_problems,
    lint_errors,
    render_chart,
    setup_values,
)
from manifests import (
    Obj,
    containers,
    env_names,
    key,
    of_kind,
    pod_spec,
    render,
    schema_errors,
    workloads,
)

# Every check the kustomize overlays get, collected again here, where `fleet` and `fleets`
# are the chart's renders: a check added there covers the chart with no change here.
globals().update(
    {
        name: check
        for module in (test_k8s, test_k8s_bases, test_k8s_redis)
        for name, check in vars(module).items()
        if name.startswith("test_") and {"fleet", "fleets"} & signature(check).parameters.keys()
    }
)
redis = test_k8s_redis.redis  # the fixture the Redis checks take


@pytest.fixture(scope="module", params=SETUPS)
def fleet(request: pytest.FixtureRequest) -> list[Obj]:
    """Every object one values file renders, for each values file in turn."""
    return render_chart(setup_values(request.param))


@pytest.fixture(scope="module")
def fleets() -> dict[str, list[Obj]]:
    """Every values file's objects, by setup name."""
    return {setup: render_chart(setup_values(setup)) for setup in SETUPS}


def test_helm_renders_with_helms_own_engine() -> None:
    """Not a stand-in: the bundled library is Helm v4's Go SDK."""
    assert helm().helm_sdk_version().startswith("v4.")


def test_every_overlay_has_a_values_file_and_back() -> None:
    assert SETUPS == OVERLAYS


@pytest.mark.parametrize("setup", SETUPS)
def test_chart_lints_clean(setup: str) -> None:
    errors = lint_errors(setup_values(setup))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("setup", SETUPS)
def test_chart_renders_the_objects_of_its_overlay(setup: str, fleets: dict[str, list[Obj]]) -> None:
    chart = {key(o): o for o in fleets[setup]}
    kustomize = {key(o): o for o in render(K8S / "overlays" / setup)}
    assert sorted(chart) == sorted(kustomize), "the chart and the overlay render other objects"
    problems: list[str] = []
    for name, obj in kustomize.items():
        problems += label_problems(chart[name], obj)
        problems += [
            f"{name}: {line}"
            for line in differences(
                comparable(chart[name], from_chart=True), comparable(obj, from_chart=False)
            )
        ]
    assert not problems, f"values-{setup}.yaml and overlays/{setup} differ:\n" + "\n".join(problems)


def test_the_chart_labels_every_object_as_its_release(fleet: list[Obj]) -> None:
    for obj in fleet:
        assert obj["metadata"]["labels"].keys() >= HELM_LABELS, key(obj)


def test_the_migration_runs_after_install_and_before_each_upgrade(fleet: list[Obj]) -> None:
    (job,) = of_kind(fleet, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"


def with_values(**overrides: Any) -> list[Obj]:
    """The small setup's objects with ``overrides`` (top-level keys) merged in."""
    values = setup_values("small")
    for name, value in overrides.items():
        values[name] = values.get(name, {}) | value if isinstance(value, dict) else value
    return render_chart(values)


def test_switching_off_secrets_monitors_and_policies_leaves_valid_objects() -> None:
    objects = with_values(
        secrets={"create": False},
        monitoring={"serviceMonitors": False},
        networkPolicy={"enabled": False},
        migrate={"enabled": False},
    )
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Secret", "ServiceMonitor", "NetworkPolicy", "Job"}, kinds
    errors = schema_errors(objects)
    assert not errors, "\n".join(errors)


def test_another_release_name_prefixes_every_object_and_reference() -> None:
    objects = with_values(fullnameOverride="lp")
    assert all(o["metadata"]["name"].startswith("lp-") for o in objects)
    config = next(o for o in objects if o["metadata"]["name"] == "lp-config")["data"]
    assert config["LORAPLEX_ENGINE_DISCOVERY"] == "dns://lp-engine-pods:8000"
    errors = schema_errors(objects)
    assert not errors, "\n".join(errors)
    claims = {c["metadata"]["name"] for c in of_kind(objects, "PersistentVolumeClaim")}
    for workload in workloads(objects):
        spec = pod_spec(workload)
        for container in containers(spec):
            env_names(container, objects)  # raises for a ConfigMap or Secret not rendered
        for volume in spec["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, key(workload)


@pytest.mark.parametrize(
    "second",
    [
        {"name": "base", "suffix": "-b", "servedModelName": "other"},
        {"name": "other", "suffix": "", "servedModelName": "other"},
        {"name": "other", "servedModelName": "base"},
    ],
    ids=["name", "suffix", "served-name"],
)
def test_two_bases_sharing_a_name_suffix_or_served_name_do_not_render(
    second: dict[str, str],
) -> None:
    values = setup_values("two-bases")
    values["bases"] = [values["bases"][0], second]
    with pytest.raises(helm().HelmError, match="two bases share"):
        render_chart(values)
