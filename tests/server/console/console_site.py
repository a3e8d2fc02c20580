"""A real gateway for the console's browser tests: ``create_app`` on a SQLite registry with
no engine (the console needs none), served by uvicorn on a free loopback port, seeded with
one tenant's adapters, eval results, gates, a fine-tuning job and usage counters."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from registry import Actor, Gate, LocalBlobStore, Registry
from registry.datasets import DatasetStore
from registry.jobs import FineTuningJob, JobStore
from registry.retraining import PolicySpec, RetrainingStore
from registry.upgrades import UpgradeOptions, UpgradeStore
from server.app import create_app
from server.config import Settings
from tests.registry.registry_testdata import (
    BASE_NAME,
    BASE_REVISION,
    build_adapter,
    build_tiny_base,
)

ROOT = Actor("console-test-root", admin=True)
XSS = "<img src=x onerror=alert(1)> answers support tickets"
"""A tenant-supplied description that must render as text, never as markup."""
LIFECYCLE = "support-bot"
"""v1 in production, v2 better: promote, canary and rollback act on it."""
STRICT = "strict-bot"
"""A gate (qa/accuracy at least 0.9) that its v2 (0.5) fails."""
JOB_ID = "ftjob-console-demo"
NEW_BASE = "tiny-llama-next"
"""The base an upgrade moves acme's adapters to."""


@dataclass(frozen=True)
class Site:
    url: str
    registry: Registry
    tenant_id: int
    tenant_key: str
    tenant_actor: str
    """The tenant key as the audit log names it (``key:N``)."""
    admin_key: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(registry: Registry, home: Path) -> Iterator[str]:
    """The whole gateway app on a loopback port, in a thread, until the block ends."""
    port = _free_port()
    app = create_app(Settings(home=home), registry, engines=[])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _adapter(registry: Registry, tenant_id: int, work: Path, name: str, scores: list[float],
             description: str) -> None:  # fmt: skip
    """``name`` with a version per score (qa/accuracy), v1 in production."""
    for number, score in enumerate(scores, start=1):
        files = build_adapter(work / "base", work / f"{name}-{number}", seed=number)
        registry.push_adapter(tenant_id, name, files, BASE_NAME, ROOT, description=description)
        add = registry.add_eval_result
        add(tenant_id, name, number, "qa", "accuracy", score, ROOT)
        add(tenant_id, name, number, "safety", "refusal_rate", score / 10, ROOT)
    registry.promote(tenant_id, name, 1, ROOT)


def _job(registry: Registry, tenant_id: int, fingerprint: str) -> None:
    """A finished job with step events (training loss) and checkpoints (validation loss)."""
    store = JobStore(registry)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    record = {"messages": chat}
    upload = store.create_file(tenant_id, "train.jsonl", "fine-tune", json.dumps(record).encode())
    job = FineTuningJob(id=JOB_ID, tenant_id=tenant_id, status="succeeded", model=BASE_NAME,
                        base_fingerprint=fingerprint, training_file=upload.id,
                        adapter_name=LIFECYCLE)  # fmt: skip
    store.create_job(job)
    for step in range(1, 21):
        loss = 2.4 / (1 + 0.25 * step)
        data = {"step": step, "total_steps": 20, "train_loss": loss}
        store.add_event(JOB_ID, f"Step {step}/20: training loss={loss:.4f}", data=data)
        if step % 5 == 0:
            store.add_checkpoint(JOB_ID, step, {**data, "valid_loss": loss * 1.15})
    store.add_event(JOB_ID, "Job succeeded")
    DatasetStore(store).create(tenant_id, "tickets")  # the loop: retrain it daily on them
    spec = PolicySpec(dataset="tickets", every_seconds=86_400)
    RetrainingStore(store).set_policy(tenant_id, LIFECYCLE, spec, ROOT)


def _usage(registry: Registry, tenant_id: int) -> None:
    """Two weeks of traffic, growing, with the canary's share on some days."""
    today = dt.datetime.now(dt.UTC).date()
    for back in range(14):
        day = today - dt.timedelta(days=back)
        requests = 40 + 5 * (14 - back)
        registry.record_usage(tenant_id, LIFECYCLE, 1, requests=requests,
                              prompt_tokens=requests * 30, completion_tokens=requests * 12,
                              errors=back % 3, day=day)  # fmt: skip
        if back < 5:
            registry.record_usage(tenant_id, LIFECYCLE, 2, requests=10, prompt_tokens=300,
                                  completion_tokens=120, day=day)  # fmt: skip


def _upgrade(registry: Registry, work: Path) -> None:
    """A base upgrade started (nothing advanced): every adapter on the old base is an item."""
    build_tiny_base(work / "next", hidden=64, intermediate=128)
    registry.register_base(work / "next", NEW_BASE, BASE_REVISION, ROOT)
    UpgradeStore(registry).start(BASE_NAME, NEW_BASE, UpgradeOptions(), ROOT)


def seed(registry: Registry, work: Path) -> tuple[int, str, str, str]:
    """Tenant acme with two adapters, a job and usage: (its id, tenant key, its actor,
    an admin key). ``work / "base"`` must hold the tiny base."""
    base = registry.register_base(work / "base", BASE_NAME, BASE_REVISION, ROOT)
    tenant_id = registry.create_tenant("acme", ROOT).id
    assert tenant_id is not None
    record, tenant_key = registry.create_api_key(tenant_id, "tenant", ROOT, name="console")
    admin_key = registry.create_api_key(None, "admin", ROOT)[1]
    _adapter(registry, tenant_id, work, LIFECYCLE, [0.71, 0.83], XSS)
    _adapter(registry, tenant_id, work, STRICT, [0.95, 0.5], "Refuses to regress")
    registry.set_gates(tenant_id, STRICT, [Gate("qa", "accuracy", min_value=0.9)], ROOT)
    _job(registry, tenant_id, base.fingerprint)
    _usage(registry, tenant_id)
    _upgrade(registry, work)
    return tenant_id, tenant_key, f"key:{record.id}", admin_key


def open_registry(work: Path) -> Registry:
    return Registry(f"sqlite:///{work / 'registry.db'}", LocalBlobStore(work / "blobs"))
