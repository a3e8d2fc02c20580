"""Every refusal of an upload: a real malicious or broken adapter, the precise
message, and proof that nothing (no row, no blob, no audit event) was stored."""

from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import ADMIN
from registry_testdata import BASE_NAME, blob_keys, copy_adapter, edit_config, edit_tensors
from sqlmodel import Session, func, select

from registry import (
    AdapterRejected,
    AdapterVersion,
    AuditEvent,
    BaseModelRecord,
    InvalidRequest,
    Registry,
    Tenant,
    UploadLimits,
)
from registry.archive import UploadSource
from registry.models import Adapter

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
ALLOWED = f"file type not allowed; an upload holds only {CFG} and {WTS} (README.md is ignored)"


@dataclass
class Case:
    """One broken upload: how to build it and exactly what the registry must say."""

    build: Callable[[dict[str, Path], Path], UploadSource]
    problems: list[str] | Callable[[dict[str, Path]], list[str]]
    """The exact messages (or how to compute them from the built adapters)."""
    limits: UploadLimits = field(default_factory=UploadLimits)
    base: str = BASE_NAME


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def _good_members(src: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [(tarfile.TarInfo(name), (src / name).read_bytes()) for name in (CFG, WTS)]


def _tar_with(extra: tarfile.TarInfo, data: bytes | None = b"x") -> Callable[..., Path]:
    def build(adapters: dict[str, Path], tmp: Path) -> Path:
        return _tar([*_good_members(adapters["v1"]), (extra, data)], tmp / "upload.tar")

    return build


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _pickle_weights(adapters: dict[str, Path], tmp: Path) -> Path:
    dest = tmp / "pickled"
    dest.mkdir()
    (dest / CFG).write_bytes((adapters["v1"] / CFG).read_bytes())
    torch.save({"w": torch.zeros(2)}, dest / "adapter_model.bin")
    return dest


def _symlink_in_dir(adapters: dict[str, Path], tmp: Path) -> Path:
    dest = copy_adapter(adapters["v1"], tmp / "linked")
    os.symlink("/etc/passwd", dest / "notes.md")
    return dest


def _zip_symlink(adapters: dict[str, Path], tmp: Path) -> Path:
    path = tmp / "upload.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in (CFG, WTS):
            archive.write(adapters["v1"] / name, name)
        link = zipfile.ZipInfo("notes.txt")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    return path


def _many_members(adapters: dict[str, Path], tmp: Path) -> Path:
    extra = [(tarfile.TarInfo(f"README{i}.md"), b"x") for i in range(20)]
    return _tar([*_good_members(adapters["v1"]), *extra], tmp / "upload.tar")


def _edited(**changes: object) -> Callable[..., Path]:
    def build(adapters: dict[str, Path], tmp: Path) -> Path:
        return edit_config(copy_adapter(adapters["v1"], tmp / "edited"), **changes)

    return build


def _tensors(
    edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> Callable[..., Path]:
    def build(adapters: dict[str, Path], tmp: Path) -> Path:
        return edit_tensors(copy_adapter(adapters["v1"], tmp / "edited"), edit)

    return build


def _set(
    name: str, value: torch.Tensor
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda tensors: {**tensors, name: value}


def _rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda tensors: {(new if k == old else k): v for k, v in tensors.items()}


def _with_nan(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    poisoned = tensors[f"{Q0}.lora_B.weight"].clone()
    poisoned[3, 1] = float("nan")
    return {**tensors, f"{Q0}.lora_B.weight": poisoned}


def _with_inf_bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    poisoned = tensors[f"{Q0}.lora_A.weight"].to(torch.bfloat16)
    poisoned[0, 0] = float("-inf")
    return {**tensors, f"{Q0}.lora_A.weight": poisoned}


def _size(adapter: Path) -> int:
    return sum((adapter / name).stat().st_size for name in (CFG, WTS))


def _readme(size: int) -> Callable[..., Path]:
    def build(adapters: dict[str, Path], tmp: Path) -> Path:
        dest = copy_adapter(adapters["v1"], tmp / "big")
        (dest / "README.md").write_bytes(b"x" * size)
        return dest

    return build


CASES: dict[str, Case] = {
    "pickle weights": Case(_pickle_weights, [
        "adapter_model.bin: pickle-based weights are refused (they can run code when loaded); "
        "save the adapter with safe_serialization=True to get adapter_model.safetensors",
        f"{WTS} is missing; upload the output of PEFT save_pretrained",
    ]),
    "other file type": Case(lambda a, t: {CFG: (a["v1"] / CFG).read_bytes(),
                                          WTS: (a["v1"] / WTS).read_bytes(),
                                          "run.sh": b"rm -rf /"},
                            [f"run.sh: {ALLOWED}"]),
    "dot-dot path": Case(_tar_with(tarfile.TarInfo("../evil.txt")),
                         ["../evil.txt: '..' is not allowed in an upload path"]),
    "absolute path": Case(_tar_with(tarfile.TarInfo("/etc/cron.d/evil")),
                          ["/etc/cron.d/evil: absolute paths are not allowed in an upload"]),
    "tar symlink": Case(_tar_with(_link("README.md", tarfile.SYMTYPE, "/etc/passwd"), None),
                        ["README.md: is a symbolic link; only regular files are allowed"]),
    "tar hard link": Case(_tar_with(_link("README.md", tarfile.LNKTYPE, CFG), None),
                          ["README.md: is a hard link; only regular files are allowed"]),
    "tar device": Case(_tar_with(_link("README.md", tarfile.CHRTYPE, ""), None),
                       ["README.md: is a device or special file; only regular files are allowed"]),
    "directory symlink": Case(_symlink_in_dir,
                              ["notes.md: is a symbolic link; only regular files are allowed"]),
    "zip symlink": Case(_zip_symlink,
                        ["notes.txt: is a symbolic link; only regular files are allowed"]),
    "too many members": Case(_many_members, [
        "upload holds more than 16 files; upload only the adapter's files"]),
    "too large member": Case(_readme(200_000), [
        "README.md: 200000 bytes exceeds the 100000-byte limit per file"],
        limits=UploadLimits(max_member_bytes=100_000)),
    "too large total": Case(_readme(90_000), lambda a: [
        f"upload holds {_size(a['v1']) + 90_000} bytes, more than the 100000-byte limit"],
        limits=UploadLimits(max_total_bytes=100_000)),
    "not lora": Case(_edited(peft_type="IA3"), [
        f"{CFG}: peft_type is 'IA3'; only LoRA adapters (peft_type 'LORA') can be served"]),
    "dora": Case(_edited(use_dora=True), [
        f"{CFG}: uses DoRA (use_dora: true), which vLLM cannot serve; train with use_dora=False"]),
    "modules_to_save": Case(_edited(modules_to_save=["lm_head"]), [
        f"{CFG}: modules_to_save ['lm_head'] is set; vLLM serves only LoRA weights, so train "
        "without modules_to_save"]),
    "bias": Case(_edited(bias="all"), [f"{CFG}: bias is 'all'; vLLM serves only bias 'none'"]),
    "rank too big": Case(lambda a, t: a["r80"], [
        f"{CFG}: r is 80, above the maximum rank 64; retrain with a smaller r"]),
    "unknown target module": Case(_edited(target_modules=["q_proj", "v_proj", "w_proj"]), [
        f"{CFG}: target module 'w_proj' matches no module of the pinned base model"]),
    "module not in base": Case(_tensors(_rename(
        f"{Q0}.lora_A.weight", "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight")), [
        f"{WTS}: module 'model.layers.0.self_attn.q_proj' lacks lora_A.weight",
        f"{WTS}: module 'model.layers.7.self_attn.q_proj' is not a Linear module of the pinned "
        "base model; train the adapter on this base"]),
    "wrong shape": Case(_tensors(_set(f"{Q0}.lora_A.weight", torch.zeros(8, 64))), [
        f"{WTS}: {Q0}.lora_A.weight has shape [8, 64], expected [8, 128] for rank 8 on this base"]),
    "wrong dtype": Case(_tensors(_set(f"{Q0}.lora_A.weight", torch.zeros(8, 128).int())), [
        f"{WTS}: {Q0}.lora_A.weight has dtype I32; use one of F32, F16, BF16"]),
    "stray tensor": Case(_tensors(_set("lm_head.weight", torch.zeros(256, 128))), [
        f"{WTS}: tensor 'lm_head.weight' is not a LoRA weight "
        "(expected base_model.model.<module>.lora_A/lora_B.weight)"]),
    "nan": Case(_tensors(_with_nan), [
        f"{WTS}: {Q0}.lora_B.weight holds NaN or Inf values; the adapter diverged in training"]),
    "inf bf16": Case(_tensors(_with_inf_bf16), [
        f"{WTS}: {Q0}.lora_A.weight holds NaN or Inf values; the adapter diverged in training"]),
    "not safetensors": Case(lambda a, t: {CFG: (a["v1"] / CFG).read_bytes(), WTS: b"\x80"}, [
        f"{WTS} is not a valid safetensors file: file is shorter than the 8-byte header length"]),
    "unknown base": Case(lambda a, t: a["v1"], [
        "base 'gpt-17' names no registered base model (by name, revision or fingerprint); "
        "list bases and pin one of them"], base="gpt-17"),
    "several problems at once": Case(_edited(use_dora=True, bias="lora_only", r=99), [
        f"{CFG}: uses DoRA (use_dora: true), which vLLM cannot serve; train with use_dora=False",
        f"{CFG}: bias is 'lora_only'; vLLM serves only bias 'none'",
        f"{CFG}: r is 99, above the maximum rank 64; retrain with a smaller r",
        *(f"{WTS}: base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{p}.weight has shape "
          f"{shape}, expected {[99, 128] if p == 'A' else [128, 99]} for rank 99 on this base"
          for i in (0, 1) for m in ("q", "v") for p, shape in (("A", [8, 128]), ("B", [128, 8])))]),
}  # fmt: skip


def _counts(registry: Registry) -> tuple[int, int, int]:
    with Session(registry.database) as s:
        return tuple(  # type: ignore[return-value]
            s.exec(select(func.count()).select_from(table)).one()
            for table in (Adapter, AdapterVersion, AuditEvent)
        )


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_refused_with_precise_message_and_nothing_stored(
    case: Case, make_registry: Callable[..., Registry], tiny_base: Path,
    adapters: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    registry = make_registry(case.limits)
    registry.register_base(tiny_base, BASE_NAME, "r1", ADMIN)
    tenant = registry.create_tenant("acme", ADMIN)
    assert tenant.id is not None
    source = case.build(adapters, tmp_path)
    before = _counts(registry)
    with pytest.raises(AdapterRejected) as caught:
        registry.push_adapter(tenant.id, "bot", source, case.base, ADMIN)
    expected = case.problems(adapters) if callable(case.problems) else case.problems
    assert caught.value.problems == expected
    assert _counts(registry) == before
    assert blob_keys(registry.blobs) == []


def test_problems_from_the_base_pin_and_the_archive_come_together(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, tmp_path: Path
) -> None:
    assert tenant.id is not None
    upload = {"model.pt": b"\x80\x02"}
    with pytest.raises(AdapterRejected) as caught:
        registry.push_adapter(tenant.id, "bot", upload, "nope", ADMIN)
    assert caught.value.problems[0].startswith("base 'nope' names no registered base model")
    assert caught.value.problems[1].startswith("model.pt: pickle-based weights are refused")
    assert "upload again" in str(caught.value)


def test_deprecated_base_refuses_new_versions(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    registry.deprecate_base(BASE_NAME, "superseded by r2", ADMIN)
    with pytest.raises(AdapterRejected) as caught:
        registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, ADMIN)
    assert caught.value.problems == [
        f"base '{BASE_NAME}' is deprecated (superseded by r2); train on its successor"
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("LX-bot", "is in the 'lx-' namespace (in any case)"),
        ("b" * 65, "is not valid: use 1-64 ASCII letters"),
    ],
)
def test_names_no_request_may_use_are_refused_before_any_upload(
    registry: Registry,
    base: BaseModelRecord,
    tenant: Tenant,
    adapters: dict[str, Path],
    name: str,
    message: str,
) -> None:
    assert tenant.id is not None
    before = _counts(registry)
    with pytest.raises(InvalidRequest, match=re.escape(f"adapter name {name!r} {message}")):
        registry.push_adapter(tenant.id, name, adapters["v1"], BASE_NAME, ADMIN)
    assert _counts(registry) == before
    assert blob_keys(registry.blobs) == []
