"""The vLLM LoRA resolver plugin on a real registry (SQLite + local blobs, and S3).

No engine is started: ``resolve_lora`` is called the way vLLM's
``OpenAIServingModels.resolve_lora`` calls it, and vLLM's own code checks what
comes back (its PEFT config parser, its HTTP exception handlers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from safetensors.torch import load_file
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.exceptions import GracefulHTTPError
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

from registry import (
    Actor,
    AdapterVersion,
    BaseModelRecord,
    BlobStore,
    LocalBlobStore,
    Registry,
    S3BlobStore,
)
from registry.archive import WEIGHTS_FILE
from server.engine_plugin import resolver as plugin
from server.engine_plugin.adapter_cache import AdapterCache
from server.engine_plugin.resolver import LoraplexResolver, ResolverConfigError, lora_int_id
from tests.registry.registry_testdata import (
    BASE_NAME,
    BASE_REVISION,
    build_adapter,
    build_tiny_base,
    seaweedfs,
)
from tests.server.engine_plugin import vllm_fakes
from tests.server.engine_plugin.vllm_fakes import EngineClientFake

ADMIN = Actor("test-admin", admin=True)
MB = 1 << 20
S3_BUCKET, S3_KEY, S3_SECRET = "loraplex-resolver-test", "resolver-key", "resolver-secret"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def other_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shapes with another config: another base fingerprint."""
    dest = shutil.copytree(tiny_base, tmp_path_factory.mktemp("base") / "tiny-llama-r2")
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    return dest


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [build_adapter(tiny_base, root / f"v{seed}", seed=seed) for seed in (1, 2)]


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def registry(tmp_path: Path, blobs: BlobStore) -> Iterator[Registry]:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", blobs)
    yield registry
    registry.close()


@pytest.fixture
def base(registry: Registry, tiny_base: Path) -> BaseModelRecord:
    return registry.register_base(tiny_base, BASE_NAME, BASE_REVISION, ADMIN)


@pytest.fixture
def versions(
    registry: Registry, base: BaseModelRecord, adapter_dirs: list[Path]
) -> list[AdapterVersion]:
    tenant = registry.create_tenant("acme", ADMIN)
    assert tenant.id is not None
    return [
        registry.push_adapter(tenant.id, "bot", path, BASE_NAME, ADMIN) for path in adapter_dirs
    ]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def make_resolver(registry: Registry, cache_dir: Path, fingerprint: str) -> LoraplexResolver:
    return LoraplexResolver(registry, AdapterCache(cache_dir, 100 * MB), fingerprint)


@pytest.fixture
def resolver(registry: Registry, base: BaseModelRecord, cache_dir: Path) -> LoraplexResolver:
    return make_resolver(registry, cache_dir, base.fingerprint)


def cached(cache_dir: Path) -> list[str]:
    """Everything in the cache directory, temp files included."""
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def corrupt(blobs: BlobStore, version: AdapterVersion) -> None:
    assert isinstance(blobs, LocalBlobStore)
    (blobs.root / version.blob_key).write_bytes(b"not the bundle")


async def resolve(resolver: LoraplexResolver, tiny_base: Path, name: str) -> LoRARequest | None:
    return await resolver.resolve_lora(str(tiny_base), name)


def assert_serves(request: LoRARequest | None, version: AdapterVersion, source: Path) -> None:
    """``request`` points at a directory holding ``source``'s tensors, readable by vLLM."""
    assert isinstance(request, LoRARequest)
    assert request.lora_name == version.lora_name
    assert request.lora_int_id == lora_int_id(version.fingerprint) > 0
    assert_holds(Path(request.lora_path), version, source)


