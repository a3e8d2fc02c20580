"""The LoRA training recipe (torchtune style: ``setup``, ``train``, ``evaluate``, ``save``).

Supervised fine-tuning minimises the cross-entropy of answer tokens only; DPO
(``method="dpo"``) minimises the DPO loss with the frozen base as the reference model:
the same weights with the adapter switched off (``disable_adapter()``), so no second
copy of the base is loaded. Reference log-probabilities never change, so they are
computed once in ``setup``.

Validation runs every ``eval_every`` optimizer steps and at the end; the adapter
weights with the best validation loss are kept in memory and are what ``save`` writes,
and ``patience`` evaluations without improvement stop training early. ``save`` writes
only what vLLM serves: a plain LoRA (no ``modules_to_save``, no biases, no DoRA).

Training may continue an existing adapter (``init_dir``: its PEFT files) instead of a
fresh LoRA: its weights are loaded trainable, so its rank, alpha and target modules are
the run's (``init_overrides`` reads them for the config).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from training.config import ConfigError, TrainConfig
from training.data import DatasetError, Example
from training.losses import collate, dpo_loss, mean_answer_loss, sequence_logprobs
from training.render import Tokenized, preference_turns, tokenize_example, tokenize_turn

KEEP_CHECKPOINTS = 3
"""Evaluation steps whose weights a run keeps as servable checkpoints (the last ones,
as OpenAI keeps its last three epochs')."""


class TrainingCancelled(RuntimeError):
    """``should_stop`` asked training to end; nothing was saved."""


@dataclass(frozen=True)
class StepReport:
    """What happened at one optimizer step (validation fields only on evaluation steps)."""

    step: int
    total_steps: int
    train_loss: float
    learning_rate: float
    validation_loss: float | None = None
    is_best: bool = False


@dataclass
class TrainResult:
    steps: int = 0
    best_step: int = 0
    best_validation_loss: float | None = None
    final_train_loss: float = math.nan
    stopped_early: bool = False
    history: list[StepReport] = field(default_factory=list)
    trained_tokens: int = 0
    """Tokens the optimizer steps fed the model (prompts and answers; both answers of a
    preference pair), counted once per epoch they were seen in: OpenAI's ``trained_tokens``."""


@dataclass(frozen=True)
class _Pair:
    """A preference pair, tokenized, with the frozen reference's log-probabilities."""

    chosen: Tokenized
    rejected: Tokenized
    reference: tuple[float, float] = (0.0, 0.0)


def _tokens(item: Tokenized | _Pair) -> int:
    if isinstance(item, _Pair):
        return len(item.chosen.input_ids) + len(item.rejected.input_ids)
    return len(item.input_ids)


def pick_device() -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU when there is one, float32 on CPU (CPU bf16 matmuls are slow)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_base(base_dir: Path) -> tuple[PreTrainedTokenizerBase, torch.nn.Module, torch.device]:
    """The base model (eval mode, on the picked device) and its tokenizer."""
    device, dtype = pick_device()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.to(device)
    model.eval()
    return tokenizer, model, device


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


INIT_CONFIG = "adapter_config.json"
INIT_WEIGHTS = "adapter_model.safetensors"


def init_overrides(init_dir: Path) -> dict[str, Any]:
    """``r``, ``alpha`` and ``target_modules`` of the adapter in ``init_dir``: continuing
    it trains its own weights, so its shape overrides any a job asks for. The targets are
    the module names its weights are on (its config may give a regex instead of names)."""
    config_path, weights_path = Path(init_dir) / INIT_CONFIG, Path(init_dir) / INIT_WEIGHTS
    if not (config_path.is_file() and weights_path.is_file()):
        missing = f"{init_dir} lacks {INIT_CONFIG} or {INIT_WEIGHTS}"
        raise ConfigError([f"{missing}: it is not a PEFT adapter to continue from"])
    config = json.loads(config_path.read_text())
    with safe_open(str(weights_path), framework="pt") as weights:
        names = [key for key in weights.keys() if ".lora_A." in key]  # noqa: SIM118
    targets = sorted({key.split(".lora_A.")[0].rsplit(".", 1)[-1] for key in names})
    if config.get("peft_type", "LORA") != "LORA" or not targets:
        raise ConfigError([f"{init_dir} holds no LoRA weights to continue from"])
    return {
        "r": int(config.get("r", 8)),
        "alpha": float(config.get("lora_alpha", 8)),
        "target_modules": tuple(targets),
    }


class LoRARecipe:
    """One LoRA training run on one base model."""

    def __init__(
        self,
        config: TrainConfig,
        base_dir: Path,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        init_dir: Path | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.base_dir = Path(base_dir)
        self.init_dir = None if init_dir is None else Path(init_dir)
        """An adapter whose weights training starts from (None: a fresh LoRA)."""
        self.on_step = on_step or (lambda report: None)
        self.should_stop = should_stop or (lambda: False)
        self._best: dict[str, torch.Tensor] | None = None
        self._kept: list[tuple[int, dict[str, torch.Tensor]]] = []
        """The last ``KEEP_CHECKPOINTS`` evaluation steps' weights, oldest first."""

    # -- setup ----------------------------------------------------------------

    def setup(self, train: Sequence[Example], validation: Sequence[Example]) -> None:
        """Load the base, wrap it with a LoRA (fresh, or ``init_dir``'s), tokenize the data,
        build the optimizer."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.tokenizer, base, self.device = load_base(self.base_dir)
        self._check_targets(base)
        torch.manual_seed(self.config.seed)
        self.model: PeftModel = self._wrap(base)
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
        self.train_items = self._prepare(train)
        if not self.train_items:
            raise DatasetError(
                "the training split", ["no example with a supervised token; see the audit"]
            )
        self.validation_items = self._prepare(validation)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        self.total_steps = self._total_steps()
        warmup = int(self.config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: _lr_factor(s, self.total_steps, warmup, self.config.schedule),
        )

    def _wrap(self, base: torch.nn.Module) -> PeftModel:
        if self.init_dir is not None:
            # is_trainable: PEFT loads a saved adapter frozen (for inference) otherwise.
            model = PeftModel.from_pretrained(base, str(self.init_dir), is_trainable=True)
            model.to(self.device)
            return model
        lora = LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,  # type: ignore[arg-type]  # PEFT takes floats too
            lora_dropout=self.config.dropout,
            target_modules=list(self.config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(base, lora)

    def _check_targets(self, model: torch.nn.Module) -> None:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in self.config.target_modules if m not in names]
        if missing:
            raise ConfigError(
                [
                    f"target module {m!r} is not in the base model; pick from its linear layers"
                    for m in missing
                ]
            )

    def _prepare(self, examples: Sequence[Example]) -> list[Tokenized | _Pair]:
        if self.config.method == "dpo":
            return self._prepare_pairs(examples)
        items = [tokenize_example(self.tokenizer, e, self.config.max_length) for e in examples]
        return [item for item in items if item.supervised_tokens > 0]

    def _prepare_pairs(self, examples: Sequence[Example]) -> list[Tokenized | _Pair]:
        pairs = []
        for example in examples:
            chosen, rejected = (
                tokenize_turn(self.tokenizer, t, self.config.max_length)
                for t in preference_turns(self.tokenizer, example)
            )
            if chosen.supervised_tokens and rejected.supervised_tokens:
                pairs.append(_Pair(chosen, rejected))
        return [_Pair(p.chosen, p.rejected, self._reference(p)) for p in pairs]

    @torch.no_grad()
    def _reference(self, pair: _Pair) -> tuple[float, float]:
        batch = collate([pair.chosen, pair.rejected], self.pad_id, self.device)
        with self.model.disable_adapter():
            chosen, rejected = sequence_logprobs(self.model, batch).tolist()
        return chosen, rejected

    def _total_steps(self) -> int:
        per_step = self.config.batch_size * self.config.grad_accumulation
        steps = self.config.epochs * math.ceil(len(self.train_items) / per_step)
        return min(steps, self.config.max_steps or steps)

    # -- losses ---------------------------------------------------------------

    def _loss(self, items: Sequence[Tokenized | _Pair]) -> torch.Tensor:
        pairs = [item for item in items if isinstance(item, _Pair)]
        if pairs:
            return self._dpo_loss(pairs)
        rows = [item for item in items if isinstance(item, Tokenized)]
        return mean_answer_loss(self.model, collate(rows, self.pad_id, self.device))

    def _dpo_loss(self, pairs: Sequence[_Pair]) -> torch.Tensor:
        rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        logps = sequence_logprobs(self.model, collate(rows, self.pad_id, self.device))
        reference = torch.tensor([p.reference for p in pairs], device=self.device)
        n = len(pairs)
        loss, _ = dpo_loss(logps[:n], logps[n:], reference[:, 0], reference[:, 1], self.config.beta)
        return loss

    # -- train ----------------------------------------------------------------

    def _micro_batches(self, generator: torch.Generator) -> Iterator[list[list[int]]]:
        """Optimizer steps as lists of micro-batches of item indices, epoch after epoch."""
        size, accumulate = self.config.batch_size, self.config.grad_accumulation
        for _ in range(self.config.epochs):
            order = torch.randperm(len(self.train_items), generator=generator).tolist()
            micro = [order[i : i + size] for i in range(0, len(order), size)]
            for start in range(0, len(micro), accumulate):
                yield micro[start : start + accumulate]

    def train(self) -> TrainResult:
        """Run the optimizer steps; raises ``TrainingCancelled`` if ``should_stop`` says so."""
        result = TrainResult()
        generator = torch.Generator().manual_seed(self.config.seed)
        stale = 0
        self.model.train()
        for step, group in enumerate(self._micro_batches(generator), start=1):
            train_loss = self._optimizer_step(group)
            result.trained_tokens += sum(_tokens(self.train_items[i]) for m in group for i in m)
            rate = float(self.scheduler.get_last_lr()[0])
            report = StepReport(step, self.total_steps, train_loss, rate)
            if step % self.config.eval_every == 0 or step == self.total_steps:
                report, improved = self._evaluate_step(report, result)
                stale = 0 if improved else stale + 1
            result.steps, result.final_train_loss = step, train_loss
            result.history.append(report)
            self.on_step(report)
            if self.should_stop():
                raise TrainingCancelled(f"training stopped on request at step {step}")
            if stale >= self.config.patience:
                result.stopped_early = True
            if step >= self.total_steps or result.stopped_early:
                break
        if self._best is None:  # no validation data: the last weights are the result
            self._best = self._snapshot()
            result.best_step = result.steps
        return result

    def _optimizer_step(self, group: list[list[int]]) -> float:
        total = 0.0
        for indices in group:
            loss = self._loss([self.train_items[i] for i in indices]) / len(group)
            loss.backward()
            total += float(loss.item())
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _evaluate_step(self, report: StepReport, result: TrainResult) -> tuple[StepReport, bool]:
        if not self.validation_items:
            return report, True
        loss = self.evaluate()
        improved = result.best_validation_loss is None or loss < result.best_validation_loss
        snapshot = self._snapshot()
        self._kept = [*self._kept, (report.step, snapshot)][-KEEP_CHECKPOINTS:]
        if improved:
            result.best_validation_loss, result.best_step = loss, report.step
            self._best = snapshot
        return StepReport(
            **{**report.__dict__, "validation_loss": loss, "is_best": improved}
        ), improved

    def _snapshot(self) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(self.model)
        return {name: tensor.detach().clone() for name, tensor in state.items()}

    # -- evaluate / save ------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss (answer cross-entropy, or the DPO loss), in eval mode."""
        self.model.eval()
        size = self.config.batch_size
        items = self.validation_items
        losses = [
            float(self._loss(items[i : i + size]).item()) * len(items[i : i + size])
            for i in range(0, len(items), size)
        ]
        self.model.train()
        return sum(losses) / max(1, len(items))

    def save(self, out_dir: Path) -> Path:
        """Write the best adapter as stock PEFT files (config + safetensors) into ``out_dir``,
        and the kept checkpoints beside it (``checkpoint_dirs``)."""
        if self._best is None:
            raise RuntimeError("nothing to save: call train() first")
        out_dir = Path(out_dir)
        for step, weights in self._kept:
            self._write(weights, _checkpoints_dir(out_dir) / f"step-{step}")
        return self._write(self._best, out_dir)

    def _write(self, weights: dict[str, torch.Tensor], out_dir: Path) -> Path:
        set_peft_model_state_dict(self.model, weights)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out_dir), safe_serialization=True)
        (out_dir / "README.md").unlink(missing_ok=True)
        return out_dir


def _checkpoints_dir(adapter_dir: Path) -> Path:
    return adapter_dir.with_name(f"{adapter_dir.name}-checkpoints")


def checkpoint_dirs(adapter_dir: Path) -> list[tuple[int, Path]]:
    """(step, PEFT files) of the checkpoints ``LoRARecipe.save`` wrote beside the adapter
    it saved into ``adapter_dir``, oldest first."""
    found = _checkpoints_dir(adapter_dir)
    steps = sorted(int(p.name[5:]) for p in found.glob("step-*")) if found.is_dir() else []
    return [(step, found / f"step-{step}") for step in steps]
