"""The registry's database plumbing shared by its parts: sessions and common lookups."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine
from sqlmodel import Session, select

from registry.blobs import BlobStore
from registry.db import WRITE_OPTION
from registry.errors import NotFound
from registry.limits import UploadLimits
from registry.models import Tenant


class Store:
    """Engine, blob store and upload limits, with read and write transactions."""

    engine: Engine
    blobs: BlobStore
    limits: UploadLimits

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on any error."""
        engine = self.engine.execution_options(**{WRITE_OPTION: True})
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _tenant(self, s: Session, tenant: int | str, lock: bool = False) -> Tenant:
        column = Tenant.id if isinstance(tenant, int) else Tenant.name
        query = select(Tenant).where(column == tenant)
        row = s.exec(query.with_for_update() if lock else query).first()
        if row is None:
            raise NotFound(f"tenant {tenant!r} does not exist; create it first")
        return row
