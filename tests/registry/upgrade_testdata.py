"""A fleet of adapters on the old base for base-upgrade tests, and the worker's part
played by the test (``registry.upgrades``): the registry, route and CLI tests share it."""

from __future__ import annotations

from pathlib import Path

from registry import Actor, Registry
from registry.jobs import FineTuningJob, JobStore, TrainedVersion, new_id
from registry.registry import Score
from registry.upgrades import EVALUATION
from registry.values import Provenance
from tests.registry.registry_testdata import BASE_NAME

OPERATOR = Actor("cli:test", admin=True)
NEW_NAME = "tiny-llama-2"
WORKER = "test-worker"


class Fleet:
    """Tenant acme's adapters on the old base: ``bot`` and ``easy`` trained by jobs (exact
    match 0.8 on fine-tune-test), ``up`` uploaded; tenant other's ``theirs`` (uploaded)."""

    def __init__(self, registry: Registry, adapters: dict[str, Path], acme: int, other: int):
        self.registry, self.jobs = registry, JobStore(registry)
        self.acme, self.other = acme, other
        self.adapters = adapters
        self.trained("bot", adapters["v1"])
        self.trained("easy", adapters["v2"])
        for tenant_id, name, key in ((acme, "up", "v3"), (other, "theirs", "v3")):
            registry.push_adapter(tenant_id, name, adapters[key], BASE_NAME, OPERATOR)
            registry.promote(tenant_id, name, 1, OPERATOR)

    def trained(self, name: str, weights: Path) -> None:
        file = self.jobs.create_file(self.acme, "train.jsonl", "fine-tune", b'{"a": 1}\n')
        base = self.registry.get_base(BASE_NAME)
        job = FineTuningJob(
            id=new_id("ftjob"), tenant_id=self.acme, model=BASE_NAME,
            base_fingerprint=base.fingerprint, training_file=file.id, adapter_name=name,
            seed=3, hyperparameters={"n_epochs": 2}, status="succeeded",
            result={"promotion": {"summary": "exact match 80.0 % on 10 held-out examples"}},
        )  # fmt: skip
        self.jobs.create_job(job)
        provenance = Provenance(training_job=job.id)
        self.registry.push_adapter(self.acme, name, weights, BASE_NAME, OPERATOR, provenance)
        self.registry.add_eval_result(self.acme, name, 1, "fine-tune-test", "exact_match", 0.8,
                                      OPERATOR)  # fmt: skip
        self.registry.promote(self.acme, name, 1, OPERATOR)

    def hold(self, job_id: str) -> None:
        """Make the job this test's worker's, running (claims go oldest first)."""
        with self.registry._write() as s:
            job = s.get_one(FineTuningJob, job_id, with_for_update=True)
            assert job.status == "queued"
            job.status, job.worker_id, job.attempts = "running", WORKER, 1
            s.add(job)

    def evaluated(self, job_id: str, exact_match: float) -> None:
        """Finish an evaluation-only job as a worker would."""
        job = self.jobs.get_job(None, job_id)
        assert job.method == EVALUATION and job.seed == 3
        assert job.hyperparameters == {"n_epochs": 2}
        self.hold(job_id)
        metrics = {"base": {"exact_match": exact_match, "loss": 1.0}}
        result = {"metrics": metrics, "decides": "exact_match", "test_samples": 10}
        assert self.jobs.succeed(job_id, WORKER, None, result)

    def retrained(self, job_id: str, exact_match: float, weights: Path) -> str | None:
        """Finish a retraining job as a worker would (``JobStore.complete``)."""
        job = self.jobs.get_job(None, job_id)
        assert job.method == "supervised" and job.init_version_id is None
        self.hold(job_id)
        staged = self.registry.stage_adapter(self.acme, job.adapter_name, weights, NEW_NAME)
        score = Score("fine-tune-test", "exact_match", exact_match, 10)
        trained = TrainedVersion(staged, Provenance(training_job=job_id), "retrained", {}, [score])
        return self.jobs.complete(job_id, WORKER, trained)
