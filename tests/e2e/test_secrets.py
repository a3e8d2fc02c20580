"""Keys never leak (logs, metrics, listings, process lists), and revocation is fast everywhere.

The leak scan runs a gateway on PostgreSQL (with a password in its URL) and a
real SeaweedFS (with S3 credentials), sends it a full run of traffic, good and
bad, including uploads while S3 is down, and then looks for every secret in
every log, response body, metric and process command line.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from registry import ADMIN_SCOPE, LocalBlobStore, Registry
from server.dev.seaweed import SeaweedFS
from tests import reliability
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import gateway_on_engine
from tests.e2e.serving import ServeProcess, shared_registry_env
from tests.registry.registry_testdata import build_adapter, create_database, drop_database

pytestmark = pytest.mark.reliability

REVOCATION_BOUND = 1.0
"""Seconds within which a revoked key must stop working on every gateway process."""


@pytest.fixture(scope="module")
def second_gateway(
    gateway: ServeProcess,
    engine_port: int,
    engine_key: str,
    base_name: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeProcess]:
    """Another gateway process on the session's registry and engine, as in a scaled-out fleet."""
    home = tmp_path_factory.mktemp("second")
    args = ["--served-model-name", base_name]
    serve = gateway_on_engine(home, engine_port, engine_key, args, shared_registry_env(gateway))
    try:
        serve.wait_ready(timeout=120)
        yield serve
    finally:
        assert serve.stop(), serve.log_tail()


def _accepted(url: str, key: str, base_name: str) -> list[str]:
    """The routes (inference, listing, registry API) that still take ``key``."""
    auth = {"authorization": f"Bearer {key}"}
    completion = {"model": base_name, "prompt": "hi", "max_tokens": 1}
    calls = {
        "completions": ("POST", "/v1/completions", completion),
        "models": ("GET", "/v1/models", None),
        "adapters": ("GET", "/v1/adapters", None),
    }
    taken = []
    for route, (method, path, body) in calls.items():
        reply = httpx.request(method, url + path, json=body, headers=auth, timeout=30)
        if reply.status_code != 401:
            taken.append(f"{route}: {reply.status_code}")
    return taken


def test_revoked_key_stops_working_within_a_second_on_every_gateway(
    gateway: ServeProcess,
    second_gateway: ServeProcess,
    registry: Registry,
    base_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = make_tenant(registry, "short-lived")
    urls = [gateway.url, second_gateway.url]
    for url in urls:  # each process has the key in its cache now
        assert len(_accepted(url, tenant.key, base_name)) == 3
    [key] = registry.list_api_keys(tenant.tenant_id)
    assert key.id is not None
    registry.revoke_api_key(key.id, OPERATOR)
    revoked_at = time.monotonic()
    refused_after = {}
    while len(refused_after) < len(urls) and time.monotonic() - revoked_at < 5:
        for url in urls:
            reply = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {tenant.key}"})
            if reply.status_code == 401 and url not in refused_after:
                refused_after[url] = time.monotonic() - revoked_at
        time.sleep(0.02)
    time.sleep(max(0.0, REVOCATION_BOUND - (time.monotonic() - revoked_at)))
    taken = {url: _accepted(url, tenant.key, base_name) for url in urls}
    with capsys.disabled():
        seconds = ", ".join(f"{s:.2f} s" for s in refused_after.values())
        print(f"\n[revocation] /v1/models refused the revoked key after {seconds}")
    bad = sum(map(len, taken.values()))
    reliability.record(
        "secrets", "revoked key refused within 1 s on 2 gateway processes", 3 * len(urls),
        "requests", bad, "accepted",
    )  # fmt: skip
    assert bad == 0, taken


@dataclass(frozen=True)
class Secrets:
    db_password: str
    s3_access_key: str
    s3_secret_key: str
    engine_key: str


@pytest.fixture(scope="module")
def secret_gateway(
    gateway: ServeProcess,
    demo_base: Path,
    engine_port: int,
    engine_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServeProcess, SeaweedFS, Secrets]]:
    """A gateway on PostgreSQL and SeaweedFS whose settings carry real secrets."""
    found = Secrets(
        secrets.token_hex(12), "AKLX" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30),
        engine_key,
    )  # fmt: skip
    home = tmp_path_factory.mktemp("secretive")
    database = create_database("loraplex_secrets")
    # Trust auth ignores the password, but every component still sees it in the URL.
    url = database.replace("postgres@", f"postgres:{found.db_password}@")
    weed = SeaweedFS(home / "weed", "secret-blobs", found.s3_access_key, found.s3_secret_key)
    weed.start()
    serve = gateway_on_engine(
        home / "serve",
        engine_port,
        engine_key,
        ["--base-model", str(demo_base)],
        {
            "LORAPLEX_DATABASE_URL": url,
            "LORAPLEX_BLOB_URL": "s3://secret-blobs/adapters",
            "LORAPLEX_S3_ENDPOINT_URL": weed.endpoint,
            "AWS_ACCESS_KEY_ID": found.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": found.s3_secret_key,
        },
    )
    try:
        serve.wait_ready(timeout=120)
        yield serve, weed, found
    finally:
        stopped = serve.stop()
        weed.stop()
        drop_database(database)
        assert stopped, serve.log_tail()


