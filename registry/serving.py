"""What engines and the router read: routing views, LoRA-name lookups, verified fetches."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sqlmodel import col, select

from registry import lifecycle
from registry.bundle import unpack_bundle
from registry.errors import NotFound
from registry.models import ACTIVE, Adapter, AdapterVersion, BaseModelRecord
from registry.store import Store
from registry.values import AliasTarget, RoutingView, VersionBlob


class ServingMixin(Store):
    """Read paths for serving."""

    def routing_view(self, tenant_id: int, name: str) -> RoutingView | None:
        """Servable versions and aliases of a tenant's adapter; None if it has no such adapter."""
        with self._read() as s:
            query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
            adapter = s.exec(query).first()
            if adapter is None or adapter.id is None:
                return None
            versions = s.exec(
                select(AdapterVersion)
                .where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.state == ACTIVE)
                .order_by(col(AdapterVersion.number))
            ).all()
            by_id = {v.id: v for v in versions}
            aliases = {
                alias.name: AliasTarget(
                    by_id[alias.version_id].number,
                    by_id[alias.version_id].lora_name,
                    alias.weight,
                )
                for alias in lifecycle.aliases(s, adapter.id).values()
                if alias.version_id in by_id
            }
        return RoutingView(adapter.id, tenant_id, adapter.name, list(versions), aliases)

    def version_by_lora_name(self, name: str) -> VersionBlob | None:
        """The active version a LoRA name refers to, with its blob and base."""
        with self._read() as s:
            row = s.exec(
                select(AdapterVersion, BaseModelRecord)
                .join(BaseModelRecord, col(BaseModelRecord.id) == AdapterVersion.base_id)
                .where(AdapterVersion.lora_name == name, AdapterVersion.state == ACTIVE)
                .order_by(col(AdapterVersion.id))
            ).first()
        if row is None:
            return None
        version, base = row
        return VersionBlob(version, base, version.blob_key, version.blob_sha256, version.size_bytes)

    def fetch_version(
        self, name: str, dest_dir: Path | str, found: VersionBlob | None = None
    ) -> Path:
        """``dest_dir/<name>/`` holding the verified adapter files (fetched once, then reused).

        ``found``: the version's record, when the caller has just looked it up.
        """
        found = found or self.version_by_lora_name(name)
        if found is None:
            raise NotFound(f"no active adapter version is named {name!r} on engines")
        dest = Path(dest_dir) / name
        if (dest / "adapter_model.safetensors").is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".tar")
        os.close(fd)
        bundle = Path(tmp_name)
        try:
            self.blobs.fetch(found.blob_key, found.blob_sha256, bundle)
            try:
                unpack_bundle(bundle, dest, found.blob_key)
            except OSError:
                # A concurrent fetch may have won the rename; anything else (a full disk)
                # is this fetch's own error and must say so, not "could not unpack".
                if not (dest / "adapter_model.safetensors").is_file():
                    raise
        finally:
            bundle.unlink(missing_ok=True)
        if not (dest / "adapter_model.safetensors").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            raise NotFound(f"could not unpack {name!r} into {dest}; check the directory")
        return dest
