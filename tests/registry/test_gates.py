"""Promotion gates: thresholds, regression tolerance, admin override in the audit log."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ADMIN
from registry_testdata import BASE_NAME

from registry import (
    Actor,
    BaseModelRecord,
    Gate,
    GateFailed,
    PermissionDenied,
    Registry,
    Tenant,
)
from registry.events import EventLog

USER = Actor("key:7")


@pytest.fixture
def gated(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> int:
    """Tenant id of "bot" (versions 1, 2) gated on accuracy >= 0.5 and loss within 0.1."""
    assert tenant.id is not None
    for key in ("v1", "v2"):
        registry.push_adapter(tenant.id, "bot", adapters[key], BASE_NAME, USER)
    registry.set_gates(tenant.id, "bot", [
        Gate("qa", "accuracy", min_value=0.5),
        Gate("qa", "loss", max_regression=0.1, higher_is_better=False),
    ], USER)  # fmt: skip
    return tenant.id


def _evals(registry: Registry, tenant_id: int, number: int, accuracy: float, loss: float) -> None:
    registry.add_eval_result(tenant_id, "bot", number, "qa", "accuracy", accuracy, USER,
                             sample_count=100, dataset_sha256="e" * 64)  # fmt: skip
    registry.add_eval_result(tenant_id, "bot", number, "qa", "loss", loss, USER)


def test_missing_eval_results_fail_every_gate(registry: Registry, gated: int) -> None:
    with pytest.raises(GateFailed) as caught:
        registry.promote(gated, "bot", 1, USER)
    assert caught.value.failures == [
        "qa/accuracy: version 1 has no eval result; evaluate it first",
        "qa/loss: version 1 has no eval result; evaluate it first",
    ]
    assert registry.aliases(gated, "bot") == {}
    assert registry.audit_log(action="adapter.promote") == []
    # The refusal itself is recorded, as a public event the owner's webhooks can get.
    (event,) = EventLog(registry).read(gated, types=["adapter.gate.failed"])
    assert (event.data["adapter"], event.data["version"], event.data["actor"]) == (
        "bot",
        1,
        "key:7",
    )
    assert event.data["after"]["failed_gates"] == caught.value.failures


def test_thresholds_and_regression_against_production(registry: Registry, gated: int) -> None:
    _evals(registry, gated, 1, accuracy=0.7, loss=1.0)
    registry.promote(gated, "bot", 1, USER)
    _evals(registry, gated, 2, accuracy=0.4, loss=1.25)
    with pytest.raises(GateFailed) as caught:
        registry.promote(gated, "bot", 2, USER)
    assert caught.value.failures == [
        "qa/accuracy: 0.4 misses the minimum 0.5",
        "qa/loss: 1.25 is worse than production version 1's 1 by more than the tolerance 0.1",
    ]
    _evals(registry, gated, 2, accuracy=0.8, loss=1.05)  # the latest result counts
    registry.promote(gated, "bot", 2, USER)
    assert registry.aliases(gated, "bot")["production"].version == 2


def test_only_admins_override_and_the_override_is_audited(registry: Registry, gated: int) -> None:
    with pytest.raises(PermissionDenied, match="only admins may override"):
        registry.promote(gated, "bot", 1, USER, override=True)
    registry.promote(gated, "bot", 1, ADMIN, override=True)
    (event,) = registry.audit_log(action="adapter.promote")
    assert event.actor == ADMIN.name and event.after is not None
    assert event.after["override"] is True
    assert (
        event.after["failed_gates"][0]
        == "qa/accuracy: version 1 has no eval result; evaluate it first"
    )


def test_gates_round_trip_and_can_be_removed(registry: Registry, gated: int) -> None:
    assert registry.get_gates(gated, "bot")[0] == Gate("qa", "accuracy", min_value=0.5)
    registry.set_gates(gated, "bot", [], USER)
    registry.promote(gated, "bot", 1, USER)
    assert [r.value for r in registry.eval_results(gated, "bot", 1)] == []
