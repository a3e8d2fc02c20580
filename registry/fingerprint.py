"""Content fingerprints of adapters and base models.

An adapter's fingerprint is a SHA-256 over its canonical form: the
serving-relevant LoRA config (normalized, so machine-specific fields such as
``base_model_name_or_path`` don't matter) and every tensor in sorted-name
order (name, dtype, shape, raw bytes). A version's LoRA name derives from it
(``registry.lora_names``).

A base model's fingerprint covers config.json, the tokenizer files and the
weight index (tensor names, shapes and dtypes; not the weight bytes, which
would take minutes to hash for real models).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.safetensors_io import TensorInfo, iter_tensor_bytes, read_header

# Serving-relevant LoRA config fields and the value PEFT assumes when absent.
LORA_CONFIG_DEFAULTS: dict[str, Any] = {
    "peft_type": None,
    "r": 8,
    "lora_alpha": 8,
    "target_modules": None,
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def normalize_lora_config(config: dict[str, Any]) -> dict[str, Any]:
    """The serving-relevant fields of a PEFT LoRA config, with defaults filled in."""
    normalized = {key: config.get(key, default) for key, default in LORA_CONFIG_DEFAULTS.items()}
    targets = normalized["target_modules"]
    if isinstance(targets, list | tuple | set):
        normalized["target_modules"] = sorted(str(t) for t in targets)
    if isinstance(normalized["modules_to_save"], list) and not normalized["modules_to_save"]:
        normalized["modules_to_save"] = None
    return normalized


def adapter_fingerprint(
    config: dict[str, Any], weights: Path, tensors: dict[str, TensorInfo]
) -> str:
    """SHA-256 hex over the normalized config and the tensors of ``weights``."""
    digest = hashlib.sha256(b"loraplex-adapter-v1\n")
    digest.update(canonical_json(normalize_lora_config(config)) + b"\n")
    with weights.open("rb") as f:
        for name in sorted(tensors):
            info = tensors[name]
            digest.update(canonical_json([name, info.dtype, list(info.shape), info.nbytes]) + b"\n")
            for chunk in iter_tensor_bytes(f, info):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseModelInfo:
    fingerprint: str
    """SHA-256 over config.json, tokenizer files and the weight index."""
    architecture: str
    """First entry of config.json ``architectures`` ("" if absent)."""
    module_table: dict[str, list[int]]
    """Module path -> [out_features, in_features] for every 2-D ``*.weight`` tensor."""


def weight_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of every ``*.safetensors`` file in ``model_dir``, by name."""
    index: dict[str, TensorInfo] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        index.update(read_header(path))
    return index


def module_table(index: dict[str, TensorInfo]) -> dict[str, list[int]]:
    """Linear-like modules an adapter may target: 2-D ``<path>.weight`` -> [out, in]."""
    return {
        name.removesuffix(".weight"): [info.shape[0], info.shape[1]]
        for name, info in sorted(index.items())
        if name.endswith(".weight") and len(info.shape) == 2
    }


def fingerprint_base(model_dir: Path) -> BaseModelInfo:
    """Fingerprint and module table of a Hugging Face model directory (safetensors only)."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    index = weight_index(model_dir)
    if not index:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    digest = hashlib.sha256(b"loraplex-base-v1\n")
    digest.update(canonical_json(config) + b"\n")
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(canonical_json([name, path.stat().st_size]) + b"\n")
            digest.update(path.read_bytes())
    for name in sorted(index):
        info = index[name]
        digest.update(canonical_json([name, info.dtype, list(info.shape)]) + b"\n")
    architectures = config.get("architectures") or [""]
    return BaseModelInfo(digest.hexdigest(), str(architectures[0]), module_table(index))
