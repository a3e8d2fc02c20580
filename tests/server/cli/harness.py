"""Runs ``loraplex`` commands in-process against one SQLite registry, as a shell would."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli.main import main


class Cli:
    """``loraplex ARGV`` on the registry under ``home``; returns (exit code, stdout, stderr)."""

    def __init__(self, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.flags = ["--home", str(home), "--database-url", f"sqlite:///{home / 'r.db'}",
                      "--blob-url", str(home / "blobs")]  # fmt: skip
        self.home, self.capsys = home, capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([*argv, *self.flags])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        """Stdout of a command that must succeed (its stderr is the failure message)."""
        code, out, err = self(*argv)
        assert code == 0, err
        return out
