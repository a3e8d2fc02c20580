"""Replica health: ejection after consecutive failures, readmission by probes only."""

from __future__ import annotations

import pytest

from router import HealthConfig, ReplicaHealth, Transition

CONFIG = HealthConfig(eject_after=3, readmit_after=2, probe_interval=5.0)


def ejected(now: float = 0.0) -> ReplicaHealth:
    health = ReplicaHealth(CONFIG, now)
    for _ in range(CONFIG.eject_after):
        health.record_request(False, now)
    assert not health.healthy
    return health


def test_ejects_after_n_consecutive_failures_of_any_kind() -> None:
    health = ReplicaHealth(CONFIG, 0.0)
    assert health.record_request(False, 1.0) is None
    assert health.record_probe(False, 2.0) is None
    assert health.record_request(False, 3.0) is Transition.EJECTED
    assert not health.healthy
    assert health.changed_at == 3.0


def test_a_success_resets_the_failure_count() -> None:
    health = ReplicaHealth(CONFIG, 0.0)
    for now in range(10):
        health.record_request(False, now)
        health.record_request(False, now)
        assert health.record_request(True, now) is None
    assert health.healthy


def test_readmits_after_m_consecutive_good_probes() -> None:
    health = ejected()
    assert health.record_probe(True, 10.0) is None
    assert health.record_probe(True, 15.0) is Transition.READMITTED
    assert health.healthy
    assert health.changed_at == 15.0


def test_a_failed_probe_restarts_readmission() -> None:
    health = ejected()
    health.record_probe(True, 10.0)
    health.record_probe(False, 15.0)
    assert health.record_probe(True, 20.0) is None
    assert health.record_probe(True, 25.0) is Transition.READMITTED


def test_late_request_results_do_not_readmit_or_count() -> None:
    health = ejected()
    for _ in range(5):
        assert health.record_request(True, 1.0) is None
    assert not health.healthy
    health.record_probe(True, 10.0)
    health.record_request(False, 11.0)  # a straggler's error must not reset the probe streak
    assert health.record_probe(True, 15.0) is Transition.READMITTED


def test_readmitted_replica_needs_n_fresh_failures_to_be_ejected_again() -> None:
    health = ejected()
    health.record_probe(True, 10.0)
    health.record_probe(True, 15.0)
    assert health.record_request(False, 16.0) is None
    assert health.record_request(False, 17.0) is None
    assert health.record_request(False, 18.0) is Transition.EJECTED


def test_probe_due_follows_the_injected_clock() -> None:
    health = ReplicaHealth(CONFIG, 0.0)
    assert health.probe_due(0.0)
    health.record_probe(True, 100.0)
    assert not health.probe_due(104.9)
    assert health.probe_due(105.0)


def test_can_start_ejected() -> None:
    health = ReplicaHealth(CONFIG, 0.0, healthy=False)
    health.record_probe(True, 1.0)
    assert health.record_probe(True, 2.0) is Transition.READMITTED


@pytest.mark.parametrize(
    "kwargs",
    [{"eject_after": 0}, {"readmit_after": 0}, {"probe_interval": 0.0}],
)
def test_config_refuses_impossible_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        HealthConfig(**kwargs)  # type: ignore[arg-type]


def test_an_unreachable_replica_is_ejected_at_once_and_readmitted_by_probes() -> None:
    health = ReplicaHealth(HealthConfig(eject_after=3, readmit_after=2), now=0.0)
    assert health.record_unreachable(1.0) is Transition.EJECTED
    assert not health.healthy
    assert health.record_unreachable(1.5) is None  # already out
    assert health.record_probe(True, 2.0) is None
    assert health.record_probe(True, 3.0) is Transition.READMITTED
