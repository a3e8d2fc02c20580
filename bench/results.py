"""Result files: ``bench/results/<name>.json``, written atomically, each self-describing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REQUIRED_KEYS = ("benchmark", "command", "machine")
"""Every result names what produced it and where it ran."""


class IncompleteResult(ValueError):
    """A result lacks a key the report needs; add it where the benchmark builds its result."""


def check(result: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in result]
    if missing:
        raise IncompleteResult(f"result is missing {', '.join(missing)}")


def write_result(name: str, result: dict[str, Any], folder: Path = RESULTS) -> Path:
    """Write ``folder/name.json`` (via a temporary file, so a crash leaves the old one)."""
    check(result)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(temporary, path)
    return path


def read_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` result in ``folder``, by file stem."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        found[path.stem] = json.loads(path.read_text())
    return found


def publish(name: str, result: dict[str, Any]) -> Path:
    """Write the result, then print its summary lines (and verdict) and where it went."""
    path = write_result(name, result)
    for line in [*result.get("summary_lines", []), result.get("verdict", "")]:
        if line:
            print(line)
    print(f"wrote {path}")
    return path
