"""The job worker: claim a queued job, train, evaluate, register, promote, finish.

Registration is all or nothing (``push_adapter`` is one transaction) and happens only
after the eval metrics are saved on the job. The job is marked succeeded last. A worker
that dies anywhere leaves either no version (the job is re-queued by the reaper and
trains again) or a registered version carrying this job's id: the next attempt finds it
and only finishes the remaining idempotent steps (eval results, promotion, status).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry import Actor, AdapterVersion, GateFailed, NotFound, Provenance, Registry
from registry.jobs import FineTuningJob, JobStore
from training.config import ConfigError, TrainConfig
from training.data import DatasetError, Method
from training.evaluate import CANDIDATE
from training.hyperparameters import train_config
from training.pipeline import Prepared, RunOutcome, RunSpec, library_versions, run_training
from training.recipe import StepReport, TrainingCancelled
from training.render import TemplateError

log = logging.getLogger("loraplex.worker")
TEST_SUITE = "fine-tune-test"
"""Eval suite of the candidate's metrics; the base's and production's get ``/base`` etc."""
STEP_EVENT_EVERY = 10
"""Training-loss events every this many steps (evaluation steps always log)."""


@dataclass(frozen=True)
class WorkerOptions:
    base_dir: Path
    """Local directory of the base model this worker trains on."""
    base_fingerprint: str
    """Its registered fingerprint: the worker claims only jobs pinned to it."""
    work_dir: Path
    """Scratch space for adapters and fetched production versions."""
    defaults: TrainConfig = field(default_factory=TrainConfig)
    """Hyperparameters a job does not set."""
    poll_interval: float = 2.0
    """Seconds between queue polls when it is empty."""
    heartbeat_interval: float = 10.0
    """Seconds between heartbeats (keep well under the store's ``stale_after``)."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class JobLost(RuntimeError):
    """The job stopped being this worker's (cancelled, or reaped after a stall)."""


