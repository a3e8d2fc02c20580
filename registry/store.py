"""The registry's database plumbing shared by its parts: sessions and common lookups."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from registry.blobs import BlobStore
from registry.db import WRITE_OPTION
from registry.errors import NotFound
from registry.limits import UploadLimits
from registry.models import Adapter, AdapterVersion, Tenant

T = TypeVar("T")
NUL = "\x00"
"""No name holds one, and PostgreSQL refuses them in queries."""


def unknown_adapter(name: str) -> NotFound:
    # Same words for foreign and unknown names: tenants must not learn what others own.
    return NotFound(f"adapter {name!r} does not exist; list your adapters to see the names")


class Store:
    """Database, blob store and upload limits, with read and write transactions."""

    database: Engine
    blobs: BlobStore
    limits: UploadLimits

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.database, expire_on_commit=False) as session:
            yield session

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on any error."""
        writer = self.database.execution_options(**{WRITE_OPTION: True})
        with Session(writer, expire_on_commit=False) as session, session.begin():
            yield session

    def _retrying(self, write: Callable[[], T], retries: int = 2) -> T:
        """``write()`` (a whole write transaction), run again after an ``IntegrityError``.

        A concurrent push may create the adapter or the very same version first; the
        next run finds it (and uses the version if it holds the same weights).
        """
        while True:
            try:
                return write()
            except IntegrityError:
                if retries == 0:
                    raise
                retries -= 1

    def _own_adapter(self, s: Session, tenant_id: int, name: str) -> Adapter:
        """The tenant's adapter ``name``; NotFound, in the same words, when it is another
        tenant's or nobody's."""
        query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        adapter = None if NUL in name else s.exec(query).first()
        if adapter is None:
            raise unknown_adapter(name)
        return adapter

    def _version(self, s: Session, adapter: Adapter, number: int) -> AdapterVersion:
        version = s.exec(
            select(AdapterVersion).where(
                AdapterVersion.adapter_id == adapter.id, AdapterVersion.number == number
            )
        ).first()
        if version is None:
            raise NotFound(f"adapter {adapter.name!r} has no version {number}; list its versions")
        return version

    def _tenant(self, s: Session, tenant: int | str, lock: bool = False) -> Tenant:
        column = Tenant.id if isinstance(tenant, int) else Tenant.name
        query = select(Tenant).where(column == tenant)
        row = s.exec(query.with_for_update() if lock else query).first()
        if row is None:
            raise NotFound(f"tenant {tenant!r} does not exist; create it first")
        return row
