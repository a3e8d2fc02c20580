"""Checking a staged PEFT adapter against its pinned base model and the upload limits.

Only what vLLM can serve passes: LoRA without DoRA, ``modules_to_save`` or
biases, rank within the limit, every tensor a ``lora_A``/``lora_B`` pair for a
module of the base with the shapes the base and the rank imply, finite
floating-point values. Every problem is collected into one ``AdapterRejected``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.archive import CONFIG_FILE, WEIGHTS_FILE
from registry.errors import AdapterRejected
from registry.fingerprint import adapter_fingerprint, normalize_lora_config
from registry.limits import UploadLimits
from registry.safetensors_io import SafetensorsError, TensorInfo, has_nonfinite, read_header

SERVABLE_DTYPES = ("F32", "F16", "BF16")
# PEFT options (newer than DoRA and modules_to_save) that change what the weights mean in
# ways vLLM's LoRA layers do not implement; any truthy value is refused.
UNSERVABLE_OPTIONS = (
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "monteclora_config",
    "velora_config",
)
# PEFT saves adapter tensors as base_model.model.<module path>.lora_A.weight (or lora_B).
_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class ValidatedAdapter:
    """A staged adapter that passed every check."""

    config: dict[str, Any]
    """The normalized LoRA config (what the fingerprint and the stored blob hold)."""
    weights: Path
    """The staged adapter_model.safetensors."""
    tensors: dict[str, TensorInfo]
    """Its tensors by name."""
    fingerprint: str
    """SHA-256 hex of the canonical form."""
    rank: int
    alpha: float
    target_modules: list[str]
    """Full module paths the adapter changes, sorted."""


def _load_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected([f"{CONFIG_FILE} is not valid JSON ({exc})"]) from exc
    if not isinstance(config, dict):
        raise AdapterRejected([f"{CONFIG_FILE} must hold a JSON object"])
    return config


def _load_tensors(path: Path) -> dict[str, TensorInfo]:
    try:
        return read_header(path)
    except SafetensorsError as exc:
        raise AdapterRejected([f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}"]) from exc


def config_problems(config: dict[str, Any], limits: UploadLimits) -> list[str]:
    """What in a LoRA config vLLM cannot serve, or the limits forbid."""
    where = CONFIG_FILE
    if config.get("peft_type") != "LORA":
        return [
            f"{where}: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
            "(peft_type 'LORA') can be served"
        ]
    problems = []
    if config.get("use_dora"):
        problems.append(
            f"{where}: uses DoRA (use_dora: true), which vLLM cannot serve; "
            "train with use_dora=False"
        )
    if config.get("modules_to_save"):
        problems.append(
            f"{where}: modules_to_save {config['modules_to_save']} is set; vLLM "
            "serves only LoRA weights, so train without modules_to_save"
        )
    if config.get("bias", "none") != "none":
        problems.append(f"{where}: bias is {config['bias']!r}; vLLM serves only bias 'none'")
    for option in UNSERVABLE_OPTIONS:
        if config.get(option):
            problems.append(f"{where}: {option} is set; vLLM cannot serve adapters that use it")
    problems += _rank_problems(config, limits)
    if not isinstance(config.get("lora_alpha", 8), int | float):
        problems.append(f"{where}: lora_alpha {config['lora_alpha']!r} is not a number")
    return problems


def _rank_problems(config: dict[str, Any], limits: UploadLimits) -> list[str]:
    ranks = {"r": config.get("r", 8)}
    ranks.update({f"rank_pattern[{k!r}]": v for k, v in (config.get("rank_pattern") or {}).items()})
    problems = []
    for field, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            problems.append(f"{CONFIG_FILE}: {field} {rank!r} is not a positive integer")
        elif rank > limits.max_rank:
            problems.append(
                f"{CONFIG_FILE}: {field} is {rank}, above the maximum rank "
                f"{limits.max_rank}; retrain with a smaller r"
            )
    return problems


def _matches(module: str, patterns: Any) -> bool:
    """PEFT's target_modules rule: a regex string fullmatches, a list entry matches a suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith(f".{p}") for p in patterns or [])


