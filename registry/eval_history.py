"""An adapter's evaluation over its versions: per version, the latest result of every
suite and metric (its task suite, the base's capability suite, online metrics, anything
recorded), with sample counts and dates, and the aliases pointing at it.

This is what gates read too (``gates.latest_value``: the newest row wins), shown for
every version at once. A foreign adapter is answered exactly like an unknown one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from registry.models import EvalResult
from registry.registry import Registry


@dataclass(frozen=True)
class VersionEvals:
    """One version's latest eval results."""

    version: int
    state: str
    created_at: dt.datetime
    aliases: tuple[str, ...]
    """The aliases pointing at it (production, canary, ...), sorted."""
    latest: tuple[EvalResult, ...]
    """The newest result of each (suite, metric), ordered by suite and metric."""

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "adapter.version_evals",
            "version": self.version,
            "state": self.state,
            "created_at": self.created_at.isoformat(),
            "aliases": list(self.aliases),
            "evals": [_result_json(r) for r in self.latest],
        }


def eval_history(registry: Registry, tenant_id: int, name: str) -> list[VersionEvals]:
    """Every version of the adapter, oldest first, with its latest eval results."""
    versions = registry.list_versions(tenant_id, name)  # NotFound for unknown and foreign
    aliases = registry.aliases(tenant_id, name)
    ids = [v.id for v in versions]
    with registry._read() as s:
        rows = s.exec(
            select(EvalResult)
            .where(col(EvalResult.version_id).in_(ids))
            .order_by(col(EvalResult.id))
        )
        latest: dict[int, dict[tuple[str, str], EvalResult]] = {}
        for row in rows:
            latest.setdefault(row.version_id, {})[row.suite, row.metric] = row  # newest wins
    return [
        VersionEvals(
            version=v.number,
            state=v.state,
            created_at=v.created_at,
            aliases=tuple(sorted(a for a, target in aliases.items() if target.version == v.number)),
            latest=tuple(r for _, r in sorted(latest.get(v.id or 0, {}).items())),
        )
        for v in versions
    ]


def _result_json(r: EvalResult) -> dict[str, Any]:
    return {
        "suite": r.suite,
        "metric": r.metric,
        "value": r.value,
        "sample_count": r.sample_count,
        "dataset_sha256": r.dataset_sha256,
        "created_at": r.created_at.isoformat(),
        "created_by": r.created_by,
    }