Call = tuple[str, str, dict[str, Any]]


def _upload(adapter: Path, base_name: str, auth: dict[str, str]) -> Call:
    files = [("files", (f.name, f.read_bytes())) for f in sorted(adapter.iterdir()) if f.is_file()]
    form = {"name": "secret-bot", "base": base_name}
    return "POST", "/v1/adapters", {"files": files, "data": form, "headers": auth}


def _traffic(tenant: TenantKeys, admin_key: str, adapter: Path, base_name: str) -> dict[str, Call]:
    """Good and bad requests of every kind, by what they are."""
    auth = {"authorization": f"Bearer {tenant.key}"}
    admin = {"authorization": f"Bearer {admin_key}"}
    junk = [("files", ("adapter_model.safetensors", b"junk"))]
    long_prompt = {"model": base_name, "prompt": "a " * 5000, "max_tokens": 1}
    junk_form = {"name": "junk", "base": base_name}
    unknown = {"model": "nope", "prompt": "x"}
    return {
        "upload": _upload(adapter, base_name, auth),
        "bad upload": ("POST", "/v1/adapters", {"files": junk, "data": junk_form, "headers": auth}),
        "unknown model": ("POST", "/v1/completions", {"json": unknown, "headers": auth}),
        "prompt too long": ("POST", "/v1/completions", {"json": long_prompt, "headers": auth}),
        "bad key": ("GET", "/v1/models", {"headers": {"authorization": f"Bearer {tenant.key}x"}}),
        "admin key on /v1/models": ("GET", "/v1/models", {"headers": admin}),
        "admin bases": ("GET", "/admin/bases", {"headers": admin}),
        "admin keys": ("GET", "/admin/keys", {"headers": admin}),
        "/v1/models": ("GET", "/v1/models", {"headers": auth}),
        "/v1/adapters": ("GET", "/v1/adapters", {"headers": auth}),
        "/readyz": ("GET", "/readyz", {}),
    }  # fmt: skip


def _send(serve: ServeProcess, call: Call) -> str:
    """The reply as status and body, both scanned (and shown when the test fails)."""
    method, path, kwargs = call
    reply = httpx.request(method, serve.url + path, timeout=120, **kwargs)
    return f"{reply.status_code} {reply.text}"