class Worker:
    """Runs fine-tuning jobs from a ``JobStore`` one at a time."""

    def __init__(self, store: JobStore, options: WorkerOptions, worker_id: str | None = None):
        self.store = store
        self.registry: Registry = store.registry
        self.options = options
        self.worker_id = worker_id or default_worker_id()

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set."""
        while not stop.is_set():
            if self.run_once() is None:
                stop.wait(self.options.poll_interval)

    def run_once(self) -> FineTuningJob | None:
        """Reap stale jobs, claim one and process it; the claimed job or None."""
        for job_id in self.store.reap():
            log.warning("re-queued or failed orphaned job %s", job_id)
        job = self.store.claim(self.worker_id, [self.options.base_fingerprint])
        if job is not None:
            self.process(job)
        return job

    def process(self, job: FineTuningJob) -> None:
        """Run a claimed job to a final state (or leave it to the reaper if lost)."""
        log.info("running job %s", job.id)
        try:
            with self._heartbeating(job) as lost:
                self._execute(job, lost)
        except (TrainingCancelled, JobLost):
            log.info("job %s is no longer ours (cancelled or reaped); dropped it", job.id)
        except (DatasetError, TemplateError) as exc:
            self.store.fail(job.id, self.worker_id, "invalid_training_file", str(exc))
        except ConfigError as exc:
            self.store.fail(job.id, self.worker_id, "invalid_hyperparameters", str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self.store.fail(
                job.id, self.worker_id, "training_error", f"{type(exc).__name__}: {exc}"
            )
        finally:
            shutil.rmtree(self._scratch(job), ignore_errors=True)

    def _scratch(self, job: FineTuningJob) -> Path:
        return self.options.work_dir / job.id

    @contextlib.contextmanager
    def _heartbeating(self, job: FineTuningJob) -> Iterator[threading.Event]:
        lost, done = threading.Event(), threading.Event()

        def beat() -> None:
            while not done.wait(self.options.heartbeat_interval):
                if not self.store.heartbeat(job.id, self.worker_id):
                    lost.set()
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            done.set()
            thread.join()

    # -- the job ---------------------------------------------------------------

    def _execute(self, job: FineTuningJob, lost: threading.Event) -> None:
        done = self._version_of(job)
        if done is not None and job.result is not None:
            self.store.add_event(job.id, f"Resuming: version {done.number} is already registered")
            self._finish(job, done, job.result)
            return
        method: Method = "dpo" if job.method == "dpo" else "supervised"
        config = train_config(self.options.defaults, method, job.seed, job.hyperparameters)
        production = self._production(job)
        spec = RunSpec(
            base_dir=self.options.base_dir,
            training=self._training_content(job),
            config=config,
            validation=self._content(job.tenant_id, job.validation_file),
            schema=job.json_schema,
            production_dir=production[1] if production else None,
        )
        outcome = run_training(
            spec,
            self._scratch(job) / "adapter",
            on_step=lambda report: self._on_step(job, report),
            should_stop=lost.is_set,
            on_prepared=lambda prepared: self._on_prepared(job, prepared),
        )
        result = _result(outcome, config)
        if not self.store.save_result(job.id, self.worker_id, result):
            raise JobLost(job.id)
        version = self.registry.push_adapter(
            job.tenant_id,
            job.adapter_name,
            outcome.adapter_dir,
            job.base_fingerprint,
            self._actor(job),
            provenance=Provenance(
                dataset_sha256=outcome.prepared.dataset_sha256,
                training_config_sha256=config.sha256(),
                seed=config.seed,
                library_versions=library_versions(),
                parent_version=production[0] if production else None,
                training_job=job.id,
            ),
            description=f"fine-tuned by job {job.id}",
        )
        self.store.add_event(job.id, f"Registered {job.adapter_name} version {version.number}")
        self._finish(job, version, result)

    def _training_content(self, job: FineTuningJob) -> bytes:
        return self.store.file_content(self.store.get_file(job.tenant_id, job.training_file))

    def _content(self, tenant_id: int, file_id: str | None) -> bytes | None:
        if file_id is None:
            return None
        return self.store.file_content(self.store.get_file(tenant_id, file_id))

    def _actor(self, job: FineTuningJob) -> Actor:
        return Actor(f"job:{job.id}")

    def _version_of(self, job: FineTuningJob) -> AdapterVersion | None:
        """The version an earlier attempt of this job registered, if any."""
        try:
            versions = self.registry.list_versions(job.tenant_id, job.adapter_name)
        except NotFound:
            return None
        return next((v for v in versions if v.training_job == job.id), None)

    def _production(self, job: FineTuningJob) -> tuple[int, Path] | None:
        """(number, local files) of the adapter's production version, when it has one."""
        try:
            target = self.registry.aliases(job.tenant_id, job.adapter_name).get("production")
        except NotFound:
            return None
        if target is None:
            return None
        path = self.registry.fetch_version(target.engine_name, self._scratch(job) / "production")
        return target.version, path

    def _on_prepared(self, job: FineTuningJob, prepared: Prepared) -> None:
        self.store.add_event(
            job.id, f"Data audit: {prepared.audit.summary()}", data=prepared.audit.to_json()
        )

    def _on_step(self, job: FineTuningJob, report: StepReport) -> None:
        data: dict[str, Any] = {
            "step": report.step,
            "total_steps": report.total_steps,
            "train_loss": report.train_loss,
        }
        message = f"Step {report.step}/{report.total_steps}: training loss={report.train_loss:.4f}"
        if report.validation_loss is not None:
            data["valid_loss"] = report.validation_loss
            message += f", validation loss={report.validation_loss:.4f}"
            self.store.add_checkpoint(job.id, report.step, data)
        if report.validation_loss is not None or report.step % STEP_EVENT_EVERY == 0:
            self.store.add_event(job.id, message, data=data)

    # -- finishing (idempotent) --------------------------------------------------

    def _finish(self, job: FineTuningJob, version: AdapterVersion, result: dict[str, Any]) -> None:
        self._store_evals(job, version, result)
        model = self._promote(job, version)
        if not self.store.succeed(job.id, self.worker_id, model):
            raise JobLost(job.id)
        log.info("job %s succeeded: %s", job.id, model)

    def _store_evals(
        self, job: FineTuningJob, version: AdapterVersion, result: dict[str, Any]
    ) -> None:
        stored = {
            (r.suite, r.metric)
            for r in self.registry.eval_results(job.tenant_id, job.adapter_name, version.number)
        }
        for model, metrics in result.get("metrics", {}).items():
            suite = TEST_SUITE if model == CANDIDATE else f"{TEST_SUITE}/{model}"
            for metric, value in metrics.items():
                if (suite, metric) in stored:
                    continue
                self.registry.add_eval_result(
                    job.tenant_id,
                    job.adapter_name,
                    version.number,
                    suite,
                    metric,
                    value,
                    self._actor(job),
                    sample_count=result.get("test_samples"),
                    dataset_sha256=result.get("test_sha256"),
                )

    def _promote(self, job: FineTuningJob, version: AdapterVersion) -> str:
        """Point production at the version; the name clients call (pinned if gates refuse)."""
        current = self.registry.aliases(job.tenant_id, job.adapter_name).get("production")
        if current is not None and current.version == version.number:
            return job.adapter_name
        try:
            self.registry.promote(job.tenant_id, job.adapter_name, version.number, self._actor(job))
        except GateFailed as exc:
            self.store.add_event(job.id, f"Not promoted: {exc}", level="warn")
            return f"{job.adapter_name}@{version.number}"
        self.store.add_event(job.id, f"Promoted version {version.number} to production")
        return job.adapter_name


def _result(outcome: RunOutcome, config: TrainConfig) -> dict[str, Any]:
    """What the job row keeps: metrics per model, provenance hashes, training summary."""
    metrics = {name: m.as_metrics() for name, m in outcome.metrics.items()}
    samples = outcome.metrics[CANDIDATE].samples if CANDIDATE in outcome.metrics else 0
    return {
        "metrics": metrics,
        "test_samples": samples,
        "test_sha256": outcome.prepared.test_sha256,
        "dataset_sha256": outcome.prepared.dataset_sha256,
        "config_sha256": config.sha256(),
        "config": config.to_json(),
        "audit": outcome.prepared.audit.summary(),
        "train": {
            "steps": outcome.train.steps,
            "best_step": outcome.train.best_step,
            "best_validation_loss": outcome.train.best_validation_loss,
            "stopped_early": outcome.train.stopped_early,
        },
    }
