"""Pushing stock PEFT adapters: versions, idempotency, fingerprints, fetching for engines."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

from conftest import ADMIN
from registry_testdata import BASE_NAME, blob_keys, copy_adapter, edit_config
from safetensors.torch import load_file

from registry import AdapterVersion, BaseModelRecord, Provenance, Registry, Tenant, lora_name


def test_push_stock_peft_output_unchanged(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    version = registry.push_adapter(
        tenant.id, "support-bot", adapters["v1"], BASE_NAME, ADMIN, description="answers tickets"
    )
    assert (version.number, version.rank, version.alpha) == (1, 8, 16.0)
    assert version.lora_name == lora_name(version.fingerprint)
    assert version.lora_name == "lx-" + version.fingerprint[:16]
    assert version.base_id == base.id and version.state == "active"
    assert version.target_modules == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")
    )
    assert blob_keys(registry.blobs)[-1].endswith(f"adapters/{version.fingerprint}.tar")
    adapter = registry.get_adapter(tenant.id, "support-bot")
    assert adapter is not None and adapter.description == "answers tickets"


def test_versions_number_up_and_same_bytes_are_idempotent(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    first = registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, ADMIN)
    second = registry.push_adapter(tenant.id, "bot", adapters["v2"], BASE_NAME, ADMIN)
    events = len(registry.audit_log())
    again = registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, ADMIN)
    assert [first.number, second.number, again.number] == [1, 2, 1]
    assert again.id == first.id
    assert [v.number for v in registry.list_versions(tenant.id, "bot")] == [1, 2]
    assert len(registry.audit_log()) == events  # no audit spam for a repeat upload


def test_machine_specific_config_fields_do_not_change_the_fingerprint(
    registry: Registry,
    base: BaseModelRecord,
    tenant: Tenant,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    assert tenant.id is not None
    moved = edit_config(
        copy_adapter(adapters["v1"], tmp_path / "moved"),
        base_model_name_or_path="/elsewhere/base",
        inference_mode=False,
        revision="abc",
    )
    first = registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, ADMIN)
    second = registry.push_adapter(tenant.id, "bot", moved, BASE_NAME, ADMIN)
    assert second.id == first.id


def test_provenance_is_recorded(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    parent = registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, ADMIN)
    provenance = Provenance(
        dataset_sha256="d" * 64,
        training_config_sha256="c" * 64,
        seed=7,
        library_versions={"peft": "0.21.2"},
        parent_version=1,
        training_job="job-1",
    )
    child = registry.push_adapter(
        tenant.id, "bot", adapters["v2"], base.fingerprint, ADMIN, provenance=provenance
    )
    stored = registry.get_version(tenant.id, "bot", child.number)
    assert (stored.dataset_sha256, stored.training_config_sha256) == ("d" * 64, "c" * 64)
    assert (stored.seed, stored.training_job) == (7, "job-1")
    assert stored.library_versions == {"peft": "0.21.2"}
    assert stored.parent_version_id == parent.id and stored.created_by == ADMIN.name


def test_fetch_version_gives_the_canonical_files(
    registry: Registry,
    bot_v1: AdapterVersion,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    version = bot_v1
    found = registry.version_by_lora_name(version.lora_name)
    assert found is not None and found.base.id == version.base_id
    assert found.blob_sha256 == version.blob_sha256
    fetched = registry.fetch_version(version.lora_name, tmp_path / "cache")
    assert fetched == tmp_path / "cache" / version.lora_name
    assert sorted(p.name for p in fetched.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    original, copy = (
        load_file(adapters["v1"] / "adapter_model.safetensors"),
        load_file(fetched / "adapter_model.safetensors"),
    )
    assert original.keys() == copy.keys()
    assert all(original[k].equal(copy[k]) for k in original)
    config = json.loads((fetched / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    assert "base_model_name_or_path" not in config


def test_fetched_adapter_loads_in_peft(
    registry: Registry,
    bot_v1: AdapterVersion,
    adapters: dict[str, Path],
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    version = bot_v1
    fetched = registry.fetch_version(version.lora_name, tmp_path / "cache")
    ids = torch.tensor([[1, 2, 3, 4]])
    outputs = [
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), path)(ids).logits
        for path in (adapters["v1"], fetched)
    ]
    assert torch.equal(outputs[0], outputs[1])


def test_blob_is_deterministic_tar(
    registry: Registry,
    bot_v1: AdapterVersion,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    version = bot_v1
    registry.blobs.fetch(version.blob_key, version.blob_sha256, tmp_path / "blob.tar")
    with tarfile.open(tmp_path / "blob.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["adapter_config.json", "adapter_model.safetensors"]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
    assert (tmp_path / "blob.tar").stat().st_size == version.size_bytes


def test_upload_as_files_tar_and_zip_give_the_same_version(
    registry: Registry,
    base: BaseModelRecord,
    tenant: Tenant,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    assert tenant.id is not None
    src = adapters["v1"]
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    tar_path = tmp_path / "a.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="my-adapter")
    zip_path = Path(shutil.make_archive(str(tmp_path / "a"), "zip", src))
    numbers = {
        registry.push_adapter(tenant.id, "bot", source, BASE_NAME, ADMIN).number
        for source in (files, tar_path, zip_path, src)
    }
    assert numbers == {1}


def test_zip_members_without_file_type_bits_are_regular_files(
    registry: Registry,
    base: BaseModelRecord,
    tenant: Tenant,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    """``ZipFile.writestr(name, data)`` records permissions only; such members are files."""
    assert tenant.id is not None
    zip_path = tmp_path / "writestr.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for member in sorted(adapters["v1"].iterdir()):
            archive.writestr(member.name, member.read_bytes())
    assert {info.external_attr >> 16 for info in zipfile.ZipFile(zip_path).infolist()} == {0o600}
    version = registry.push_adapter(tenant.id, "zipped", zip_path, BASE_NAME, ADMIN)
    assert version.number == 1
