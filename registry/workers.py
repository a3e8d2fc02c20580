"""Which fine-tuning workers are alive, and for which base: so a job can say it waits for one.

Each worker trains for one base and claims only that base's jobs. It says it is alive
every ``SEEN_EVERY`` seconds (one row per worker, upserted), and a worker not seen for
``GONE_AFTER`` seconds counts as gone: a job created for a base with no live worker
stays queued, and its events say why and what to start.
"""

from __future__ import annotations

import datetime as dt
import time

from sqlmodel import Field, SQLModel, col, select

from registry.models import timestamp_column, utcnow
from registry.registry import Registry
from registry.store import Store

SEEN_EVERY = 10.0
"""Seconds between a worker's presence writes (at most; it writes when it polls)."""
GONE_AFTER = 60.0
"""Seconds without a presence write after which a worker counts as gone."""


class FineTuningWorker(SQLModel, table=True):
    __tablename__ = "fine_tuning_workers"

    worker_id: str = Field(primary_key=True, max_length=128)
    base_fingerprint: str = Field(max_length=64, index=True)
    seen_at: dt.datetime = timestamp_column(index=True)


class WorkerRoster(Store):
    """Presence of the fine-tuning workers, on the registry's database."""

    def __init__(self, registry: Registry) -> None:
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits
        self._last_seen = 0.0

    def seen(self, worker_id: str, base_fingerprint: str, force: bool = False) -> None:
        """Record that ``worker_id`` is alive and trains for ``base_fingerprint``; at most one
        write per ``SEEN_EVERY`` seconds unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_seen < SEEN_EVERY:
            return
        with self._write() as s:
            row = s.get(FineTuningWorker, worker_id)
            if row is None:
                row = FineTuningWorker(worker_id=worker_id, base_fingerprint=base_fingerprint)
            row.base_fingerprint, row.seen_at = base_fingerprint, utcnow()
            s.add(row)
        self._last_seen = now

    def gone(self, worker_id: str) -> None:
        """A worker that stops cleanly says so, instead of counting as alive for a minute."""
        with self._write() as s:
            row = s.get(FineTuningWorker, worker_id)
            if row is not None:
                s.delete(row)

    def serving(self, base_fingerprint: str, now: dt.datetime | None = None) -> list[str]:
        """The ids of the live workers that train for ``base_fingerprint``."""
        cutoff = (now or utcnow()) - dt.timedelta(seconds=GONE_AFTER)
        with self._read() as s:
            rows = s.exec(
                select(FineTuningWorker.worker_id).where(
                    FineTuningWorker.base_fingerprint == base_fingerprint,
                    col(FineTuningWorker.seen_at) >= cutoff,
                )
            )
            return list(rows.all())
