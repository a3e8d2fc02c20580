"""A version's blob: its canonical files in one deterministic, uncompressed tar.

Canonical files: ``adapter_config.json`` holding the normalized LoRA config
and ``adapter_model.safetensors`` rewritten canonically (see
``safetensors_io.write_canonical``). Equal fingerprints give equal blobs.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from registry.archive import CONFIG_FILE, WEIGHTS_FILE
from registry.errors import CorruptBlob
from registry.fingerprint import canonical_json
from registry.safetensors_io import write_canonical
from registry.validation import ValidatedAdapter

BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_bundle(adapter: ValidatedAdapter, dest: Path) -> tuple[str, int]:
    """Write the blob to ``dest``; return its (sha256 hex, size in bytes)."""
    config_bytes = canonical_json(adapter.config) + b"\n"
    weights = dest.with_name(dest.name + ".weights")
    try:
        with weights.open("wb") as f:
            write_canonical(adapter.weights, adapter.tensors, f)
        with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
            tar.addfile(_tar_info(CONFIG_FILE, len(config_bytes)), io.BytesIO(config_bytes))
            with weights.open("rb") as f:
                tar.addfile(_tar_info(WEIGHTS_FILE, weights.stat().st_size), f)
    finally:
        weights.unlink(missing_ok=True)
    digest = hashlib.sha256()
    with dest.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), dest.stat().st_size


def unpack_bundle(bundle: Path, dest: Path, key: str) -> None:
    """Unpack a verified bundle into the new directory ``dest`` (atomically: all or nothing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        with tarfile.open(bundle, "r:") as tar:
            for name in BUNDLE_FILES:
                member = tar.getmember(name)
                src = tar.extractfile(member)
                if not member.isfile() or src is None:
                    raise CorruptBlob(key, "a regular file " + name, "something else")
                with src, (staging / name).open("wb") as out:
                    shutil.copyfileobj(src, out)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
