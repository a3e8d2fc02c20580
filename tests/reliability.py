"""Figures for the reliability and security suite (`make reliability`).

Tests marked ``reliability`` call ``record`` with what they tried and what went
wrong (server errors, leaks, half-written records, failed streams...). The
records go to one JSON-lines file per pytest session; ``python -m
tests.reliability`` turns them into the Markdown table shown in the README.

A test records *before* it asserts, so a regression shows in the table as a
non-zero "lost or leaked" count as well as a failed test.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORDS = Path(
    os.environ.get("LORAPLEX_RELIABILITY_RECORDS", REPO / ".loraplex" / "reliability.jsonl")
)
TABLE = REPO / "docs" / "reliability.md"
README = REPO / "README.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


@dataclass(frozen=True)
class Record:
    area: str
    """Suite section: fuzzing, isolation, faults, load, secrets, limits."""
    check: str
    """What was done, in a few words ("engine killed mid-stream")."""
    tried: int
    """Cases, probes, faults, operations or streams attempted."""
    unit: str
    """What ``tried`` counts ("cases", "probes", "faults", "ops", "streams")."""
    bad: int
    """What was lost, leaked, half-written or failed: the goal is 0."""
    bad_means: str
    """What ``bad`` counts ("server errors", "leaks", "half-written versions")."""


def record(area: str, check: str, tried: int, unit: str, bad: int, bad_means: str) -> None:
    """Append one line of figures for the current test session."""
    RECORDS.parent.mkdir(parents=True, exist_ok=True)
    line = {**asdict(Record(area, check, tried, unit, bad, bad_means)), "at": time.time()}
    with RECORDS.open("a") as out:
        out.write(json.dumps(line) + "\n")


def reset() -> None:
    """Start a fresh set of figures (called when a pytest session starts)."""
    RECORDS.unlink(missing_ok=True)


def load() -> list[Record]:
    if not RECORDS.is_file():
        return []
    rows = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]
    return [Record(**{k: v for k, v in row.items() if k != "at"}) for row in rows]


def table(records: list[Record]) -> str:
    lines = [
        "| area | check | tried | lost, leaked or failed |",
        "|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r.area):  # stable: test order within an area
        lines.append(f"| {r.area} | {r.check} | {r.tried:,} {r.unit} | {r.bad} {r.bad_means} |")
    tried = sum(r.tried for r in records)
    bad = sum(r.bad for r in records)
    lines.append(f"| **all** | **{len(records)} checks** | **{tried:,}** | **{bad}** |")
    return "\n".join(lines)


def publish(records: list[Record], machine: str) -> str:
    """Write docs/reliability.md and the README's copy; returns the table."""
    text = table(records)
    block = f"{START}\n_Last run: {machine}._\n\n{text}\n{END}"
    TABLE.write_text(f"# Reliability and security figures\n\n{block}\n")
    readme = README.read_text()
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        _, tail = rest.split(END, 1)
        README.write_text(head + block + tail)
    return text


def _machine() -> str:
    cores = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0.0
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run = os.environ.get("LORAPLEX_RELIABILITY_RUN", "`make reliability`")
    return f"{stamp}, {cores} cores, {mem:.0f} GiB, {run}"


def main() -> int:
    records = load()
    if not records:
        print(f"no reliability figures at {RECORDS}; run `make reliability` first", file=sys.stderr)
        return 1
    print(publish(records, _machine()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
