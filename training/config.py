"""The training configuration: LoRA shape, optimisation, evaluation cadence, DPO."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from training.data import Method

Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """The training configuration is invalid; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid training configuration, fix these hyperparameters:\n{lines}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train one adapter. Every field is part of the config hash (provenance)."""

    method: Method = "supervised"
    """``supervised`` (SFT on answers) or ``dpo`` (preference pairs)."""

    r: int = 8
    """LoRA rank: width of the low-rank update; must not exceed the server's max LoRA rank."""

    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / r."""

    dropout: float = 0.0
    """Dropout on the LoRA input during training (0 keeps small runs deterministic)."""

    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Module names the adapter changes; all linear layers of a Llama block by default."""

    learning_rate: float = 2e-4
    """Peak AdamW learning rate (tiny bases learn faster with ~3e-3)."""

    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA matrices."""

    epochs: int = 3
    """Passes over the training split (early stopping may end training sooner)."""

    max_steps: int | None = None
    """Stop after this many optimizer steps, whatever the epochs say (None: no cap)."""

    batch_size: int = 8
    """Examples per micro-batch."""

    grad_accumulation: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x this)."""

    warmup_ratio: float = 0.05
    """Share of the optimizer steps spent warming the learning rate up linearly from 0."""

    schedule: Schedule = "cosine"
    """Learning-rate decay after warm-up: ``cosine`` or ``linear`` to 0, or ``constant``."""

    max_length: int = 1024
    """Tokens per example; longer examples are cut (the audit reports them)."""

    seed: int = 0
    """Seeds the LoRA initialisation and the batch order."""

    eval_every: int = 50
    """Optimizer steps between validation evaluations (and at the end of training)."""

    patience: int = 3
    """Evaluations without a better validation loss before training stops early."""

    beta: float = 0.1
    """DPO temperature: how far the policy may move from the frozen base (dpo only)."""

    validation_fraction: float = 0.1
    """Share of the data held out for validation when the job gives no validation file."""

    test_fraction: float = 0.1
    """Share of the data held out for the final test evaluation."""

    num_threads: int | None = None
    """Torch CPU threads (None: torch's default); fixed values make CPU runs reproducible."""

    def validate(self) -> None:
        problems = [
            f"{name} must be at least {low}, got {getattr(self, name)}"
            for name, low in _MINIMUMS.items()
            if getattr(self, name) < low
        ]
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be at least 1 or unset, got {self.max_steps}")
        if self.schedule not in SCHEDULES:
            problems.append(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.method not in ("supervised", "dpo"):
            problems.append(f"method must be 'supervised' or 'dpo', got {self.method!r}")
        for name in ("dropout", "warmup_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.validation_fraction + self.test_fraction < 1.0:
            problems.append("validation_fraction + test_fraction must leave data to train on")
        if not self.target_modules:
            problems.append("target_modules must name at least one module")
        if problems:
            raise ConfigError(problems)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    def sha256(self) -> str:
        """SHA-256 of the canonical JSON: the provenance config hash."""
        canonical = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``overrides`` applied; unknown names are refused, all at once."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            listing = ", ".join(sorted(known))
            raise ConfigError([f"unknown hyperparameter {n!r}; known: {listing}" for n in unknown])
        values = dict(overrides)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        config = replace(self, **values)
        config.validate()
        return config


_MINIMUMS: dict[str, float] = {
    "r": 1,
    "alpha": 1e-9,
    "learning_rate": 1e-12,
    "weight_decay": 0.0,
    "epochs": 1,
    "batch_size": 1,
    "grad_accumulation": 1,
    "max_length": 8,
    "seed": 0,
    "eval_every": 1,
    "patience": 1,
    "beta": 1e-9,
}