def _pattern_value(module: str, patterns: dict[str, Any], default: Any) -> Any:
    for key, value in patterns.items():
        if module == key or module.endswith(f".{key}") or re.fullmatch(key, module):
            return value
    return default


def _group_tensors(
    tensors: dict[str, TensorInfo],
) -> tuple[dict[str, dict[str, TensorInfo]], list[str]]:
    modules: dict[str, dict[str, TensorInfo]] = {}
    problems = []
    for name, info in sorted(tensors.items()):
        match = _TENSOR_NAME.match(name)
        if match is None:
            problems.append(
                f"{WEIGHTS_FILE}: tensor {name!r} is not a LoRA weight "
                "(expected base_model.model.<module>.lora_A/lora_B.weight)"
            )
            continue
        modules.setdefault(match["module"], {})[match["part"]] = info
    return modules, problems


def tensor_problems(
    config: dict[str, Any], tensors: dict[str, TensorInfo], module_table: dict[str, list[int]]
) -> list[str]:
    """Tensor names, shapes and dtypes that disagree with the config and the base's modules."""
    modules, problems = _group_tensors(tensors)
    if not tensors:
        problems.append(f"{WEIGHTS_FILE}: holds no tensors")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        for target in sorted(targets):
            if not any(_matches(path, [target]) for path in module_table):
                problems.append(
                    f"{CONFIG_FILE}: target module {target!r} matches no module of "
                    "the pinned base model"
                )
    for module, parts in sorted(modules.items()):
        problems += _module_problems(module, parts, config, module_table)
    return problems


def _module_problems(
    module: str, parts: dict[str, TensorInfo], config: dict[str, Any], table: dict[str, list[int]]
) -> list[str]:
    if module not in table:
        return [
            f"{WEIGHTS_FILE}: module {module!r} is not a Linear module of the pinned base "
            "model; train the adapter on this base"
        ]
    problems = []
    if not _matches(module, config.get("target_modules")):
        problems.append(
            f"{WEIGHTS_FILE}: module {module!r} has weights but is not in target_modules"
        )
    rank = _pattern_value(module, config.get("rank_pattern") or {}, config.get("r", 8))
    out_features, in_features = table[module]
    expected = {"A": (rank, in_features), "B": (out_features, rank)}
    for part, shape in expected.items():
        info = parts.get(part)
        if info is None:
            problems.append(f"{WEIGHTS_FILE}: module {module!r} lacks lora_{part}.weight")
        elif info.shape != shape:
            problems.append(
                f"{WEIGHTS_FILE}: {info.name} has shape {list(info.shape)}, expected "
                f"{list(shape)} for rank {rank} on this base"
            )
        elif info.dtype not in SERVABLE_DTYPES:
            problems.append(
                f"{WEIGHTS_FILE}: {info.name} has dtype {info.dtype}; use one of "
                f"{', '.join(SERVABLE_DTYPES)}"
            )
    return problems


def nonfinite_problems(weights: Path, tensors: dict[str, TensorInfo]) -> list[str]:
    with weights.open("rb") as f:
        return [
            f"{WEIGHTS_FILE}: {name} holds NaN or Inf values; the adapter diverged in training"
            for name, info in sorted(tensors.items())
            if has_nonfinite(f, info)
        ]


def validate_adapter(
    staged: dict[str, Path], module_table: dict[str, list[int]], limits: UploadLimits
) -> ValidatedAdapter:
    """Check staged files against the pinned base's module table; raise AdapterRejected."""
    config = _load_config(staged[CONFIG_FILE])
    weights = staged[WEIGHTS_FILE]
    tensors = _load_tensors(weights)
    problems = config_problems(config, limits)
    if config.get("peft_type") == "LORA":
        problems += tensor_problems(config, tensors, module_table)
    problems += nonfinite_problems(weights, tensors)
    if problems:
        raise AdapterRejected(problems)
    modules = sorted(_group_tensors(tensors)[0])
    return ValidatedAdapter(
        config=normalize_lora_config(config),
        weights=weights,
        tensors=tensors,
        fingerprint=adapter_fingerprint(config, weights, tensors),
        rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        target_modules=modules,
    )
