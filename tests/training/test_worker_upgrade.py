"""The worker's part in a base upgrade, on the tiny chat bases (SQLite and PostgreSQL):
an evaluation-only job scores the base alone on the very test split a training job on the
same data and seed uses, and registers nothing; a job on a second base for an adapter whose
production version is on the first neither loads that version nor promotes its own; and
the new base's worker alone carries an upgrade through real jobs, its loop's tick stepping it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from registry import Actor, BaseModelRecord
from registry.gates import Gate
from registry.jobs import SUCCEEDED
from registry.models import utcnow
from registry.upgrades import EVALUATION, UpgradeOptions, UpgradeStore
from tests.training.conftest import Bench
from tests.training.training_testdata import TINY_BASE, fixed_answer_records
from training.demo_base import build_demo_base

ADMIN = Actor("test-admin", admin=True)


@pytest.fixture(scope="module")
def second_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    other = dataclasses.replace(TINY_BASE, seed=1)  # other weights, the same shapes
    return build_demo_base(tmp_path_factory.mktemp("second") / "base", other, progress=False)


def test_an_evaluation_job_scores_the_base_alone_on_the_same_test_split(bench: Bench) -> None:
    records = fixed_answer_records(60)
    trained = bench.submit(records)
    bench.worker().run_once()
    evaluation = bench.submit(records, method=EVALUATION)
    assert bench.worker().run_once() is not None
    done = bench.job(evaluation.id)
    assert done.status == SUCCEEDED and done.fine_tuned_model is None
    assert done.result is not None
    base = done.result["metrics"]["base"]
    assert set(base) >= {"loss", "exact_match"} and done.result["decides"] == "loss"
    first = bench.job(trained.id).result
    assert first is not None
    assert done.result["test_sha256"] == first["test_sha256"]  # the same held-out examples
    assert base["loss"] == pytest.approx(first["metrics"]["base"]["loss"], rel=1e-4)
    versions = bench.registry.list_versions(bench.tenant_id, "bot")
    assert [v.training_job for v in versions] == [trained.id]  # the evaluation added none
    messages = [e.message for e in bench.store.events(bench.tenant_id, evaluation.id)]
    assert any(m.startswith("The base alone on the test split: ") for m in messages)


def test_a_job_on_another_base_skips_production_and_is_not_promoted(
    bench: Bench, second_base_dir: Path
) -> None:
    bench.submit(fixed_answer_records(40))
    bench.worker().run_once()
    assert bench.registry.aliases(bench.tenant_id, "bot")["production"].version == 1
    second: BaseModelRecord = bench.registry.register_base(second_base_dir, "tiny-2", "r1", ADMIN)
    moved = dataclasses.replace(bench, base=second, chat_base=second_base_dir)
    job = moved.submit(fixed_answer_records(40))
    moved.worker().run_once()
    done = bench.job(job.id)
    assert done.status == SUCCEEDED and done.fine_tuned_model == "bot@2"
    assert done.result is not None and "production" not in done.result["metrics"]
    assert bench.registry.aliases(bench.tenant_id, "bot")["production"].version == 1
    messages = [e.message for e in bench.store.events(bench.tenant_id, job.id, limit=100)]
    assert "Not promoted: production runs on another base" in messages


def test_workers_carry_an_upgrade_through_real_jobs(bench: Bench, second_base_dir: Path) -> None:
    """The old base's adapter, trained by a job, moved by the new base's worker alone: its
    loop's upgrade tick queues the evaluation, the worker runs it, the tick queues the
    retraining, the worker trains, and the tick canaries, promotes and retires."""
    bench.submit(fixed_answer_records(40))
    bench.worker().run_once()
    registry, tenant_id = bench.registry, bench.tenant_id
    # A gate that always passes: with gates, they (not the margin) judge the new version.
    registry.set_gates(tenant_id, "bot", [Gate("fine-tune-test", "loss", 100.0, None, False)],
                       ADMIN)  # fmt: skip
    second = registry.register_base(second_base_dir, "tiny-2", "r1", ADMIN)
    options = UpgradeOptions(
        deadline=utcnow() + dt.timedelta(hours=1), canary_seconds=0, retire_grace_seconds=0
    )
    uid = UpgradeStore(registry).start(bench.base.name, "tiny-2", options, ADMIN).row.id
    moved = dataclasses.replace(bench, base=second, chat_base=second_base_dir)
    worker = moved.worker()
    worker.options = dataclasses.replace(worker.options, upgrade_interval=1e-6)
    states = []
    for _ in range(4):
        worker._maybe_advance_upgrades()
        worker.run_once()
        states.append(UpgradeStore(registry).get(uid).items[0][0].state)
    worker._maybe_advance_upgrades()
    assert states[:2] == ["evaluating", "retraining"]
    view = UpgradeStore(registry).get(uid)
    item = view.items[0][0]
    assert (view.row.state, item.state, item.new_version) == ("done", "migrated", 2), item.note
    assert item.scores["base"] > item.scores["old"]  # the new base alone: a worse loss
    assert registry.aliases(tenant_id, "bot")["production"].version == 2
    assert registry.get_version(tenant_id, "bot", 2).base_id == second.id
    assert registry.get_version(tenant_id, "bot", 1).state == "retired"
