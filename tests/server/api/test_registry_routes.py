"""The registry REST API on a small test app: auth, tenant isolation, uploads, lifecycle, admin."""

from __future__ import annotations

import io
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))
from registry_testdata import build_adapter, build_tiny_base

from registry import Actor, LocalBlobStore, Registry, UploadLimits
from server.api import registry_routes
from server.errors import error_body, install_api_error_handler

ROOT = Actor("test-root", admin=True)
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def peft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_base(root / "base")
    return {"base": base, **{f"v{i}": build_adapter(base, root / f"v{i}", seed=i) for i in (1, 2)}}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(
        f"sqlite:///{tmp_path / 'r.db'}",
        LocalBlobStore(tmp_path / "blobs"),
        UploadLimits(max_total_bytes=200_000),
    )
    yield registry
    registry.close()


@pytest.fixture
def client(registry: Registry) -> TestClient:
    app = FastAPI()
    install_api_error_handler(app)
    app.state.registry = registry
    app.include_router(registry_routes.routes)
    return TestClient(app)


class Keys:
    def __init__(self, registry: Registry) -> None:
        def key(tenant: str | None) -> dict[str, str]:
            tenant_id = registry.create_tenant(tenant, ROOT).id if tenant else None
            _, plaintext = registry.create_api_key(tenant_id, "tenant" if tenant else "admin", ROOT)
            return {"Authorization": f"Bearer {plaintext}"}

        self.acme, self.globex, self.admin = key("acme"), key("globex"), key(None)


@pytest.fixture
def keys(registry: Registry, peft: dict[str, Path]) -> Keys:
    registry.register_base(peft["base"], "tiny", "r1", ROOT)
    return Keys(registry)


def _upload(adapter: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, (adapter / name).read_bytes())) for name in FILES]


def _push(client: TestClient, headers: dict[str, str], adapter: Path, name: str = "bot") -> Any:
    return client.post(
        "/v1/adapters", headers=headers, files=_upload(adapter), data={"name": name, "base": "tiny"}
    )


MALFORMED_KEYS = [
    pytest.param({}, id="no header"),
    pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="wrong scheme"),
    pytest.param({"Authorization": "Bearer "}, id="empty token"),
    pytest.param({"Authorization": "Bearer    "}, id="blank token"),
    pytest.param({"Authorization": "lpx-key-without-scheme"}, id="no scheme"),
]


@pytest.mark.parametrize("path", ["/v1/adapters", "/admin/tenants", "/admin/tenants/acme/adapters"])
@pytest.mark.parametrize("headers", MALFORMED_KEYS)
def test_a_missing_or_malformed_key_is_the_one_401(
    client: TestClient, keys: Keys, path: str, headers: dict[str, str]
) -> None:
    answer = client.get(path, headers=headers)
    assert (answer.status_code, answer.json()) == (
        401,
        error_body(
            401,
            "Missing or malformed API key: send `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        ),
    )


def test_unknown_and_revoked_keys_get_401(
    client: TestClient, keys: Keys, registry: Registry
) -> None:
    bad = client.get("/v1/adapters", headers={"Authorization": "Bearer lpx-nope"})
    assert (bad.status_code, bad.json()) == (
        401,
        error_body(401, "Incorrect or revoked API key provided.", code="invalid_api_key"),
    )
    assert bad.json()["error"]["type"] == "authentication_error"
    key_id = registry.list_api_keys(registry.get_tenant("acme").id)[0].id
    assert key_id is not None
    registry.revoke_api_key(key_id, ROOT)
    revoked = client.get("/v1/adapters", headers=keys.acme)
    assert (revoked.status_code, revoked.json()) == (401, bad.json())


def test_admin_keys_do_not_pass_tenant_routes_and_tenant_keys_not_admin_routes(
    client: TestClient, keys: Keys
) -> None:
    response = client.get("/v1/adapters", headers=keys.admin)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "tenant_key_required")
    response = client.get("/admin/tenants", headers=keys.acme)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "admin_key_required")


def test_upload_files_then_lifecycle(client: TestClient, keys: Keys, peft: dict[str, Path]) -> None:
    first = _push(client, keys.acme, peft["v1"])
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["lora_name"].startswith("lx-")
    assert _push(client, keys.acme, peft["v1"]).json()["version"] == 1  # idempotent
    assert _push(client, keys.acme, peft["v2"]).json()["version"] == 2
    promote = client.post("/v1/adapters/bot/promote", headers=keys.acme, json={"version": 1})
    assert promote.status_code == 200, promote.text
    client.post("/v1/adapters/bot/promote", headers=keys.acme, json={"version": 2})
    canary = client.post(
        "/v1/adapters/bot/canary", headers=keys.acme, json={"version": 1, "weight": 0.2}
    )
    assert canary.status_code == 200
    shown = client.get("/v1/adapters/bot", headers=keys.acme).json()
    assert shown["aliases"]["production"]["version"] == 2
    assert shown["aliases"]["canary"]["weight"] == 0.2
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    retire = client.post("/v1/adapters/bot/versions/1/retire", headers=keys.acme)
    assert retire.status_code == 409 and retire.json()["error"]["type"] == "conflict_error"
    assert client.delete("/v1/adapters/bot/canary", headers=keys.acme).status_code == 204
    rollback = client.post("/v1/adapters/bot/rollback", headers=keys.acme)
    assert rollback.json()["version"] == 1
    assert (
        client.post("/v1/adapters/bot/versions/2/archive", headers=keys.acme).json()["state"]
        == "archived"
    )
    listed = client.get("/v1/adapters/bot/versions", headers=keys.acme).json()["data"]
    assert [v["state"] for v in listed] == ["active", "archived"]


