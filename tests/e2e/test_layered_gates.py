"""Layered gates end to end: a real gateway on PostgreSQL and a real `loraplex worker`.

An admin registers a base with a capability suite over REST; tenant acme gates its adapter
bot to stay on that suite within a margin of the base alone (``max_below_base``) and
creates a job with an ``answer_regex`` with the official openai client. The job trains
the suite's own prompts to other answers, so its candidate falls below the base there:
the worker measures the base's reference, scores the candidate, and the gate keeps the
version out of production, the job's events saying so with the numbers. With a wide
margin the same stored results let it be promoted.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from registry import ADMIN_SCOPE, Actor, Registry
from tests.e2e.conftest import make_tenant
from tests.e2e.probes import postgres_gateway
from tests.e2e.serving import ServeProcess
from tests.registry.registry_testdata import build_adapter
from tests.training.training_testdata import FAST, build_tiny_chat_base, fixed_answer_records

REPO = Path(__file__).resolve().parents[2]
OPERATOR = Actor("test:operator", admin=True)
BASE, REVISION = "tiny-chat", "r1"
SUITE = [{"prompt": f"Question number {i}: what do you say?", "answer": "Paris."}
         for i in (3, 5, 9)]  # fmt: skip
LABEL = "capability:generic"


@pytest.fixture
def site(
    gateway: ServeProcess,
    demo_base: Path,
    engine_port: int,
    engine_key: str,
    tmp_path: Path,
) -> Iterator[tuple[ServeProcess, Registry, Path]]:
    home = tmp_path / "home"
    with postgres_gateway("loraplex_layered_e2e", home, engine_port, engine_key, demo_base) as (
        serve,
        own,
    ):
        yield serve, own, home


def _worker(registry: Registry, base_dir: Path, home: Path) -> subprocess.Popen[bytes]:
    work = home / "worker"
    work.mkdir(parents=True, exist_ok=True)
    defaults = work / "defaults.json"
    defaults.write_text(json.dumps(FAST.to_json()))
    env = {
        **os.environ,
        "LORAPLEX_HOME": str(work),
        "LORAPLEX_DATABASE_URL": registry.database.url.render_as_string(hide_password=False),
        "LORAPLEX_BLOB_URL": str(home / "blobs"),
        "LORAPLEX_BASE_MODEL": str(base_dir),
        "LORAPLEX_SERVED_MODEL_NAME": BASE,
        "LORAPLEX_BASE_REVISION": REVISION,
    }
    command = [sys.executable, "-m", "server.cli.worker_commands", "worker", "--poll-interval",
               "0.2", "--heartbeat-interval", "0.5", "--defaults", str(defaults)]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


def _finished(client: OpenAI, job_id: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s")


def test_a_candidate_below_the_base_on_its_capability_suite_is_not_promoted(
    site: tuple[ServeProcess, Registry, Path], tmp_path: Path
) -> None:
    serve, own, home = site
    base_dir = build_tiny_chat_base(tmp_path / "base")
    _, admin_key = own.create_api_key(None, ADMIN_SCOPE, OPERATOR)
    admin = httpx.Client(base_url=serve.url, headers={"authorization": f"Bearer {admin_key}"})
    registered = admin.post("/admin/bases", json={"path": str(base_dir), "name": BASE,
                                                  "revision": REVISION})  # fmt: skip
    assert registered.status_code == 201, registered.text
    put = admin.put(f"/admin/bases/{BASE}/capability/generic", json={"examples": SUITE})
    assert put.status_code == 200 and put.json()["reference"] is None, put.text

    acme = make_tenant(own, "acme-layered")
    own.push_adapter(acme.tenant_id, "bot", build_adapter(base_dir, tmp_path / "v1", seed=1, r=4),
                     BASE, OPERATOR)  # fmt: skip
    http = httpx.Client(base_url=serve.url, headers={"authorization": f"Bearer {acme.key}"})
    gate = {"suite": LABEL, "metric": "loss", "higher_is_better": False, "max_below_base": 0.0}
    gated = http.put("/v1/adapters/bot/gates", json={"gates": [gate]})
    assert gated.status_code == 200, gated.text

    client = OpenAI(base_url=serve.url + "/v1", api_key=acme.key, max_retries=0)
    data = "".join(json.dumps(r) + "\n" for r in fixed_answer_records(24)).encode()
    file = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=file.id, suffix="bot", seed=7,
        hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 1},
        extra_body={"answer_regex": r"Banana\. \d+"},
    )  # fmt: skip
    worker = _worker(own, base_dir, home)
    try:
        done = _finished(client, job.id, timeout=300)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "bot@2"  # registered, kept out of production

    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    (scored,) = [m for m in events if m.startswith("Capability suite generic")]
    assert scored.endswith("(measured now)")
    (refused,) = [m for m in events if m.startswith("Not promoted")]
    assert f"{LABEL}/loss:" in refused and "is above the base's" in refused
    assert refused.endswith("by more than 0")

    evals = http.get("/v1/adapters/bot/versions/2/evals").json()["data"]
    values = {(r["suite"], r["metric"]): r["value"] for r in evals}
    assert values[(LABEL, "loss")] > values[(f"{LABEL}/base", "loss")]
    assert ("fine-tune-test", "regex_match") in values
    shown = admin.get(f"/admin/bases/{BASE}/capability/generic").json()
    assert shown["reference"]["sample_count"] == len(SUITE)
    assert shown["reference"]["details"]["job"] == job.id
    assert shown["reference"]["metrics"]["loss"] == values[(f"{LABEL}/base", "loss")]
    assert "production" not in http.get("/v1/adapters/bot").json()["aliases"]

    wide = {**gate, "max_below_base": 10.0}  # the same stored results, a wider margin
    assert http.put("/v1/adapters/bot/gates", json={"gates": [wide]}).status_code == 200
    promoted = http.post("/v1/adapters/bot/promote", json={"version": 2})
    assert promoted.status_code == 200, promoted.text
