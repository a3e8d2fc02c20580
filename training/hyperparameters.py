"""OpenAI fine-tuning hyperparameters -> ``TrainConfig``.

OpenAI's names (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``, ``beta``;
``"auto"`` or absent: the default, which the worker then picks, ``training.auto``) map
onto the recipe's fields; any ``TrainConfig`` field (``r``, ``alpha``, ``target_modules``,
``eval_every``...) may be given by its own name too. Unknown names are refused.
"""

from __future__ import annotations

from typing import Any

from training.auto import Auto
from training.config import ConfigError, TrainConfig
from training.data import Method

_RENAMED = {"n_epochs": "epochs", "batch_size": "batch_size", "beta": "beta"}
_NOT_OVERRIDABLE = ("method", "seed")
"""Set from the job's own fields, never from its hyperparameters."""


def train_config(
    defaults: TrainConfig, method: Method, seed: int, hyperparameters: dict[str, Any]
) -> TrainConfig:
    """The config a job trains with; raises ``ConfigError`` listing every bad value."""
    overrides: dict[str, Any] = {"method": method, "seed": seed}
    problems: list[str] = []
    for name, value in hyperparameters.items():
        if value == "auto" or value is None:
            continue
        if name == "learning_rate_multiplier":
            if not isinstance(value, int | float) or value <= 0:
                problems.append(
                    f"learning_rate_multiplier must be a positive number, got {value!r}"
                )
                continue
            overrides["learning_rate"] = defaults.learning_rate * float(value)
        elif name in _NOT_OVERRIDABLE:
            problems.append(f"{name!r} is set by the job itself, not by hyperparameters")
        else:
            overrides[_RENAMED.get(name, name)] = value
    if problems:
        raise ConfigError(problems)
    try:
        return defaults.with_overrides(overrides)
    except TypeError as exc:  # a value of the wrong type reached a comparison
        raise ConfigError([f"a hyperparameter has the wrong type: {exc}"]) from None


def _given(hyperparameters: dict[str, Any], *names: str) -> bool:
    return any(hyperparameters.get(name) not in (None, "auto") for name in names)


def auto_of(hyperparameters: dict[str, Any]) -> Auto:
    """Which of epochs, batch size and learning rate a job left for the worker to pick
    (a ``TrainConfig`` name, ``epochs`` or ``learning_rate``, sets it as much as OpenAI's)."""
    return Auto(
        epochs=not _given(hyperparameters, "n_epochs", "epochs"),
        batch_size=not _given(hyperparameters, "batch_size"),
        learning_rate=not _given(hyperparameters, "learning_rate_multiplier", "learning_rate"),
    )