def test_upload_as_one_archive(client: TestClient, keys: Keys, peft: dict[str, Path]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(peft["v1"], arcname="out")
    response = client.post(
        "/v1/adapters",
        headers=keys.acme,
        files=[("files", ("adapter.tar.gz", buffer.getvalue()))],
        data={"name": "bot", "base": "tiny", "description": "d"},
    )
    assert response.status_code == 201, response.text


def test_rejected_upload_is_422_with_every_problem(
    client: TestClient, keys: Keys, peft: dict[str, Path]
) -> None:
    files = [*_upload(peft["v1"]), ("files", ("adapter_model.bin", b"\x80\x02"))]
    response = client.post(
        "/v1/adapters", headers=keys.acme, files=files, data={"name": "bot", "base": "nope"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "adapter_rejected"
    assert "base 'nope' names no registered base model" in error["message"]
    assert "adapter_model.bin: pickle-based weights are refused" in error["message"]
    assert client.get("/v1/adapters", headers=keys.acme).json()["data"] == []


def test_oversized_upload_is_413(client: TestClient, keys: Keys, peft: dict[str, Path]) -> None:
    files = [*_upload(peft["v1"]), ("files", ("README.md", b"x" * 300_000))]
    response = client.post(
        "/v1/adapters", headers=keys.acme, files=files, data={"name": "bot", "base": "tiny"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"


def test_tenants_cannot_see_each_others_adapters(
    client: TestClient, keys: Keys, peft: dict[str, Path]
) -> None:
    _push(client, keys.acme, peft["v1"])
    foreign = client.get("/v1/adapters/bot", headers=keys.globex)
    unknown = client.get("/v1/adapters/zzz", headers=keys.globex)
    assert foreign.status_code == unknown.status_code == 404
    assert (
        foreign.json()["error"]["message"].replace("bot", "zzz")
        == unknown.json()["error"]["message"]
    )
    assert client.get("/v1/adapters", headers=keys.globex).json()["data"] == []
    promote = client.post("/v1/adapters/bot/promote", headers=keys.globex, json={"version": 1})
    assert promote.status_code == 404


def test_gates_block_tenants_and_admins_override(
    client: TestClient, keys: Keys, peft: dict[str, Path]
) -> None:
    _push(client, keys.acme, peft["v1"])
    gates = {"gates": [{"suite": "qa", "metric": "acc", "min_value": 0.9}]}
    assert client.put("/v1/adapters/bot/gates", headers=keys.acme, json=gates).status_code == 200
    refused = client.post("/v1/adapters/bot/promote", headers=keys.acme, json={"version": 1})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "gate_failed")
    forced = client.post(
        "/v1/adapters/bot/promote", headers=keys.acme, json={"version": 1, "override": True}
    )
    assert forced.status_code == 403
    evals = client.post(
        "/v1/adapters/bot/versions/1/evals",
        headers=keys.acme,
        json={"suite": "qa", "metric": "acc", "value": 0.5},
    )
    assert evals.status_code == 201
    admin = client.post(
        "/admin/tenants/acme/adapters/bot/promote",
        headers=keys.admin,
        json={"version": 1, "override": True},
    )
    assert admin.status_code == 200, admin.text
    audit = client.get(
        "/admin/audit", headers=keys.admin, params={"tenant": "acme", "action": "adapter.promote"}
    ).json()["data"]
    assert audit[-1]["after"]["override"] is True


def test_admin_manages_tenants_keys_and_bases(
    client: TestClient, keys: Keys, peft: dict[str, Path]
) -> None:
    created = client.post(
        "/admin/tenants",
        headers=keys.admin,
        json={"name": "initech", "limits": {"max_concurrent": 2}},
    )
    assert created.status_code == 201 and created.json()["limits"]["max_concurrent"] == 2
    duplicate = client.post("/admin/tenants", headers=keys.admin, json={"name": "initech"})
    assert duplicate.status_code == 409
    limits = client.put(
        "/admin/tenants/initech/limits", headers=keys.admin, json={"requests_per_minute": 0}
    )
    assert (limits.status_code, limits.json()["error"]["code"]) == (400, "invalid_limits")
    key = client.post("/admin/keys", headers=keys.admin, json={"tenant": "initech"}).json()
    assert key["key"].startswith("lpx-")
    new = {"Authorization": f"Bearer {key['key']}"}
    assert client.get("/v1/adapters", headers=new).status_code == 200
    assert client.post(f"/admin/keys/{key['id']}/revoke", headers=keys.admin).status_code == 200
    assert client.get("/v1/adapters", headers=new).status_code == 401
    names = [t["name"] for t in client.get("/admin/tenants", headers=keys.admin).json()["data"]]
    assert names == ["acme", "globex", "initech"]
    bases = client.get("/admin/bases", headers=keys.admin).json()["data"]
    assert [b["name"] for b in bases] == ["tiny"]
    deprecated = client.post(
        "/admin/bases/tiny/deprecate", headers=keys.admin, json={"reason": "old"}
    )
    assert deprecated.json()["deprecated_at"] is not None
    bad = client.post("/admin/bases", headers=keys.admin, json={"path": "/nope", "name": "x"})
    assert bad.status_code == 400


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/adapters",
        "/v1/adapters/{name}/promote",
        "/admin/tenants",
        "/admin/tenants/{tenant}/adapters/{name}/rollback",
        "/admin/audit",
    } <= set(paths)
