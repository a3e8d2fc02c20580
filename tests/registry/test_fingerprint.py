"""Fingerprints: adapters (content-addressed, machine-independent) and base models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import ADMIN, s3_store
from registry_testdata import BASE_NAME, create_database, drop_database

from registry import LocalBlobStore, Registry
from registry.fingerprint import adapter_fingerprint, fingerprint_base, normalize_lora_config
from registry.safetensors_io import read_header


def test_same_peft_adapter_same_fingerprint_on_sqlite_local_and_postgres_s3(
    tiny_base: Path, adapters: dict[str, Path], s3_endpoint: str, tmp_path: Path
) -> None:
    pg_url = create_database()
    stores = [
        (f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs")),
        (pg_url, s3_store(s3_endpoint, "fingerprint-test")),
    ]
    try:
        versions = []
        for url, blobs in stores:
            registry = Registry(url, blobs)
            registry.register_base(tiny_base, BASE_NAME, "r1", ADMIN)
            tenant = registry.create_tenant("acme", ADMIN)
            assert tenant.id is not None
            versions.append(
                registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, ADMIN)
            )
            registry.close()
    finally:
        drop_database(pg_url)
    assert versions[0].fingerprint == versions[1].fingerprint
    assert versions[0].blob_sha256 == versions[1].blob_sha256
    assert versions[0].lora_name == versions[1].lora_name


def test_adapter_fingerprint_depends_on_weights_and_serving_config(
    adapters: dict[str, Path],
) -> None:
    def fingerprint(adapter: Path, **changes: object) -> str:
        config = {**json.loads((adapter / "adapter_config.json").read_text()), **changes}
        weights = adapter / "adapter_model.safetensors"
        return adapter_fingerprint(config, weights, read_header(weights))

    v1 = fingerprint(adapters["v1"])
    assert v1 != fingerprint(adapters["v2"])
    assert v1 != fingerprint(adapters["v1"], lora_alpha=32)
    assert v1 == fingerprint(adapters["v1"], base_model_name_or_path="/other", peft_version="9")
    assert v1 == fingerprint(adapters["v1"], target_modules=["v_proj", "q_proj"])


def test_normalized_config_fills_peft_defaults() -> None:
    normalized = normalize_lora_config({"peft_type": "LORA", "r": 4, "target_modules": ["b", "a"]})
    assert normalized["target_modules"] == ["a", "b"]
    assert (normalized["bias"], normalized["use_rslora"], normalized["lora_alpha"]) == (
        "none",
        False,
        8,
    )


def test_base_fingerprint_and_module_table(tiny_base: Path, tmp_path: Path) -> None:
    info = fingerprint_base(tiny_base)
    assert info.architecture == "LlamaForCausalLM"
    assert info.module_table["model.layers.0.self_attn.q_proj"] == [128, 128]
    assert info.module_table["model.layers.1.mlp.down_proj"] == [128, 256]
    assert "model.norm" not in info.module_table  # 1-D weights are not Linear-like
    copy = Path(shutil.copytree(tiny_base, tmp_path / "copy"))
    assert fingerprint_base(copy).fingerprint == info.fingerprint
    (copy / "tokenizer.json").write_text("{}")
    assert fingerprint_base(copy).fingerprint != info.fingerprint


def test_registering_a_base_is_idempotent(registry: Registry, tiny_base: Path) -> None:
    first = registry.register_base(tiny_base, BASE_NAME, "r1", ADMIN)
    again = registry.register_base(tiny_base, BASE_NAME, "r1", ADMIN)
    assert first.id == again.id and len(registry.list_bases()) == 1
    assert registry.find_base(f"{BASE_NAME}@r1") is not None
    assert registry.find_base("r1") is not None and registry.find_base("r2") is None