def assert_holds(path: Path, version: AdapterVersion, source: Path) -> None:
    """``path`` is ``version``'s directory holding ``source``'s tensors, readable by vLLM."""
    assert path.name == version.lora_name
    helper = PEFTHelper.from_local_dir(str(path), max_position_embeddings=256)
    assert (helper.r, helper.lora_alpha) == (8, 16)
    served, pushed = load_file(path / WEIGHTS_FILE), load_file(source / WEIGHTS_FILE)
    assert served.keys() == pushed.keys()
    assert all(torch.equal(served[k], pushed[k]) for k in pushed)


# -- resolving ---------------------------------------------------------------------


async def test_an_lora_name_resolves_to_its_adapter_in_the_cache(
    resolver: LoraplexResolver,
    versions: list[AdapterVersion],
    adapter_dirs: list[Path],
    tiny_base: Path,
    cache_dir: Path,
) -> None:
    for version, source in zip(versions, adapter_dirs, strict=True):
        assert_serves(await resolve(resolver, tiny_base, version.lora_name), version, source)
    assert cached(cache_dir) == sorted(v.lora_name for v in versions)


async def test_a_cold_resolution_reads_the_version_record_once(
    resolver: LoraplexResolver,
    registry: Registry,
    versions: list[AdapterVersion],
    tiny_base: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups: list[str] = []
    lookup = registry.version_by_lora_name

    def counted(name: str) -> object:
        lookups.append(name)
        return lookup(name)

    monkeypatch.setattr(registry, "version_by_lora_name", counted)
    assert await resolve(resolver, tiny_base, versions[0].lora_name) is not None
    assert lookups == [versions[0].lora_name]  # the fetch reuses the record: a cold start


@pytest.mark.parametrize(
    "name",
    [
        "tiny-llama",
        "bot",
        "bot@1",
        "lx-0123",
        "lx-0123456789ABCDEF",
        "LX-0123456789abcdef",
        "lx-0123456789abcdef0",
        "lx-0123456789abcdef@1",
        "",
    ],
)
async def test_names_that_are_not_lora_names_are_declined(
    resolver: LoraplexResolver, tiny_base: Path, cache_dir: Path, name: str
) -> None:
    assert await resolve(resolver, tiny_base, name) is None
    assert cached(cache_dir) == []


async def test_unknown_and_retired_versions_are_declined(
    resolver: LoraplexResolver,
    registry: Registry,
    versions: list[AdapterVersion],
    tiny_base: Path,
    cache_dir: Path,
) -> None:
    tenant = registry.get_tenant("acme")
    assert tenant.id is not None
    registry.retire(tenant.id, "bot", versions[0].number, ADMIN)

    assert await resolve(resolver, tiny_base, versions[0].lora_name) is None
    assert await resolve(resolver, tiny_base, "lx-" + "0" * 16) is None
    assert cached(cache_dir) == []


async def test_a_version_pinned_to_another_base_is_never_served(
    registry: Registry,
    versions: list[AdapterVersion],
    other_base: Path,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = registry.register_base(other_base, BASE_NAME, "r2", ADMIN)
    resolver = make_resolver(registry, cache_dir, other.fingerprint)

    with caplog.at_level(logging.WARNING, logger="server.engine_plugin.resolver"):
        assert await resolve(resolver, other_base, versions[0].lora_name) is None

    assert f"pinned to base {BASE_NAME}@{BASE_REVISION}" in caplog.text
    assert versions[0].lora_name in caplog.text and other.fingerprint in caplog.text
    assert cached(cache_dir) == []


async def test_an_engine_serving_another_base_than_declared_serves_nothing(
    resolver: LoraplexResolver,
    versions: list[AdapterVersion],
    other_base: Path,
    cache_dir: Path,
) -> None:
    with pytest.raises(GracefulHTTPError, match=plugin.BASE_FINGERPRINT_ENV) as raised:
        await resolve(resolver, other_base, versions[0].lora_name)

    assert raised.value.http_status == 503
    assert cached(cache_dir) == []


async def test_concurrent_resolutions_fetch_once(
    resolver: LoraplexResolver,
    versions: list[AdapterVersion],
    adapter_dirs: list[Path],
    tiny_base: Path,
) -> None:
    misses = sample("loraplex_adapter_cache_misses_total")
    hits = sample("loraplex_adapter_cache_hits_total")
    name = versions[0].lora_name

    requests = await asyncio.gather(*(resolve(resolver, tiny_base, name) for _ in range(6)))

    for request in requests:
        assert_serves(request, versions[0], adapter_dirs[0])
    assert sample("loraplex_adapter_cache_misses_total") == misses + 1
    assert sample("loraplex_adapter_cache_hits_total") == hits + 5
    assert sample("loraplex_adapter_cache_bytes") == resolver.cache.total_bytes() > 0


async def test_a_restarted_engine_serves_from_its_disk_cache(
    resolver: LoraplexResolver,
    registry: Registry,
    blobs: BlobStore,
    base: BaseModelRecord,
    versions: list[AdapterVersion],
    adapter_dirs: list[Path],
    tiny_base: Path,
    cache_dir: Path,
) -> None:
    await resolve(resolver, tiny_base, versions[0].lora_name)
    blobs.delete(versions[0].blob_key)  # from now on only the cache has it

    restarted = make_resolver(registry, cache_dir, base.fingerprint)
    request = await resolve(restarted, tiny_base, versions[0].lora_name)

    assert_serves(request, versions[0], adapter_dirs[0])


# -- the disk budget while the engine runs (vLLM's table of LoRAs, a fake engine client) --


@pytest.fixture(scope="module")
def five_dirs(
    adapter_dirs: list[Path], tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    root = tmp_path_factory.mktemp("more-adapters")
    more = [build_adapter(tiny_base, root / f"v{seed}", seed=seed) for seed in (3, 4, 5)]
    return [*adapter_dirs, *more]


@dataclass
class Engine:
    """vLLM's own ``OpenAIServingModels`` resolving through a resolver on a bounded cache."""

    models: OpenAIServingModels
    client: EngineClientFake
    resolver: LoraplexResolver
    names: list[str]
    """The five versions' LoRA names."""
    bound: int

    async def request(self, index: int) -> LoRARequest:
        return await vllm_fakes.request(self.models, self.names[index])


def disk_bytes(root: Path) -> int:
    """Bytes of every file under ``root``, temp files included."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


MakeEngine = Callable[..., Engine]
"""``(blobs_per_bound, fetch_timeout=30.0) -> Engine``: the five versions, a cache that
holds ``blobs_per_bound`` of their blobs, vLLM's table resolving through it."""


@pytest.fixture
def bounded(
    monkeypatch: pytest.MonkeyPatch,
    registry: Registry,
    base: BaseModelRecord,
    tiny_base: Path,
    five_dirs: list[Path],
    cache_dir: Path,
) -> Iterator[MakeEngine]:
    made: list[Engine] = []

    def make(blobs_per_bound: float, fetch_timeout: float = 30.0) -> Engine:
        tenant = registry.create_tenant("acme", ADMIN)
        assert tenant.id is not None
        push = registry.push_adapter
        versions = [push(tenant.id, "bot", p, BASE_NAME, ADMIN) for p in five_dirs]
        assert len({v.size_bytes for v in versions}) == 1  # same shapes, same bundle size
        bound = int(blobs_per_bound * versions[0].size_bytes)
        cache = AdapterCache(cache_dir, bound)
        resolver = LoraplexResolver(registry, cache, base.fingerprint, fetch_timeout)
        client = EngineClientFake(str(tiny_base))
        models = vllm_fakes.serving_models(monkeypatch, client, resolver)
        made.append(Engine(models, client, resolver, [v.lora_name for v in versions], bound))
        return made[-1]

    yield make
    for engine in made:
        engine.resolver.close()


async def test_the_cache_stays_within_its_bound_by_unloading_unused_adapters(
    bounded: MakeEngine, registry: Registry, five_dirs: list[Path], cache_dir: Path
) -> None:
    engine = bounded(3)
    evictions = sample("loraplex_adapter_cache_evictions_total")

    for order in (range(5), [4, 0, 3, 1, 2]):
        for index in order:
            request = await engine.request(index)
            assert Path(request.lora_path) == cache_dir / engine.names[index]
            assert disk_bytes(cache_dir) <= engine.bound

    # A fetch needs room for two blobs, so three blobs' room keeps two adapters. Nine
    # fetches (the second round finds 4 cached): all but the first two unloaded one.
    evicted = sample("loraplex_adapter_cache_evictions_total") - evictions
    assert len(engine.client.removed) == evicted == 7
    table = set(engine.models.lora_requests.keys())
    assert table == {e.name for e in engine.resolver.cache.held()} == set(cached(cache_dir))
    assert len(table) == 2
    found = registry.version_by_lora_name(engine.names[0])
    assert found is not None
    assert_holds(Path((await engine.request(0)).lora_path), found.version, five_dirs[0])


async def test_an_adapter_a_request_uses_is_never_evicted(
    bounded: MakeEngine, cache_dir: Path
) -> None:
    engine = bounded(3)
    stream = await engine.request(0)  # an answer still streaming holds its adapter

    for index in (1, 2, 3, 4, 1):
        await engine.request(index)
        assert engine.names[0] in cached(cache_dir)
        assert vllm_fakes.entry(engine.models, engine.names[0]) is stream
    assert stream.lora_int_id not in engine.client.removed

    del stream
    await engine.request(2)
    await engine.request(3)
    assert engine.names[0] not in cached(cache_dir)


async def test_a_fetch_waits_for_room_then_fails_with_503_if_it_stays_in_use(
    bounded: MakeEngine, cache_dir: Path
) -> None:
    engine = bounded(3, fetch_timeout=0.5)
    streams = [await engine.request(0), await engine.request(1)]  # all the room, in use

    with pytest.raises(GracefulHTTPError, match="held by adapters that requests in flight use"):
        await engine.request(2)
    assert engine.names[2] not in cached(cache_dir)
    assert disk_bytes(cache_dir) <= engine.bound

    engine.resolver.fetch_timeout = 30.0
    waiting = asyncio.create_task(engine.request(2))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # waiting for room, which it gets as soon as a stream ends
    streams.pop(0)
    assert Path((await waiting).lora_path).name == engine.names[2]
    assert engine.names[0] not in cached(cache_dir)


async def test_an_adapter_too_large_for_the_cache_gets_a_400_every_time(
    bounded: MakeEngine, cache_dir: Path
) -> None:
    engine = bounded(1.5)

    for _ in range(2):
        with pytest.raises(GracefulHTTPError, match="LORAPLEX_ADAPTER_CACHE_BYTES") as raised:
            await engine.request(0)
        assert raised.value.http_status == 400
    assert cached(cache_dir) == []
    assert vllm_fakes.entry(engine.models, engine.names[0]) is None


# -- failures ----------------------------------------------------------------------


def delete(blobs: BlobStore, version: AdapterVersion) -> None:
    blobs.delete(version.blob_key)


@pytest.mark.parametrize(
    ("damage", "message"), [(corrupt, "is corrupt"), (delete, "missing from the blob store")]
)
async def test_a_bad_blob_fails_with_503_and_caches_nothing(
    resolver: LoraplexResolver,
    blobs: BlobStore,
    versions: list[AdapterVersion],
    tiny_base: Path,
    cache_dir: Path,
    damage: Callable[[BlobStore, AdapterVersion], None],
    message: str,
) -> None:
    damage(blobs, versions[0])

    with pytest.raises(GracefulHTTPError, match=message) as raised:
        await resolve(resolver, tiny_base, versions[0].lora_name)

    assert raised.value.http_status == 503
    assert cached(cache_dir) == []


class SlowBlobStoreFake(LocalBlobStore):
    """A local blob store that answers fetches after ``delay`` seconds."""

    delay = 1.0

    def fetch(self, key: str, sha256: str, dest: Path) -> None:
        time.sleep(self.delay)
        super().fetch(key, sha256, dest)


async def test_a_slow_blob_store_fails_with_503_after_the_timeout_then_recovers(
    registry: Registry,
    base: BaseModelRecord,
    versions: list[AdapterVersion],
    adapter_dirs: list[Path],
    blobs: BlobStore,
    tiny_base: Path,
    cache_dir: Path,
) -> None:
    assert isinstance(blobs, LocalBlobStore)
    slow = SlowBlobStoreFake(blobs.root)
    slow_registry = Registry(str(registry.database.url), slow, auto_migrate=False)
    resolver = LoraplexResolver(
        slow_registry, AdapterCache(cache_dir, 100 * MB), base.fingerprint, fetch_timeout=0.3
    )

    with pytest.raises(GracefulHTTPError, match=r"not fetched within 0\.3 s"):
        await resolve(resolver, tiny_base, versions[0].lora_name)

    slow.delay = 0.0
    resolver.fetch_timeout = 10.0
    request = await resolve(resolver, tiny_base, versions[0].lora_name)
    assert_serves(request, versions[0], adapter_dirs[0])
    resolver.close()


def test_vllm_answers_a_resolver_failure_with_503(
    resolver: LoraplexResolver,
    blobs: BlobStore,
    versions: list[AdapterVersion],
    tiny_base: Path,
) -> None:
    """vLLM's own exception handlers turn the resolver's error into the HTTP response."""
    corrupt(blobs, versions[0])
    app = FastAPI()
    init_exception_handler(app)
    app.state.args = SimpleNamespace(log_error_stack=False)

    @app.post("/v1/completions")
    async def completions() -> dict[str, str]:
        await resolve(resolver, tiny_base, versions[0].lora_name)
        return {}

    response = TestClient(app).post("/v1/completions")

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == 503 and error["type"] == "Service Unavailable"
    assert versions[0].lora_name in error["message"] and "corrupt" in error["message"]


# -- S3 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in (
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            env.setenv(name, value)
        workdir = tmp_path_factory.mktemp("seaweedfs")
        with seaweedfs(workdir, S3_BUCKET, S3_KEY, S3_SECRET) as endpoint:
            yield endpoint


async def test_adapters_resolve_from_an_s3_blob_store(
    s3_endpoint: str,
    tmp_path: Path,
    tiny_base: Path,
    adapter_dirs: list[Path],
    cache_dir: Path,
) -> None:
    blobs = S3BlobStore(S3_BUCKET, f"resolver-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint)
    registry = Registry(f"sqlite:///{tmp_path / 's3.db'}", blobs)
    base = registry.register_base(tiny_base, BASE_NAME, BASE_REVISION, ADMIN)
    tenant = registry.create_tenant("acme", ADMIN)
    assert tenant.id is not None
    good, bad = (registry.push_adapter(tenant.id, "bot", p, BASE_NAME, ADMIN) for p in adapter_dirs)
    blobs.client.put_object(Bucket=S3_BUCKET, Key=blobs._key(bad.blob_key), Body=b"garbage")
    resolver = make_resolver(registry, cache_dir, base.fingerprint)

    assert_serves(await resolve(resolver, tiny_base, good.lora_name), good, adapter_dirs[0])
    with pytest.raises(GracefulHTTPError, match="corrupt"):
        await resolve(resolver, tiny_base, bad.lora_name)
    assert cached(cache_dir) == [good.lora_name]
    resolver.close()


# -- register() --------------------------------------------------------------------


@pytest.fixture
def resolver_env(
    monkeypatch: pytest.MonkeyPatch,
    registry: Registry,
    blobs: BlobStore,
    base: BaseModelRecord,
    cache_dir: Path,
) -> dict[str, str]:
    """A complete, valid resolver environment for the test registry (set in os.environ)."""
    assert isinstance(blobs, LocalBlobStore)
    env = {
        plugin.DATABASE_URL_ENV: str(registry.database.url),
        plugin.BLOB_URL_ENV: str(blobs.root),
        plugin.BASE_FINGERPRINT_ENV: base.fingerprint,
        plugin.CACHE_DIR_ENV: str(cache_dir),
        plugin.CACHE_BYTES_ENV: "64M",
        plugin.FETCH_TIMEOUT_ENV: "30",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(plugin.S3_ENDPOINT_ENV, raising=False)
    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    return env


def test_importing_the_plugin_imports_neither_vllm_nor_the_registry() -> None:
    code = (
        "import sys, server.engine_plugin.resolver as p; p.register(); "
        "print(sorted(m for m in ('vllm', 'registry', 'sqlalchemy') if m in sys.modules))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[3])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_vllm_finds_register_through_the_entry_point() -> None:
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins["loraplex_resolver"] is plugin.register


def test_register_does_nothing_without_the_database_url(
    resolver_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(plugin.DATABASE_URL_ENV)
    plugin.register()
    assert dict(LoRAResolverRegistry.resolvers) == {}


async def test_register_installs_a_working_resolver(
    resolver_env: dict[str, str],
    versions: list[AdapterVersion],
    adapter_dirs: list[Path],
    tiny_base: Path,
    cache_dir: Path,
) -> None:
    plugin.register()

    resolver = LoRAResolverRegistry.get_resolver(plugin.RESOLVER_NAME)
    assert isinstance(resolver, LoraplexResolver)
    assert (resolver.cache.root, resolver.cache.max_bytes) == (cache_dir, 64 * MB)
    assert resolver.fetch_timeout == 30.0
    request = await resolver.resolve_lora(str(tiny_base), versions[1].lora_name)
    assert_serves(request, versions[1], adapter_dirs[1])
    resolver.close()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (plugin.BLOB_URL_ENV, "", "is not set"),
        (plugin.BLOB_URL_ENV, "/nonexistent/blobs", "is not a directory"),
        (plugin.BASE_FINGERPRINT_ENV, "", "is not set"),
        (plugin.BASE_FINGERPRINT_ENV, "tiny-llama@r1", "64 hex digits"),
        (plugin.BASE_FINGERPRINT_ENV, "ab" * 32, "names no base registered"),
        (plugin.CACHE_BYTES_ENV, "lots", "not a positive size"),
        (plugin.CACHE_BYTES_ENV, "0", "not a positive size"),
        (plugin.FETCH_TIMEOUT_ENV, "-1", "not a positive number"),
        (plugin.CACHE_DIR_ENV, "/proc/loraplex-cache", "cannot be created"),
        (plugin.DATABASE_URL_ENV, "not a url", "is unusable"),
        (
            plugin.DATABASE_URL_ENV,
            "postgresql://postgres@127.0.0.1:5432/loraplex_no_such_db",
            "cannot read the registry",
        ),
    ],
)
def test_a_bad_setting_stops_the_engine_naming_the_variable(
    resolver_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ResolverConfigError, match=f"{variable}.*{message}"):
        plugin.register()
    assert dict(LoRAResolverRegistry.resolvers) == {}


def test_an_unreachable_s3_store_stops_the_engine_naming_the_variables(
    resolver_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugin.BLOB_URL_ENV, "s3://loraplex-nowhere/adapters")
    monkeypatch.setenv(plugin.S3_ENDPOINT_ENV, "http://127.0.0.1:9")
    for name, value in (("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail in one try, not after backoffs

    with pytest.raises(ResolverConfigError, match=f"{plugin.BLOB_URL_ENV}.*unreachable"):
        plugin.register()
