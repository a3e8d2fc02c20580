"""Turning an upload (directory, files or tar/zip archive) into staged adapter files.

Every member is checked before anything is written: names (no absolute
paths, no ``..``), types (regular files only: no links or devices), counts
and sizes, and file kinds (only the two PEFT files; README.md is ignored;
pickle weights are refused by name). All problems are reported together.
"""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from registry.errors import AdapterRejected
from registry.limits import UploadLimits

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
IGNORED_FILES = ("README.md",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

UploadSource = Path | Mapping[str, bytes | Path]
"""A directory, a tar/zip archive file, or uploaded files (name -> content or temp path)."""


@dataclass
class Member:
    """One file of an upload, not yet read."""

    name: str
    size: int
    kind: str
    """"file", "dir", or what else it is (a reason to refuse it)."""
    open: Callable[[], BinaryIO]


def _member_problems(member: Member, limits: UploadLimits) -> list[str]:
    """The first thing wrong with a member (later checks would only add noise)."""
    path = PurePosixPath(member.name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        return [f"{member.name}: absolute paths are not allowed in an upload"]
    if ".." in path.parts:
        return [f"{member.name}: '..' is not allowed in an upload path"]
    if member.kind == "dir":
        return []
    if member.kind != "file":
        return [f"{member.name}: is a {member.kind}; only regular files are allowed"]
    if member.size > limits.max_member_bytes:
        return [
            f"{member.name}: {member.size} bytes exceeds the {limits.max_member_bytes}-byte "
            "limit per file"
        ]
    return _file_kind_problems(member.name, path.name)


def _file_kind_problems(name: str, basename: str) -> list[str]:
    if basename in REQUIRED_FILES or basename in IGNORED_FILES:
        return []
    if basename.lower().endswith(PICKLE_SUFFIXES):
        return [
            f"{name}: pickle-based weights are refused (they can run code when loaded); "
            "save the adapter with safe_serialization=True to get adapter_model.safetensors"
        ]
    return [
        f"{name}: file type not allowed; an upload holds only {CONFIG_FILE} and "
        f"{WEIGHTS_FILE} (README.md is ignored)"
    ]


def _layout_problems(members: list[Member], limits: UploadLimits) -> list[str]:
    problems = []
    total = sum(m.size for m in members if m.kind == "file")
    if total > limits.max_total_bytes:
        problems.append(
            f"upload holds {total} bytes, more than the {limits.max_total_bytes}-byte limit"
        )
    for required in REQUIRED_FILES:
        found = [m.name for m in members if m.kind == "file" and _basename(m) == required]
        if not found:
            problems.append(f"{required} is missing; upload the output of PEFT save_pretrained")
        elif len(found) > 1:
            problems.append(
                f"{required} appears {len(found)} times ({', '.join(found)}); "
                "upload one adapter at a time"
            )
    parents = {_parent(m) for m in members if m.kind == "file" and _basename(m) in REQUIRED_FILES}
    if len(parents) > 1:
        problems.append(f"{CONFIG_FILE} and {WEIGHTS_FILE} must sit in the same folder")
    return problems


def _basename(member: Member) -> str:
    return PurePosixPath(member.name.replace("\\", "/")).name


def _parent(member: Member) -> str:
    return str(PurePosixPath(member.name.replace("\\", "/")).parent)


def _too_many(limits: UploadLimits) -> AdapterRejected:
    return AdapterRejected(
        [f"upload holds more than {limits.max_members} files; upload only the adapter's files"]
    )


def _bounded(members: Iterator[Member], limits: UploadLimits) -> list[Member]:
    """Members, stopping as soon as there are too many (a bomb may list millions)."""
    found: list[Member] = []
    for member in members:
        if len(found) == limits.max_members:
            raise _too_many(limits)
        found.append(member)
    return found


def _directory_members(root: Path) -> Iterator[Member]:
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = _kind_from_mode(info.st_mode)
        name = path.relative_to(root).as_posix()
        yield Member(name, info.st_size, kind, partial(_open_path, path))


def _kind_from_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "device or special file"


def _tar_members(tar: tarfile.TarFile) -> Iterator[Member]:
    for info in iter(tar.next, None):
        kind = (
            "file"
            if info.isfile()
            else "dir"
            if info.isdir()
            else "symbolic link"
            if info.issym()
            else "hard link"
            if info.islnk()
            else "device or special file"
        )
        yield Member(info.name, info.size, kind, partial(_tar_open, tar, info))


def _tar_open(tar: tarfile.TarFile, info: tarfile.TarInfo) -> BinaryIO:
    f = tar.extractfile(info)
    assert f is not None  # only called for regular files
    return f  # type: ignore[return-value]


def _zip_members(archive: zipfile.ZipFile) -> Iterator[Member]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        # No file-type bits (only permissions, as Python's ZipFile.writestr and many
        # Windows tools write): a regular file. Type bits saying link or device: refused.
        typed = stat.S_IFMT(mode) != 0
        kind = "dir" if info.is_dir() else _kind_from_mode(mode) if typed else "file"
        yield Member(info.filename, info.file_size, kind, partial(_zip_open, archive, info))


def _mapping_members(files: Mapping[str, bytes | Path]) -> Iterator[Member]:
    for name, content in files.items():
        if isinstance(content, bytes):
            yield Member(name, len(content), "file", partial(io.BytesIO, content))
        else:
            yield Member(name, content.stat().st_size, "file", partial(_open_path, content))


def _open_path(path: Path) -> BinaryIO:
    return path.open("rb")


def _zip_open(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> BinaryIO:
    return archive.open(info)  # type: ignore[return-value]


def _copy_bounded(member: Member, dest: Path, limits: UploadLimits) -> None:
    """Copy a member, refusing it if it turns out larger than it said (a lying header)."""
    written = 0
    with member.open() as src, dest.open("wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            written += len(chunk)
            if written > min(member.size, limits.max_member_bytes):
                raise AdapterRejected([f"{member.name}: holds more bytes than its header says"])
            out.write(chunk)


def _stage_members(members: list[Member], limits: UploadLimits, dest: Path) -> dict[str, Path]:
    problems = [p for m in members for p in _member_problems(m, limits)]
    problems += _layout_problems(members, limits)
    if problems:
        raise AdapterRejected(problems)
    staged: dict[str, Path] = {}
    dest.mkdir(parents=True, exist_ok=True)
    for member in members:
        name = _basename(member)
        if member.kind == "file" and name in REQUIRED_FILES:
            staged[name] = dest / name
            _copy_bounded(member, staged[name], limits)
    return staged


def stage_upload(source: UploadSource, limits: UploadLimits, dest: Path) -> dict[str, Path]:
    """Check an upload and copy its two adapter files into ``dest``.

    Returns ``{"adapter_config.json": path, "adapter_model.safetensors": path}``.
    Raises ``AdapterRejected`` listing every problem; then ``dest`` holds nothing.
    """
    try:
        return _stage(source, limits, dest)
    except AdapterRejected:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _stage(source: UploadSource, limits: UploadLimits, dest: Path) -> dict[str, Path]:
    if not isinstance(source, Path):
        return _stage_members(_bounded(_mapping_members(source), limits), limits, dest)
    if source.is_dir():
        return _stage_members(_bounded(_directory_members(source), limits), limits, dest)
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            return _stage_members(_bounded(_zip_members(archive), limits), limits, dest)
    if source.is_file() and tarfile.is_tarfile(source):
        with tarfile.open(source, "r:*") as tar:
            return _stage_members(_bounded(_tar_members(tar), limits), limits, dest)
    raise AdapterRejected(
        [f"{source.name}: not a directory, tar or zip archive; upload the PEFT output folder"]
    )
