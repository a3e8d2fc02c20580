"""Registry fixtures: every registry test runs on SQLite + local blobs and on
PostgreSQL + S3 (a real SeaweedFS server). PostgreSQL or SeaweedFS being
unavailable fails the tests; nothing is skipped."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_testdata import (
    BASE_NAME,
    BASE_REVISION,
    build_adapter,
    build_tiny_base,
    create_database,
    drop_database,
    s3_client,
    seaweedfs,
)
from sqlmodel import SQLModel

from registry import (
    Actor,
    AdapterVersion,
    BaseModelRecord,
    BlobStore,
    LocalBlobStore,
    Registry,
    S3BlobStore,
    Tenant,
    UploadLimits,
)

ADMIN = Actor("test-admin", admin=True)
BUCKET = "loraplex-test"
S3_KEY, S3_SECRET = "loraplex-test-key", "loraplex-test-secret"
BACKENDS = ["sqlite-local", "postgres-s3"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stock PEFT adapters on the tiny base: v1..v3 (rank 8, different seeds), r80 (rank 80)."""
    root = tmp_path_factory.mktemp("adapters")
    built = {f"v{i}": build_adapter(tiny_base, root / f"v{i}", seed=i) for i in (1, 2, 3)}
    built["r80"] = build_adapter(tiny_base, root / "r80", seed=4, r=80)
    return built


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), BUCKET, S3_KEY, S3_SECRET) as endpoint:
        yield endpoint


def s3_store(endpoint: str, prefix: str, **options: Any) -> S3BlobStore:
    """A store on the test server, with its credentials given explicitly (not from env)."""
    client = s3_client(endpoint, S3_KEY, S3_SECRET)
    return S3BlobStore(BUCKET, prefix, endpoint_url=endpoint, client=client, **options)


@pytest.fixture(scope="session")
def pg_registry(pg_url: str) -> Iterator[Registry]:
    """A registry on the session's PostgreSQL database, migrated once; used to empty it."""
    registry = Registry(pg_url, LocalBlobStore(Path("/nonexistent-unused")))
    yield registry
    registry.close()


def _empty(registry: Registry) -> None:
    # DELETE, children first: TRUNCATE takes ~0.5 s per call, DELETE on a few rows ~ms.
    with registry.database.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def blob_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> BlobStore:
    if backend == "sqlite-local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("s3_endpoint")
    return s3_store(endpoint, f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite-local":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    _empty(request.getfixturevalue("pg_registry"))
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def make_registry(database_url: str, blob_store: BlobStore) -> Iterator[Callable[..., Registry]]:
    """Registries on this test's database and blob store (with optional upload limits)."""
    made: list[Registry] = []

    def make(limits: UploadLimits | None = None) -> Registry:
        made.append(Registry(database_url, blob_store, limits))
        return made[-1]

    yield make
    for registry in made:
        registry.close()


@pytest.fixture
def registry(make_registry: Callable[..., Registry]) -> Registry:
    return make_registry()


@pytest.fixture
def base(registry: Registry, tiny_base: Path) -> BaseModelRecord:
    return registry.register_base(tiny_base, BASE_NAME, BASE_REVISION, ADMIN)


@pytest.fixture
def tenant(registry: Registry) -> Tenant:
    return registry.create_tenant("acme", ADMIN)


@pytest.fixture
def bot_v1(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> AdapterVersion:
    """Version 1 of tenant acme's adapter "bot": the stock PEFT adapter v1."""
    assert tenant.id is not None
    return registry.push_adapter(tenant.id, "bot", adapters["v1"], BASE_NAME, ADMIN)
