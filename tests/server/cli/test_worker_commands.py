"""``loraplex worker``'s queue flags reach the job store whose reaper applies them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import sqlalchemy.exc

from registry import LocalBlobStore, Registry
from server.cli.worker_commands import add_commands, job_store


def test_the_attempts_and_staleness_flags_are_the_ones_the_reaper_applies(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["worker", "--once", "--stale-after", "1", "--max-attempts", "50"])
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    try:
        store = job_store(registry, args)
    finally:
        registry.close()
    assert (store.max_attempts, store.stale_after.total_seconds()) == (50, 1.0)
    defaults = job_store(registry, parser.parse_args(["worker"]))
    assert (defaults.max_attempts, defaults.stale_after.total_seconds()) == (3, 120.0)


def test_a_worker_started_during_a_database_outage_waits_for_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import worker_commands

    waits: list[float] = []
    monkeypatch.setattr(worker_commands.time, "sleep", waits.append)
    attempts = iter([True, True, False])

    def open_registry() -> str:  # a narrow fake: down twice (the driver's error), then up
        if next(attempts):
            raise sqlalchemy.exc.OperationalError("connect", {}, Exception("refused"))
        return "registry"

    assert worker_commands._wait_for(open_registry) == "registry"
    assert waits == [1.0, 2.0]  # backing off
    assert capsys.readouterr().err.count("registry database unavailable") == 2
