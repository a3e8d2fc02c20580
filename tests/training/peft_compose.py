"""PEFT's own composition of adapters (``add_weighted_adapter``), the reference the
composition tests compare ``training.compose`` with (unit and end-to-end)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.compose import PEFT_COMBINATION, CompositionSpec, module_seed

COMPOSED = "composed"


def peft_composed_model(
    base: Path, parents: Sequence[Path], spec: CompositionSpec, rank: int
) -> Any:
    """The float32 base with every parent loaded and PEFT's combination of them active.

    DARE draws its drop from torch's global generator as PEFT visits modules; seeding it
    before each module with ``module_seed`` (as ``training.compose`` does) makes the drop
    the same one. The seeding is the only thing added: the math is PEFT's.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [f"parent{i}" for i in range(len(parents))]
    peft = PeftModel.from_pretrained(model, str(parents[0]), adapter_name=names[0])
    for name, path in zip(names[1:], parents[1:], strict=True):
        peft.load_adapter(str(path), adapter_name=name)
    lora: Any = peft.base_model  # LoraModel; its private hook is untyped
    paths = {id(module): path for path, module in lora.model.named_modules()}
    original = lora._svd_generalized_task_arithmetic_weighted_adapter

    def seeded(kind: str, adapters: Any, weights: Any, new_rank: int, target: Any, *rest: Any,
               **options: Any) -> Any:  # fmt: skip
        torch.manual_seed(module_seed(spec.drop_seed, paths[id(target)]))
        return original(kind, adapters, weights, new_rank, target, *rest, **options)

    lora._svd_generalized_task_arithmetic_weighted_adapter = seeded
    lora.add_weighted_adapter(
        names,
        [p.weight for p in spec.parents],
        COMPOSED,
        combination_type=PEFT_COMBINATION[spec.method],
        svd_rank=rank,
        density=spec.density,
        majority_sign_method=spec.sign_method,
    )
    peft.set_adapter(COMPOSED)
    peft.eval()
    return peft


def peft_deltas(model: Any) -> dict[str, torch.Tensor]:
    """Module path -> the composed adapter's delta ``B @ A * scaling`` in ``model``."""
    from peft.tuners.lora import LoraLayer

    layers: dict[str, Any] = {
        path: module
        for path, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and COMPOSED in module.lora_A
    }
    return {path: layer.get_delta_weight(COMPOSED).detach() for path, layer in layers.items()}
