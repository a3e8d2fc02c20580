"""Build a directory all at once: under a lock, in a scratch dir, then renamed into place.

A build killed halfway leaves only a scratch directory (removed by the next build),
never a half-written target; a second builder waits on the lock, then finds the
first one's finished result.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _scratch_prefix(target: Path) -> str:
    return f".{target.name}.building-"


@contextmanager
def build_lock(target: Path, announce: bool = True) -> Iterator[None]:
    """Hold an exclusive lock for building ``target``, waiting for any other builder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock_path(target).open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if announce:
                print(f"Waiting for another build of {target} to finish...", file=sys.stderr)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def remove_stale_scratch(target: Path) -> None:
    """Delete scratch dirs that killed builds left behind; call only under ``build_lock``."""
    for stale in target.parent.glob(f"{_scratch_prefix(target)}*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def scratch_dir(target: Path) -> Iterator[Path]:
    """A fresh directory beside ``target`` (same filesystem, so renames are atomic)."""
    path = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target), dir=target.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _make_readable(tree: Path) -> None:
    """Give ``tree`` ordinary modes: mkdtemp (and some writers) create owner-only entries,
    which an engine running as another user (a container, say) could not read."""
    tree.chmod(0o755)
    for path in tree.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def install(scratch: Path, target: Path) -> None:
    """Move the finished ``scratch`` to ``target``, replacing what was there."""
    _make_readable(scratch)
    if not target.exists():
        os.rename(scratch, target)
        return
    # rename() cannot replace a non-empty directory: move the old one aside first.
    retired = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target), dir=target.parent))
    os.rename(target, retired / target.name)
    os.rename(scratch, target)
    shutil.rmtree(retired, ignore_errors=True)
