"""The job worker: claim a queued job, train, evaluate, then register, promote, finish.

With no promotion gates on the adapter, the version is promoted only when it beats the
base and the production version on the job's held-out test split (``training.promotion``);
otherwise the job still succeeds, as ``name@N``, and its events say why. When the base
has capability suites, the version is scored on them too (``training.capability``), and
gates with ``max_below_base`` hold it to the base's reference there.

Everything the job leaves in the registry lands in one transaction
(``JobStore.complete``): the version, its eval results, its promotion and the job's
success, and only while this worker still holds the job. Before it, the adapter's blob
is staged (stored, registering nothing). A worker that dies anywhere leaves the job
running with nothing registered, or succeeded: the reaper re-queues it and the next
attempt trains from a clean scratch directory; staging the same weights again finds
their blob stored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from registry import DATABASE_DOWN, PRODUCTION, NotFound, Provenance, Registry
from registry.drift import DriftStore, PromptSketch, prompts_of, sketch_prompts
from registry.jobs import PAUSED, RESTARTS, FineTuningJob, JobStore, TrainedVersion, job_actor
from registry.registry import Score, StagedVersion
from registry.retraining import RetrainingStore, init_version
from registry.upgrades import EVALUATION, UpgradeStore
from registry.workers import WorkerRoster
from training import capability
from training.auto import Picked
from training.config import ConfigError, TrainConfig
from training.data import DatasetError, Example, Method
from training.evaluate import BASE, CANDIDATE
from training.hyperparameters import auto_of, train_config
from training.pipeline import (
    Prepared,
    RunOutcome,
    RunSpec,
    evaluate_base,
    library_versions,
    run_training,
)
from training.promotion import exact_match_decides, verdict
from training.recipe import StepReport, TrainingCancelled, checkpoint_dirs, init_overrides
from training.render import TemplateError, reference_answer
from training.schema import RegexError

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
    choose_hyperparameters: bool = True
    """Pick the epochs, batch size and learning rate a job leaves to ``auto`` (from its
    data's size and a learning-rate search, ``training.auto``); False: take ``defaults``."""
    retrain_interval: float = 30.0
    """Seconds between runs of the retraining tick (``registry.retraining``: due policies
    queue jobs) in the poll loop; 0 turns it off for this worker."""
    upgrade_interval: float = 10.0
    """Seconds between steps of the running base upgrades (``registry.upgrades``: each
    ``advance`` queues, compares, canaries and promotes what it can) in the poll loop; 0
    turns it off for this worker."""


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
        self.roster = WorkerRoster(self.registry)
        """Where this worker says it is alive, so a job for its base does not say it waits."""
        self.retraining = RetrainingStore(store)
        self.drift = DriftStore(self.registry)
        self.upgrades = UpgradeStore(self.registry)
        self._next_tick: dict[str, float] = {}
        """When each periodic tick (``_periodically``) runs next, by name (monotonic)."""

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; a registry outage pauses it, never ends it."""
        try:
            while not stop.is_set():
                try:
                    self._maybe_retrain()
                    self._maybe_advance_upgrades()
                    claimed = self.run_once()
                except DATABASE_DOWN as exc:
                    log.warning("registry database unavailable (%s); retrying", type(exc).__name__)
                    claimed = None
                if claimed is None:
                    stop.wait(self.options.poll_interval)
        finally:
            with contextlib.suppress(*DATABASE_DOWN):  # unseen, it counts as gone in a minute
                self.roster.gone(self.worker_id)

    def _maybe_retrain(self) -> None:
        """Every ``retrain_interval`` seconds, run the retraining policies that are due.

        Any worker may run the tick (its claims are safe with many); jobs it queues go to
        whichever worker holds their base."""

        def tick() -> None:
            for outcome in self.retraining.tick():
                log.info("retraining policy of %s: %s", outcome.adapter, outcome.message)

        self._periodically("retraining", self.options.retrain_interval, tick)

    def _maybe_advance_upgrades(self) -> None:
        """Every ``upgrade_interval`` seconds, step the running base upgrades (safe with
        any number of callers: each step locks its item and checks its state first)."""

        def tick() -> None:
            for moved in self.upgrades.advance_running():
                log.info("base upgrade: %s %s: %s", moved.adapter, moved.state, moved.message)

        self._periodically("base upgrade", self.options.upgrade_interval, tick)

    def _periodically(self, name: str, interval: float, tick: Callable[[], None]) -> None:
        """Run ``tick`` when ``interval`` seconds (0: never) passed since it last ran. A
        failing tick must not stop the job loop; a registry outage is the loop's to handle."""
        if interval <= 0 or time.monotonic() < self._next_tick.get(name, 0.0):
            return
        self._next_tick[name] = time.monotonic() + interval
        try:
            tick()
        except DATABASE_DOWN:
            raise
        except Exception:
            log.exception("%s tick failed; trying again in %.0f s", name, interval)

    def run_once(self) -> FineTuningJob | None:
        """Reap stale jobs, claim one and process it; the claimed job or None."""
        self.roster.seen(self.worker_id, self.options.base_fingerprint)
        for job_id in self.store.reap():
            log.warning("re-queued or failed orphaned job %s", job_id)
        job = self.store.claim(self.worker_id, [self.options.base_fingerprint])
        if job is not None:
            self.process(job)
        return job

    def process(self, job: FineTuningJob) -> None:
        """Run a claimed job to a final state (or leave it to the reaper if lost)."""
        log.info("running job %s", job.id)
        # A killed attempt leaves its scratch behind; this one starts from nothing.
        shutil.rmtree(self._scratch(job), ignore_errors=True)
        try:
            with self._heartbeating(job) as lost:
                self._execute(job, lost)
        except (TrainingCancelled, JobLost) as exc:
            log.info("job %s is no longer ours (cancelled, paused or reaped); dropped it", job.id)
            self._say_if_paused(job, exc)
        except DATABASE_DOWN as exc:
            # Not the job's fault: its heartbeats stop, and the reaper gives it another attempt.
            log.warning(
                "job %s left to be retried: registry database unavailable (%r)", job.id, exc
            )
        except (DatasetError, TemplateError) as exc:
            self.store.fail(job.id, self.worker_id, "invalid_training_file", str(exc))
        except ConfigError as exc:
            self.store.fail(job.id, self.worker_id, "invalid_hyperparameters", str(exc))
        except RegexError as exc:  # refused at creation; only a job written directly has one
            self.store.fail(job.id, self.worker_id, "invalid_answer_regex", str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self.store.fail(
                job.id, self.worker_id, "training_error", f"{type(exc).__name__}: {exc}"
            )
        finally:
            shutil.rmtree(self._scratch(job), ignore_errors=True)

    def _say_if_paused(self, job: FineTuningJob, exc: Exception) -> None:
        """An event on a job paused under this worker: where training stopped, and that
        nothing of it is kept (a resumed job trains from the start)."""
        with contextlib.suppress(*DATABASE_DOWN):  # the pause event already says the rest
            if self.store.get_job(None, job.id).status == PAUSED:
                where = str(exc) if isinstance(exc, TrainingCancelled) else "training stopped"
                self.store.add_event(job.id, f"Paused: {where}; nothing kept, {RESTARTS}")

    def _scratch(self, job: FineTuningJob) -> Path:
        return self.options.work_dir / job.id

    @contextlib.contextmanager
    def _heartbeating(self, job: FineTuningJob) -> Iterator[threading.Event]:
        lost, done = threading.Event(), threading.Event()

        def beat() -> None:
            while not done.wait(self.options.heartbeat_interval):
                try:
                    held = self.store.heartbeat(job.id, self.worker_id)
                    self.roster.seen(self.worker_id, self.options.base_fingerprint)
                except DATABASE_DOWN as exc:  # the next beat tries again; a long outage reaps
                    log.warning("job %s: heartbeat not written (%s)", job.id, type(exc).__name__)
                    continue
                if not held:
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
        method: Method = "dpo" if job.method == "dpo" else "supervised"
        config = train_config(self.options.defaults, method, job.seed, job.hyperparameters)
        if job.method == EVALUATION:
            self._evaluate(job, config, lost)
            return
        init = self._init(job)
        if init is not None:
            config = self._continued(job, config, init)
        production = self._production(job)
        planned = capability.plan(self.registry, job.base_fingerprint)
        spec = RunSpec(
            base_dir=self.options.base_dir,
            training=self._training_content(job),
            config=config,
            validation=self._content(job.tenant_id, job.validation_file),
            schema=job.json_schema,
            production_dir=production[1] if production else None,
            auto=auto_of(job.hyperparameters) if self.options.choose_hyperparameters else None,
            init_dir=init.path if init is not None else None,
            answer_regex=job.answer_regex,
            suites=planned.runs(),
        )
        outcome = run_training(
            spec,
            self._scratch(job) / "adapter",
            on_step=lambda report: self._on_step(job, report),
            should_stop=lost.is_set,
            on_prepared=lambda prepared: self._on_prepared(job, prepared),
            on_chosen=lambda choice: self._on_chosen(job, choice),
        )
        if lost.is_set():
            raise JobLost(job.id)
        self.store.add_event(job.id, f"Training finished after {outcome.train.steps} steps")
        parent = production[0] if production else None
        if init is not None:
            parent = init.number if init.adapter == job.adapter_name else None
        trained = self._trained(job, outcome, outcome.choice.config, parent)
        trained = self._with_capability(job, trained, planned, outcome)
        model = self.store.complete(job.id, self.worker_id, trained)
        if model is None:
            raise JobLost(job.id)
        self._set_reference(job, trained, reference_sketch(outcome.prepared.splits))
        log.info("job %s succeeded: %s", job.id, model)

    def _evaluate(self, job: FineTuningJob, config: TrainConfig, lost: threading.Event) -> None:
        """An evaluation-only job (a base upgrade's): the base alone on the job's test
        split, kept in the job's result; no adapter is trained or registered."""
        spec = RunSpec(
            base_dir=self.options.base_dir,
            training=self._training_content(job),
            config=config,
            validation=self._content(job.tenant_id, job.validation_file),
            schema=job.json_schema,
            answer_regex=job.answer_regex,
        )
        scored = evaluate_base(spec)
        self._on_prepared(job, scored.prepared)
        if lost.is_set():
            raise JobLost(job.id)
        metrics = {} if scored.metrics is None else {BASE: scored.metrics.as_metrics()}
        result = {
            "metrics": metrics,
            "decides": scored.decides,
            "test_samples": 0 if scored.metrics is None else scored.metrics.samples,
            "test_sha256": scored.prepared.test_sha256,
            "dataset_sha256": scored.prepared.dataset_sha256,
            "config_sha256": config.sha256(),
        }
        shown = (
            ", ".join(f"{k} {v:.4g}" for k, v in metrics.get(BASE, {}).items()) or "no test split"
        )
        self.store.add_event(job.id, f"The base alone on the test split: {shown}", data=result)
        if not self.store.succeed(job.id, self.worker_id, None, result):
            raise JobLost(job.id)

    def _set_reference(
        self, job: FineTuningJob, trained: TrainedVersion, sketch: PromptSketch
    ) -> None:
        """Make the training prompts' sketch the version's drift reference.

        After the job's transaction (``JobStore.complete``), not in it: a worker dying in
        between leaves the version without one, so its drift is unknown, as it is for a
        version pushed without training data."""
        fingerprint = trained.staged.columns["fingerprint"]
        try:
            versions = self.registry.list_versions(job.tenant_id, job.adapter_name)
            version = next(v for v in versions if v.fingerprint == fingerprint)
            assert version.id is not None
            self.drift.set_reference(version.id, sketch)
        except Exception:  # the job succeeded; only its drift reference is lost
            log.exception("job %s: the version's drift reference was not stored", job.id)

    def _with_capability(
        self,
        job: FineTuningJob,
        trained: TrainedVersion,
        planned: capability.Plan,
        outcome: RunOutcome,
    ) -> TrainedVersion:
        """``trained`` with its scores on the base's capability suites (and the base
        references measured for them stored), and an event per suite."""
        if not outcome.suites:
            return trained
        how = capability.details(job.id, library_versions())
        recorded = capability.record(self.registry, planned, outcome.suites, job_actor(job.id), how)
        for message, data in recorded.events:
            self.store.add_event(job.id, message, data=data)
        result = {**trained.result, "capability": recorded.result}
        scores = [*trained.scores, *recorded.scores]
        return replace(trained, result=result, scores=scores)

    def _trained(
        self, job: FineTuningJob, outcome: RunOutcome, config: TrainConfig, parent: int | None
    ) -> TrainedVersion:
        """The adapter staged in the blob store, with what registers with it."""
        staged = self.registry.stage_adapter(
            job.tenant_id, job.adapter_name, outcome.adapter_dir, job.base_fingerprint
        )
        provenance = Provenance(
            dataset_sha256=outcome.prepared.dataset_sha256,
            training_config_sha256=config.sha256(),
            seed=config.seed,
            library_versions=library_versions(),
            parent_version=parent,
            training_job=job.id,
        )
        result = _result(outcome, config)
        result["hyperparameters"] = outcome.choice.to_json()
        description = f"fine-tuned by job {job.id}"
        if outcome.choice.searched:
            description += f", learning rate {config.learning_rate:g} picked by a search"
        answers = [reference_answer(e) for e in outcome.prepared.splits["test"]]
        judged = verdict(outcome.metrics, exact_match_decides(answers))
        result["promotion"] = {"better": judged.better, "summary": judged.summary}
        if judged.better:
            self.store.add_event(job.id, f"Better than what clients get now: {judged.summary}")
        not_better = None if judged.better else judged.summary
        checkpoints = self._staged_checkpoints(job, outcome)
        return TrainedVersion(
            staged, provenance, description, result, _scores(result), not_better, checkpoints
        )

    def _staged_checkpoints(
        self, job: FineTuningJob, outcome: RunOutcome
    ) -> tuple[tuple[int, StagedVersion], ...]:
        """The run's kept checkpoints staged as the adapter's (registered with the result),
        when the job asked for servable checkpoints."""
        staged: list[tuple[int, StagedVersion]] = []
        if not job.servable_checkpoints:
            return ()
        for step, path in checkpoint_dirs(outcome.adapter_dir):
            stage = self.registry.stage_adapter(
                job.tenant_id, job.adapter_name, path, job.base_fingerprint
            )
            staged.append((step, stage))
        return tuple(staged)

    def _training_content(self, job: FineTuningJob) -> bytes:
        return self.store.file_content(self.store.get_file(job.tenant_id, job.training_file))

    def _content(self, tenant_id: int, file_id: str | None) -> bytes | None:
        if file_id is None:
            return None
        return self.store.file_content(self.store.get_file(tenant_id, file_id))

    def _production(self, job: FineTuningJob) -> tuple[int, Path] | None:
        """(number, local files) of the adapter's production version, when it has one."""
        try:
            target = self.registry.aliases(job.tenant_id, job.adapter_name).get(PRODUCTION)
        except NotFound:
            return None
        if target is None:
            return None
        serving = self.registry.get_version(job.tenant_id, job.adapter_name, target.version)
        if serving.base_id != self.registry.get_base(job.base_fingerprint).id:
            # A LoRA of another base does not fit this one (a base upgrade's retraining):
            # the upgrade compares the two through their recorded eval results instead.
            return None
        path = self.registry.fetch_version(target.lora_name, self._scratch(job) / "production")
        return target.version, path

    def _init(self, job: FineTuningJob) -> _Init | None:
        """The adapter version the job continues, fetched; None for a new adapter."""
        if job.init_version_id is None:
            return None
        adapter, found = init_version(self.registry, job.init_version_id)
        path = self.registry.fetch_version(
            found.version.lora_name, self._scratch(job) / "init", found
        )
        return _Init(adapter, found.version.number, path)

    def _continued(self, job: FineTuningJob, config: TrainConfig, init: _Init) -> TrainConfig:
        """``config`` with the LoRA shape of the version it continues (which the job's own
        ``r``, ``alpha`` and ``target_modules``, if any, give way to), and an event saying so."""
        shape = init_overrides(init.path)
        overridden = sorted(n for n in ("r", "alpha", "target_modules") if n in job.hyperparameters)
        message = (
            f"Starting from {init.adapter} version {init.number}'s weights: rank {shape['r']}, "
            f"alpha {shape['alpha']:g}, target modules {', '.join(shape['target_modules'])} "
            "(from its config)"
        )
        if overridden:
            message += f"; the job's {', '.join(overridden)} did not apply"
        data = {**shape, "target_modules": list(shape["target_modules"]), "ignored": overridden}
        self.store.add_event(job.id, message, data={"init_version": data})
        return config.with_overrides(shape)

    def _on_prepared(self, job: FineTuningJob, prepared: Prepared) -> None:
        self.store.add_event(
            job.id, f"Data audit: {prepared.report.summary()}", data=prepared.report.to_json()
        )

    def _on_chosen(self, job: FineTuningJob, choice: Picked) -> None:
        self.store.add_event(job.id, f"Hyperparameters: {choice.summary()}", data=choice.to_json())

    def _on_step(self, job: FineTuningJob, report: StepReport) -> None:
        data: dict[str, Any] = {
            "step": report.step,
            "total_steps": report.total_steps,
            "train_loss": report.train_loss,
        }
        message = f"Step {report.step}/{report.total_steps}: training loss={report.train_loss:.4f}"
        # Progress records are worth less than the training: an outage skips them, not the job.
        with contextlib.suppress(*DATABASE_DOWN):
            if report.validation_loss is not None:
                data["valid_loss"] = report.validation_loss
                message += f", validation loss={report.validation_loss:.4f}"
                self.store.add_checkpoint(job.id, report.step, data)
            if report.validation_loss is not None or report.step % STEP_EVENT_EVERY == 0:
                self.store.add_event(job.id, message, data=data)


@dataclass(frozen=True)
class _Init:
    """The adapter version a job continues: its adapter, number and local PEFT files."""

    adapter: str
    number: int
    path: Path


def reference_sketch(splits: dict[str, list[Example]]) -> PromptSketch:
    """The sketch of the prompts of every example the job was given (all its splits)."""
    examples = [example for split in splits.values() for example in split]
    return sketch_prompts(text for e in examples for text in prompts_of(dict(e.data)))


def _scores(result: dict[str, Any]) -> list[Score]:
    """The candidate's metrics under ``TEST_SUITE``, the base's and production's beside it,
    each with the test split it was measured on."""
    split = result["test_samples"], result["test_sha256"]
    return [
        Score(TEST_SUITE if model == CANDIDATE else f"{TEST_SUITE}/{model}", metric, value, *split)
        for model, metrics in result["metrics"].items()
        for metric, value in metrics.items()
    ]


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
        "audit": outcome.prepared.report.summary(),
        "train": {
            "steps": outcome.train.steps,
            "best_step": outcome.train.best_step,
            "best_validation_loss": outcome.train.best_validation_loss,
            "stopped_early": outcome.train.stopped_early,
            "trained_tokens": outcome.train.trained_tokens,
        },
    }
