"""Registry (issue 9, item 6): resolve latency and upload throughput, beside raw bandwidth.

Resolve: the gateway's path from (tenant, adapter name) to a routing view,
uncached (``Registry.routing_view``, one database read) and cached (the
gateway's ``server.gateway.tenancy.Tenancy.routing`` TTL cache), on SQLite and on
PostgreSQL (127.0.0.1:5432). Upload: ``Registry.push_adapter`` of a ~100 MB
PEFT adapter (validation, fingerprint, bundle, store) into a local blob
directory and into S3 (a real SeaweedFS server), against the raw disk write
bandwidth (write + fsync) and raw S3 PUT bandwidth measured in the same run.

Run: ``.venv/bin/python -m bench.registry_bench [--quick]``; writes
``bench/results/registry.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.gateway import machine
from bench.results import publish
from bench.stats import summarize_ms

WORK = Path(__file__).resolve().parent / ".work" / "registry"
COMMAND = ".venv/bin/python -m bench.registry_bench"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
S3_BUCKET, S3_KEY, S3_SECRET = "bench", "bench-key", "bench-secret"
MIB = 1 << 20


@dataclass(frozen=True)
class RegistryBenchConfig:
    """Sizes and repetitions."""

    adapter_rank: int = 320
    """LoRA rank on all seven projections of the 4-layer base: about 100 MB in float32."""
    resolves: int = 2000
    """Resolve calls timed per backend and path."""
    uploads: int = 2
    """Uploads timed per blob store (each under a new adapter name, so none is deduplicated)."""

    def quick(self) -> RegistryBenchConfig:
        return RegistryBenchConfig(adapter_rank=32, resolves=200, uploads=1)


def build_base(dest: Path) -> Path:
    """A random Llama (hidden 1024, 4 layers) big enough to pin a 100 MB adapter."""
    from tests.registry.registry_testdata import build_tiny_base

    if (dest / "config.json").is_file():
        return dest
    return build_tiny_base(dest, hidden=1024, intermediate=2816, layers=4, heads=16)


def build_adapter(base: Path, dest: Path, rank: int) -> Path:
    """A stock PEFT adapter on every linear projection, random (non-zero) weights."""
    if (dest / "adapter_model.safetensors").is_file():
        return dest
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(rank)
    model = LlamaForCausalLM.from_pretrained(base)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(dest), safe_serialization=True)
    return dest


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_write_mb_s(folder: Path, size: int) -> float:
    """Raw write + fsync bandwidth of ``folder``'s disk for ``size`` bytes."""
    path = folder / "raw-disk-probe.bin"
    block = os.urandom(4 * MIB)
    started = time.perf_counter()
    with path.open("wb") as out:
        for _ in range(max(1, size // len(block))):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    took = time.perf_counter() - started
    path.unlink()
    return size / MIB / took


def s3_put_mb_s(client: Any, size: int, tries: int = 2) -> float:
    """Raw PUT bandwidth of a ``size``-byte object, best of ``tries`` (the first one also pays
    SeaweedFS's volume allocation)."""
    import io

    payload = os.urandom(size)
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        client.upload_fileobj(io.BytesIO(payload), S3_BUCKET, "raw-probe.bin")
        best = min(best, time.perf_counter() - started)
        client.delete_object(Bucket=S3_BUCKET, Key="raw-probe.bin")
    return size / MIB / best


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    import psycopg

    name = f"loraplex_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def s3_endpoint(work: Path) -> Iterator[str]:
    """A real SeaweedFS S3 server (the same helper the registry's tests use)."""
    from tests.registry.registry_testdata import seaweedfs

    shutil.rmtree(work / "seaweedfs", ignore_errors=True)  # a reused bucket fails its start probe
    try:
        with seaweedfs(work / "seaweedfs", S3_BUCKET, S3_KEY, S3_SECRET) as endpoint:
            yield endpoint
    finally:
        shutil.rmtree(work / "seaweedfs", ignore_errors=True)


def s3_client(endpoint: str) -> Any:
    from tests.registry.registry_testdata import s3_client as client

    return client(endpoint, S3_KEY, S3_SECRET)


def _timed(call: Callable[[], Any], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def resolve_latency(registry: Any, tenant_id: int, name: str, repeats: int) -> dict[str, Any]:
    """Uncached (a database read each time) and cached (the gateway's TTL cache)."""
    from server.gateway.tenancy import Tenancy

    uncached = _timed(lambda: registry.routing_view(tenant_id, name), repeats)
    tenancy = Tenancy(registry)

    async def cached() -> list[float]:
        await tenancy.routing(tenant_id, name)  # fill the cache
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            await tenancy.routing(tenant_id, name)
            samples.append(time.perf_counter() - started)
        return samples

    return {"uncached": summarize_ms(uncached), "cached": summarize_ms(asyncio.run(cached()))}


def setup_registry(database_url: str, blobs: Any, base: Path) -> tuple[Any, int]:
    """A registry with the base registered and a tenant; (registry, tenant id)."""
    from registry import Actor, Registry, UploadLimits

    limits = UploadLimits(max_rank=512)
    registry = Registry(database_url, blobs, limits)
    actor = Actor("bench", admin=True)
    registry.register_base(base, "bench-base", "r1", actor)
    tenant = registry.create_tenant(f"bench-{uuid.uuid4().hex[:6]}", actor)
    assert tenant.id is not None
    return registry, tenant.id


def upload(registry: Any, tenant_id: int, adapter: Path, repeats: int) -> dict[str, Any]:
    from registry import Actor

    actor = Actor("bench", admin=True)
    size = folder_bytes(adapter)
    seconds = []
    for i in range(repeats):
        name = f"big-{uuid.uuid4().hex[:6]}-{i}"
        started = time.perf_counter()
        version = registry.push_adapter(tenant_id, name, adapter, "bench-base", actor)
        seconds.append(time.perf_counter() - started)
        # Blobs are content-addressed and a stored key is never written again: drop it so
        # the next upload stores its bytes too.
        registry.blobs.delete(version.blob_key)
    best = min(seconds)
    return {"adapter_mb": size / MIB, "seconds": seconds, "mb_s_best": size / MIB / best}


def backend_run(database_url: str, blobs: Any, base: Path, adapter: Path, config: Any) -> Any:
    from registry import Actor

    registry, tenant_id = setup_registry(database_url, blobs, base)
    pushed = registry.push_adapter(tenant_id, "resolve-me", adapter, "bench-base", Actor("b", True))
    registry.promote(tenant_id, "resolve-me", pushed.number, Actor("b", True), override=True)
    return registry, tenant_id, resolve_latency(registry, tenant_id, "resolve-me", config.resolves)


def run_all(config: RegistryBenchConfig) -> dict[str, Any]:
    from registry import LocalBlobStore, S3BlobStore

    WORK.mkdir(parents=True, exist_ok=True)
    base = build_base(WORK / "base-1024x4")
    adapter = build_adapter(base, WORK / f"adapter-r{config.adapter_rank}", config.adapter_rank)
    size = folder_bytes(adapter)
    out: dict[str, Any] = {"adapter_mb": size / MIB, "resolve": {}, "upload": {}}
    blob_dir = WORK / "blobs"
    shutil.rmtree(blob_dir, ignore_errors=True)
    out["raw_disk_write_mb_s"] = disk_write_mb_s(WORK, size)
    sqlite = WORK / "registry.db"
    sqlite.unlink(missing_ok=True)
    registry, tenant, out["resolve"]["sqlite"] = backend_run(
        f"sqlite:///{sqlite}", LocalBlobStore(blob_dir), base, adapter, config
    )
    out["upload"]["local_dir"] = upload(registry, tenant, adapter, config.uploads)
    with postgres_database() as url:
        out["resolve"]["postgresql"] = backend_run(
            url, LocalBlobStore(blob_dir), base, adapter, config
        )[2]
    with s3_endpoint(WORK) as endpoint:
        client = s3_client(endpoint)
        out["raw_s3_put_mb_s"] = s3_put_mb_s(client, size)
        store = S3BlobStore(S3_BUCKET, "blobs", endpoint_url=endpoint, client=client)
        registry, tenant = setup_registry(f"sqlite:///{WORK / 's3-registry.db'}", store, base)
        out["upload"]["s3"] = upload(registry, tenant, adapter, config.uploads)
    (WORK / "s3-registry.db").unlink(missing_ok=True)
    shutil.rmtree(blob_dir, ignore_errors=True)
    return out


def summary_lines(out: dict[str, Any]) -> list[str]:
    lines = []
    for backend, figures in out["resolve"].items():
        lines.append(
            f"resolve on {backend}: uncached p50 {figures['uncached']['p50_ms']:.3f} ms / p99 "
            f"{figures['uncached']['p99_ms']:.3f} ms; cached p50 "
            f"{figures['cached']['p50_ms'] * 1000:.1f} µs / p99 "
            f"{figures['cached']['p99_ms'] * 1000:.1f} µs"
        )
    disk, s3 = out["raw_disk_write_mb_s"], out.get("raw_s3_put_mb_s")
    for store, figures in out["upload"].items():
        raw = disk if store == "local_dir" else s3
        lines.append(
            f"upload {figures['adapter_mb']:.0f} MB adapter to {store}: "
            f"{figures['mb_s_best']:.0f} MB/s (fingerprint + validate + bundle + store), "
            f"raw {'disk write+fsync' if store == 'local_dir' else 'S3 PUT'} {raw:.0f} MB/s "
            f"= {figures['mb_s_best'] / raw:.2f}x of raw"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a 10 MB adapter, fewer resolves")
    args = parser.parse_args(argv)
    config = RegistryBenchConfig().quick() if args.quick else RegistryBenchConfig()
    out = run_all(config)
    result = {
        "benchmark": "registry",
        "command": COMMAND,
        "workload": f"PEFT LoRA r={config.adapter_rank}, 7 projections x 4 layers (hidden 1024)",
        "config": asdict(config),
        **out,
        "summary_lines": summary_lines(out),
        "machine": machine(),
    }
    publish("registry", result)


if __name__ == "__main__":
    main()
