"""``auto`` hyperparameters: which a job leaves open, and epochs and batch size by size."""

from __future__ import annotations

from training.auto import Auto, sized
from training.config import TrainConfig
from training.hyperparameters import auto_of


def test_a_job_leaves_to_auto_what_it_does_not_set_by_either_name() -> None:
    assert auto_of({}) == Auto()
    assert auto_of({"n_epochs": "auto", "batch_size": None}) == Auto()
    assert auto_of({"n_epochs": 2, "learning_rate": 1e-3}) == Auto(False, True, False)
    assert auto_of({"epochs": 2, "learning_rate_multiplier": 3}) == Auto(False, True, False)
    assert auto_of({"batch_size": 2}) == Auto(True, False, True)


def test_small_sets_get_more_passes_and_large_ones_bigger_batches() -> None:
    config = TrainConfig()
    assert (sized(config, Auto(), 60).epochs, sized(config, Auto(), 60).batch_size) == (6, 4)
    assert (sized(config, Auto(), 400).epochs, sized(config, Auto(), 400).batch_size) == (3, 4)
    assert (sized(config, Auto(), 20000).epochs, sized(config, Auto(), 20000).batch_size) == (2, 16)
    kept = sized(config, Auto(epochs=False, batch_size=False), 60)
    assert (kept.epochs, kept.batch_size) == (config.epochs, config.batch_size)
