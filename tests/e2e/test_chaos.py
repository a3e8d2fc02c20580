"""A short chaos soak: ``make chaos``'s run, cut to a minute and a quarter of kills.

The ``make fleet`` topology (two bases, an engine and a worker each, two
gateways, SeaweedFS) on a PostgreSQL cluster and a Redis of the test's own,
under traffic from three tenants, while every few seconds a gateway, an
engine, a worker or Redis is killed, or PostgreSQL or SeaweedFS restarted
(every kind at least once). Every check of ``server.dev.chaos`` must find
nothing: no answer from another tenant's adapter or from a version no alias
pointed at, no acknowledged write lost, no half-registered version, every job
ended or running cleanly, every failure clean and retryable in time, and the
fleet whole within 60 s of the last kill.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from server.dev.chaos import ChaosConfig, soak, summary, table, verdicts
from server.dev.fleet import SMALL_BASE
from tests import reliability
from tests.e2e.serving import REPO

KINDS = {"gateway", "engine", "worker", "redis", "postgresql", "s3"}
EVIDENCE = REPO / ".loraplex" / "chaos-test"
"""Where the last run's records and logs stay (pytest rotates its own directories away)."""


def keep_evidence(home: Path) -> None:
    """What a failed check needs looking into: every request, fault, expected text and log."""
    shutil.rmtree(EVIDENCE, ignore_errors=True)
    EVIDENCE.mkdir(parents=True)
    for kept in ("records.json", "expected.json", "fleet/logs"):
        if (home / kept).is_dir():
            shutil.copytree(home / kept, EVIDENCE / kept)
        elif (home / kept).is_file():
            shutil.copy(home / kept, EVIDENCE / kept)


@pytest.mark.reliability
def test_a_minute_of_kills_under_traffic_breaks_nothing(
    demo_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.demo_base import build_demo_base

    small = build_demo_base(REPO / ".loraplex" / "demo-base-small", SMALL_BASE)
    # Not tmp_path: as root the cluster runs as the postgres user, and pytest's
    # directories are private to root.
    home = Path(tempfile.mkdtemp(prefix="loraplex-chaos-"))
    config = ChaosConfig(1.25, 16, home, [demo_base, small], home / "chaos.json")
    try:
        run = soak(config)
        found = verdicts(run)
        figures = summary(run, found)
        with capsys.disabled():
            print(f"\n[chaos] {figures['requests']} {figures['outcomes']}\n{table(found)}")
            print(f"[chaos] records and logs kept in {EVIDENCE}")
    finally:
        keep_evidence(home)
        shutil.rmtree(home, ignore_errors=True)
    for v in found:
        reliability.record(
            "chaos", f"{v.check} (75 s of kills)", v.tried, v.unit, v.bad, v.bad_means
        )

    assert {f.target.split("-")[0] for f in run.faults} >= KINDS
    assert figures["outcomes"].get("ok", 0) > 100, figures
    served = {c.op for c in run.calls if c.acknowledged}
    assert served >= {"chat", "completion", "stream", "upload", "promote", "job"}, served
    assert all(v.bad == 0 for v in found), table(found)
