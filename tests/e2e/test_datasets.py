"""Versioned datasets end to end: a real gateway process on a PostgreSQL registry.

The official openai client uploads the fine-tuning files and trains on a version's file;
the dataset routes, which have no SDK, are driven with httpx. The gateway runs in front of
the session's engine (datasets need none, but this is the process users run).
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from registry import Registry
from registry.datasets import address
from tests.e2e.conftest import TenantKeys, make_tenant
from tests.e2e.probes import postgres_gateway
from tests.e2e.serving import ServeProcess


def chat(question: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


FIRST = [chat(f"What is {i} + {i}?", str(2 * i)) for i in range(8)]
SECOND = [chat("What is 100 + 1?", "101")]


class Site:
    def __init__(self, url: str, registry: Registry) -> None:
        self.url, self.registry = url, registry

    def tenant(self, role: str) -> TenantKeys:
        return make_tenant(self.registry, f"datasets-{role}-{uuid.uuid4().hex[:6]}")

    def http(self, tenant: TenantKeys) -> httpx.Client:
        auth = {"authorization": f"Bearer {tenant.key}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=60)

    def openai(self, tenant: TenantKeys) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=tenant.key, max_retries=0)


@pytest.fixture(scope="module")
def site(
    gateway: ServeProcess,
    demo_base: Path,
    engine_port: int,
    engine_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("datasets-pg")
    with postgres_gateway("loraplex_datasets_e2e", home, engine_port, engine_key, demo_base) as (
        serve,
        own,
    ):
        yield Site(serve.url, own)


def upload(client: OpenAI, records: list[dict[str, Any]]) -> str:
    content = "".join(json.dumps(r) + "\n" for r in records).encode()
    return client.files.create(file=("data.jsonl", io.BytesIO(content)), purpose="fine-tune").id


def test_versions_from_uploaded_files_train_and_stay_private(site: Site, demo_base: Path) -> None:
    acme, globex = site.tenant("acme"), site.tenant("globex")
    client, http = site.openai(acme), site.http(acme)
    created = http.post("/v1/datasets", json={"name": "math"})
    assert created.status_code == 201, created.text
    assert created.json()["object"] == "dataset"

    v1 = http.post("/v1/datasets/math/versions", json={"training_file": upload(client, FIRST)})
    assert v1.status_code == 201, v1.text
    assert (v1.json()["number"], v1.json()["examples"]) == (1, len(FIRST))
    assert v1.json()["audit"]["examples"] == len(FIRST)
    v2 = http.post("/v1/datasets/math/versions", json={"training_file": upload(client, SECOND)})
    assert v2.status_code == 201, v2.text
    shown = http.get("/v1/datasets/math/versions/2").json()
    assert (shown["parent"], shown["examples"]) == (1, len(FIRST) + 1)
    assert shown["diff"] == {"added": [address(SECOND[0])], "removed": []}

    job = client.fine_tuning.jobs.create(model=demo_base.name, training_file=shown["file_id"])
    assert job.training_file == shown["file_id"]
    assert (job.model_extra or {})["dataset_version"] == {"dataset": "math", "version": 2}

    refused = http.post("/v1/datasets/math/versions", json={"replace": "maybe"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "replace"

    theirs, unknown = (
        site.http(globex).get(f"/v1/datasets/{name}/versions/2") for name in ("math", "nope")
    )
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == json.loads(unknown.text.replace("nope", "math"))
    assert site.http(globex).get("/v1/datasets").json()["data"] == []