def _full_run(
    serve: ServeProcess, weed: SeaweedFS, tenant: TenantKeys, admin_key: str, adapters: list[Path]
) -> dict[str, str]:
    """Every kind of traffic, S3 up and down; the texts a client or scraper could see."""
    client = OpenAI(base_url=serve.url + "/v1", api_key=tenant.key, max_retries=0)
    base_name = client.models.list().data[0].id  # the base is listed first
    client.completions.create(model=base_name, prompt="hi", max_tokens=2)
    stream = client.chat.completions.create(
        model=base_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
    )
    seen = {"stream": "".join(chunk.model_dump_json() for chunk in stream)}
    for what, call in _traffic(tenant, admin_key, adapters[0], base_name).items():
        seen[what] = _send(serve, call)
    auth = {"authorization": f"Bearer {tenant.key}"}
    weed.stop()  # S3 down: uploads and promotions fail without naming credentials
    try:
        seen["upload, S3 down"] = _send(serve, _upload(adapters[1], base_name, auth))
        promote = {"json": {"version": 1}, "headers": auth}
        seen["promote, S3 down"] = _send(
            serve, ("POST", "/v1/adapters/secret-bot/promote", promote)
        )
    finally:
        weed.start()
    seen["/metrics"] = httpx.get(serve.url + "/metrics", timeout=30).text
    return seen


def test_no_secret_appears_in_logs_bodies_metrics_listings_or_process_lists(
    secret_gateway: tuple[ServeProcess, SeaweedFS, Secrets],
    demo_base: Path,
    base_name: str,
    tmp_path: Path,
) -> None:
    serve, weed, found = secret_gateway
    registry = Registry(serve.env["LORAPLEX_DATABASE_URL"], LocalBlobStore(tmp_path / "unused"))
    try:
        tenant = make_tenant(registry, "secretive")
        _, admin_key = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR)
    finally:
        registry.close()
    adapters = [build_adapter(demo_base, tmp_path / f"a{s}", seed=s, r=8) for s in (51, 52)]
    texts = _full_run(serve, weed, tenant, admin_key, adapters)
    # The secrets were in use: the upload reached S3, and S3 down is a clean error, not a 500.
    assert texts["upload"].startswith("201 "), texts["upload"][:300]
    assert texts["upload, S3 down"][:3] in ("502", "503"), texts["upload, S3 down"][:300]
    texts["gateway log"] = serve.log_path.read_text(errors="replace")
    for log in serve.home.rglob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    assert serve.process is not None
    for process in [psutil.Process(serve.process.pid), *serve.all_descendants()]:
        texts[f"argv of pid {process.pid}"] = " ".join(process.cmdline())
    named = {
        "tenant key": tenant.key, "admin key": admin_key, "engine key": found.engine_key,
        "database password": found.db_password, "S3 access key": found.s3_access_key,
        "S3 secret key": found.s3_secret_key,
    }  # fmt: skip
    leaks = [f"{name} in {where}" for name, secret in named.items()
             for where, text in texts.items() if secret in text]  # fmt: skip
    reliability.record(
        "secrets", "6 secrets x logs, bodies, metrics, listings, argv", len(named) * len(texts),
        "places", len(leaks), "leaks",
    )  # fmt: skip
    assert leaks == []


def test_no_key_appears_in_the_session_gateway_or_its_engine(
    gateway: ServeProcess, registry: Registry, engine_key: str, base_name: str
) -> None:
    """The session gateway started its engine itself: the engine's argv and logs count too."""
    tenant = make_tenant(registry, "secretive-session")
    client = OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0)
    client.completions.create(model=base_name, prompt="hi", max_tokens=1)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    bad = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": base_name},
        headers={"authorization": f"Bearer {tenant.key}x"},
    )
    texts = {
        "error body": str(info.value.body) + bad.text,
        "/metrics": httpx.get(gateway.url + "/metrics").text,
        "/v1/models": client.models.with_raw_response.list().text,
        "/readyz": httpx.get(gateway.url + "/readyz").text,
        "gateway log": gateway.log_path.read_text(errors="replace"),
    }
    for log in (gateway.home / "logs").glob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    for process in gateway.all_descendants():
        texts[f"argv of pid {process.pid}"] = " ".join(process.cmdline())
    named = {"tenant key": tenant.key, "engine key": engine_key}
    leaks = [f"{name} in {where}" for name, secret in named.items()
             for where, text in texts.items() if secret in text]  # fmt: skip
    reliability.record(
        "secrets", "keys x session gateway and engine logs, bodies, argv", 2 * len(texts),
        "places", len(leaks), "leaks",
    )  # fmt: skip
    assert leaks == []
