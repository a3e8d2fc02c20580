"""Engines declare their base: the gateway asks each one, maps the name through the registry,
and lists every served base and the caller's adapters with their base in ``/v1/models``.

The engine here is a narrow fake (an aiohttp app answering ``/v1/models`` behind a key,
and ``/health``); the real engines' answers are covered by tests/e2e/test_fleet.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy.exc
from aiohttp import web
from fastapi.testclient import TestClient

import router
from registry import TENANT_SCOPE, Actor, LocalBlobStore, Registry
from server.app import create_app
from server.config import Settings
from server.gateway.bases import BaseUnknown, Identifier, fingerprint_of
from server.gateway.loops import watch_engines
from server.gateway.openai_routes import model_list
from server.gateway.replicas import EXTERNAL_HEALTH, Engine, Replicas
from tests.registry.registry_testdata import build_tiny_base

ROOT = Actor("test-root", admin=True)
KEY = "engine-key"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "b"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny"))


def fake_engine_app(served: dict[str, str]) -> web.Application:
    """Answers ``/v1/models`` like vLLM (``served["name"]`` as the base, one LoRA beside it),
    and ``/health``."""

    async def models(request: web.Request) -> web.Response:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return web.json_response({"error": "unauthorized"}, status=401)
        lora = {"id": "lx-0123456789abcdef", "root": "/cache/x", "parent": served["name"]}
        return web.json_response({"data": [lora, {"id": served["name"], "parent": None}]})

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


@pytest.fixture
async def fake_engine() -> AsyncIterator[tuple[Engine, dict[str, str]]]:
    served = {"name": "tiny"}
    runner = web.AppRunner(fake_engine_app(served))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield Engine(f"http://127.0.0.1:{port}"), served
    await runner.cleanup()


def test_a_name_maps_to_its_one_registered_base(registry: Registry, tiny: Path) -> None:
    record = registry.register_base(tiny, "tiny", "r1", ROOT)
    assert fingerprint_of(registry, "tiny") == record.fingerprint
    with pytest.raises(BaseUnknown, match="loraplex bases register MODEL_DIR --name other"):
        fingerprint_of(registry, "other")


def test_a_name_registered_as_two_revisions_is_refused(
    registry: Registry, tiny: Path, tmp_path: Path
) -> None:
    registry.register_base(tiny, "tiny", "r1", ROOT)
    wider = build_tiny_base(tmp_path / "wider", hidden=64, intermediate=128)
    registry.register_base(wider, "tiny", "r2", ROOT)
    with pytest.raises(BaseUnknown, match=r"several revisions \(r1, r2\).*--served-model-name"):
        fingerprint_of(registry, "tiny")


async def test_an_engine_is_asked_its_base_and_gets_traffic_only_once_known(
    registry: Registry,
    tiny: Path,
    fake_engine: tuple[Engine, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, served = fake_engine
    replicas = Replicas(router.Placer(), resident_limit=4)
    replicas.add(engine)
    identifier = Identifier(registry, replicas, KEY)
    engine.report_probe(True), engine.report_probe(True)
    assert replicas.healthy_count() == 0 and replicas.bases == {}  # healthy, base unknown

    async with aiohttp.ClientSession() as client:
        with caplog.at_level(logging.WARNING, "loraplex.bases"):
            for _ in range(3):
                await identifier.identify(engine, client)  # not registered yet
        warnings = [r.message for r in caplog.records if r.name == "loraplex.bases"]
        assert len(warnings) == 1 and "no registered base" in warnings[0]  # once, not per probe

        record = registry.register_base(tiny, "tiny", "r1", ROOT)
        await identifier.identify(engine, client)
        assert (engine.base_name, engine.base_fingerprint) == ("tiny", record.fingerprint)
        assert replicas.bases == {"tiny": record.fingerprint} and replicas.healthy_count() == 1
        assert replicas.candidates(record.fingerprint, None) == [engine]

        served["name"] = "tiny-v2"  # replaced by an engine of a base not registered
        await identifier.identify(engine, client)
        assert engine.base_fingerprint == "" and replicas.bases == {}  # no traffic for "tiny"


def test_identify_is_due_for_unknown_or_returning_engines(registry: Registry) -> None:
    replicas = Replicas(router.Placer(), resident_limit=4)
    identifier = Identifier(registry, replicas, KEY)
    engine = Engine("http://127.0.0.1:1")
    assert identifier.due(engine)  # base unknown
    engine.serves("tiny", "f" * 64)
    assert identifier.due(engine)  # not healthy yet: may have been replaced
    engine.report_probe(True), engine.report_probe(True)
    assert not identifier.due(engine)


def test_models_lists_every_served_base_and_adapters_with_their_base() -> None:
    bases = {"small": "a" * 64, "large": "b" * 64}
    adapters = [("support", "a" * 64), ("legal", "b" * 64), ("orphan", "c" * 64)]
    listed = model_list(bases, adapters, created=1)
    assert [(m["id"], m["parent"], m["root"]) for m in listed] == [
        ("large", None, "large"),
        ("small", None, "small"),
        ("support", "small", "small"),
        ("legal", "large", "large"),
    ]  # "orphan": its base has no engine here, so it cannot be served
    assert all(m["object"] == "model" and m["owned_by"] == "loraplex" for m in listed)


async def test_a_registry_outage_while_asking_leaves_the_engine_to_be_asked_again(
    registry: Registry,
    tiny: Path,
    fake_engine: tuple[Engine, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = registry.register_base(tiny, "tiny", "r1", ROOT)
    engine, _ = fake_engine
    replicas = Replicas(router.Placer(), resident_limit=4)
    replicas.add(engine)
    identifier = Identifier(registry, replicas, KEY)

    def database_down() -> list[object]:  # a narrow fake of the driver's error
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("connection refused"))

    async with aiohttp.ClientSession() as client:
        with monkeypatch.context() as patched:
            patched.setattr(registry, "list_bases", database_down)
            await identifier.identify(engine, client)  # logged, not raised
        assert engine.base_fingerprint == "" and identifier.due(engine)
        await identifier.identify(engine, client)
    assert engine.base_fingerprint == record.fingerprint


async def test_the_health_loop_outlives_a_failure_while_asking(
    registry: Registry, fake_engine: tuple[Engine, dict[str, str]]
) -> None:
    engine, _ = fake_engine
    replicas = Replicas(router.Placer(), resident_limit=4)
    replicas.add(engine)

    class Failing(Identifier):
        async def identify(self, engine: Engine, client: aiohttp.ClientSession) -> None:
            raise RuntimeError("a bug while asking")

    async with aiohttp.ClientSession() as client:
        loop = asyncio.create_task(
            watch_engines(replicas, client, Failing(registry, replicas, KEY))
        )
        await asyncio.sleep(EXTERNAL_HEALTH.probe_interval * (EXTERNAL_HEALTH.readmit_after + 0.5))
        alive = not loop.done()
        loop.cancel()
    assert alive and engine.healthy  # probes kept coming after the failures


def test_a_registered_base_an_unasked_engine_may_serve_is_a_retryable_503(
    registry: Registry, tiny: Path, tmp_path: Path
) -> None:
    registry.register_base(tiny, "tiny", "r1", ROOT)
    tenant = registry.create_tenant("acme", ROOT)
    assert tenant.id is not None
    _, key = registry.create_api_key(tenant.id, TENANT_SCOPE, ROOT)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    headers = {"authorization": f"Bearer {key}"}

    down = Engine("http://127.0.0.1:9")  # discovered, never answered: its base is unknown
    app = create_app(Settings(home=tmp_path), registry, engines=[down])
    answer = TestClient(app).post("/v1/completions", json=body, headers=headers)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["code"] == "no_engine"
    unknown = TestClient(app).post(
        "/v1/completions", json={**body, "model": "nope"}, headers=headers
    )
    assert unknown.status_code == 404  # not a registered base: unknown, as before

    known = Engine("http://127.0.0.1:9", "f" * 64, "other")  # every engine's base known
    app = create_app(Settings(home=tmp_path), registry, engines=[known])
    gone = TestClient(app).post("/v1/completions", json=body, headers=headers)
    assert gone.status_code == 404  # no engine here serves "tiny": not offered
