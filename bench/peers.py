"""Peer gateways installed by the benchmark itself, each in its own virtualenv.

Versions are pinned so runs compare like with like; an environment is built once
and reused while its stamp (the pinned requirement) matches.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VENVS = Path(__file__).resolve().parent / ".venvs"


class PeerInstallFailed(RuntimeError):
    """pip could not install a peer; the log file named in the message says why."""


@dataclass(frozen=True)
class Peer:
    """One peer gateway and how to get it."""

    name: str
    """Folder name under ``bench/.venvs``."""
    requirement: str
    """Pinned pip requirement."""
    executable: str
    """Console script the peer is started with."""

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    @property
    def binary(self) -> Path:
        return self.venv / "bin" / self.executable

    @property
    def version(self) -> str:
        return self.requirement.split("==", 1)[-1]


# litellm 1.109.x needs a certifi newer than this machine's package index holds.
LITELLM = Peer("litellm", "litellm[proxy]==1.100.5", "litellm")
VLLM_ROUTER = Peer("vllm-router", "vllm-router==0.1.17", "vllm-router")


def ensure(peer: Peer) -> Path:
    """The peer's console script, installing it first if its venv is missing or stale."""
    stamp = peer.venv / ".bench-installed"
    if stamp.is_file() and stamp.read_text() == peer.requirement and peer.binary.exists():
        return peer.binary
    log = VENVS / f"{peer.name}.install.log"
    VENVS.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        steps = [
            [sys.executable, "-m", "venv", str(peer.venv)],
            [str(peer.venv / "bin" / "pip"), "install", "-q", peer.requirement],
        ]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise PeerInstallFailed(f"installing {peer.requirement} failed; see {log}")
    stamp.write_text(peer.requirement)
    return peer.binary
