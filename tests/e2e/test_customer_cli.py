"""The customer CLI, as a customer runs it: ``loraplex --url URL`` with a tenant key.

Each command is the real ``loraplex`` executable in a subprocess, talking HTTP to the
session's live gateway (``loraplex serve`` with its vLLM engine) with a tenant key from
the environment (``LORAPLEX_API_KEY``) or ``--api-key``. Every output is checked not to
hold the key.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from registry import Registry
from tests.e2e.conftest import TenantKeys, make_tenant
from tests.e2e.serving import LOADER, REPO, ServeProcess
from tests.registry.registry_testdata import build_adapter

ADAPTER = "cli-bot"
TRAIN = "".join(
    json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n" for i in range(8)
)


@dataclass
class Customer:
    """``loraplex --url <gateway> ARGV`` with a tenant key in ``LORAPLEX_API_KEY``."""

    url: str
    key: str

    def command(self, *argv: str, key: str | None = None) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
        env["LORAPLEX_API_KEY"] = self.key if key is None else key
        return [str(LOADER), "--url", self.url, *argv], env

    def run(self, *argv: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        command, env = self.command(*argv, key=key)
        done = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180
        )
        for used in {self.key, key or self.key}:
            assert used not in done.stdout + done.stderr, f"the key was printed by {argv}"
        return done

    def ok(self, *argv: str) -> str:
        done = self.run(*argv)
        assert done.returncode == 0, f"loraplex {' '.join(argv)}:\n{done.stderr}"
        return done.stdout

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv, "--json"))


@pytest.fixture(scope="module")
def tenant(registry: Registry) -> TenantKeys:
    return make_tenant(registry, "cli-customer")


@pytest.fixture(scope="module")
def customer(gateway: ServeProcess, tenant: TenantKeys) -> Customer:
    return Customer(gateway.url, tenant.key)


@pytest.fixture(scope="module")
def adapters(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("customer-cli")
    return [build_adapter(demo_base, root / f"v{seed}", seed=seed, r=8) for seed in (31, 32)]


def test_adapters_push_list_show_gates_evals_promote_canary_rollback_retire(
    customer: Customer, adapters: list[Path], base_name: str, gateway: ServeProcess
) -> None:
    pushed = customer.run(
        "adapters", "push", str(adapters[0]), "--name", ADAPTER, "--base", base_name
    )
    assert pushed.returncode == 0, pushed.stderr
    assert f"{ADAPTER}: pushed version 1" in pushed.stdout
    assert f"push {ADAPTER}" in pushed.stderr and "100%" in pushed.stderr, "a progress bar"
    second = customer.json(
        "adapters", "push", str(adapters[1]), "--name", ADAPTER, "--base", base_name
    )
    assert (second["object"], second["version"]) == ("adapter.version", 2)
    assert ADAPTER in customer.ok("adapters", "list").splitlines()[1]
    assert [a["id"] for a in customer.json("adapters", "list")] == [ADAPTER]

    customer.ok("adapters", "gates", "set", ADAPTER, "--gate", "qa:accuracy,min_value=0.8")
    gates = customer.json("adapters", "gates", "show", ADAPTER)
    assert [(g["suite"], g["metric"], g["min_value"]) for g in gates] == [("qa", "accuracy", 0.8)]
    refused = customer.run("adapters", "promote", ADAPTER, "1")
    assert refused.returncode == 1 and "promotion refused by gates" in refused.stderr
    assert "what to do:" in refused.stderr
    for version in ("1", "2"):
        customer.ok("adapters", "evals", "add", ADAPTER, version, "--suite", "qa",
                    "--metric", "accuracy", "--value", "0.9")  # fmt: skip
    table = customer.json("adapters", "evals", "list", ADAPTER)
    assert [(v["version"], v["evals"][0]["value"]) for v in table] == [(1, 0.9), (2, 0.9)]
    assert "accuracy" in customer.ok("adapters", "evals", "list", ADAPTER, "--version", "1")

    assert "production -> version 1" in customer.ok("adapters", "promote", ADAPTER, "1")
    _served(gateway, customer.key)
    customer.ok("adapters", "canary", ADAPTER, "2", "--weight", "0.2")
    shown = customer.json("adapters", "show", ADAPTER)
    assert shown["aliases"]["canary"]["version"] == 2
    assert "canary" in customer.ok("adapters", "show", ADAPTER)
    assert "canary cleared" in customer.ok("adapters", "canary", ADAPTER, "--clear")
    customer.ok("adapters", "promote", ADAPTER, "2")
    assert "rolled back to version 1" in customer.ok("adapters", "rollback", ADAPTER)
    assert customer.json("adapters", "retire", ADAPTER, "2")["state"] == "retired"
    versions = customer.json("adapters", "versions", ADAPTER)
    assert [(v["version"], v["state"]) for v in versions] == [(1, "active"), (2, "retired")]
    assert "retired" in customer.ok("adapters", "versions", ADAPTER)


def _served(gateway: ServeProcess, key: str) -> None:
    """The promoted adapter answers on the engine under its name."""
    client = OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    answer = client.completions.create(model=ADAPTER, prompt="Hello", max_tokens=2)
    assert answer.model == ADAPTER


def test_files_and_jobs_create_list_checkpoints_follow_cancel(
    customer: Customer, base_name: str, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(TRAIN)
    uploaded = customer.json("files", "upload", str(data))
    assert (uploaded["filename"], uploaded["line_count"]) == ("train.jsonl", 8)
    assert uploaded["id"] in customer.ok("files", "list")
    assert [f["id"] for f in customer.json("files", "list")] == [uploaded["id"]]
    job = customer.json("jobs", "create", "--model", base_name, "--training-file",
                        uploaded["id"], "--suffix", "cli-tuned", "-p", "n_epochs=1")  # fmt: skip
    assert (job["status"], job["adapter_name"]) == ("queued", "cli-tuned")
    assert job["id"] in customer.ok("jobs", "list")
    assert [j["id"] for j in customer.json("jobs", "list", job["id"])] == [job["id"]]
    assert customer.json("jobs", "checkpoints", job["id"]) == []
    assert customer.ok("jobs", "checkpoints", job["id"]).split() == [
        "ID",
        "STEP",
        "CHECKPOINT",
        "METRICS",
    ]

    command, env = customer.command("jobs", "follow", job["id"], "--poll-interval", "0.5")
    follow = subprocess.Popen(
        command, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()  # the queued job's events come before it ends
        assert first.strip(), "jobs follow prints events while the job is still queued"
        assert follow.poll() is None
        assert "cancelled" in customer.ok("jobs", "cancel", job["id"])
        rest, err = follow.communicate(timeout=120)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 1, "a job that did not succeed: exit 1"
    assert "Job cancelled" in rest and f"{job['id']}: cancelled" in err
    events = customer.json("jobs", "events", job["id"])
    assert events[-1]["message"] == "Job cancelled"
    assert customer.key not in first + rest + err


def test_usage_table_and_json(customer: Customer) -> None:
    report = customer.json("usage")
    assert report["object"] == "list" and set(report) >= {"since", "until", "totals"}
    assert customer.ok("usage").splitlines()[-1].startswith("total")
    assert customer.ok("usage", "--csv").startswith("tenant,day,adapter")


def test_a_bad_key_or_url_says_what_to_do_and_never_prints_the_key(
    customer: Customer, tenant: TenantKeys
) -> None:
    wrong = "lpx-" + "x" * 40
    refused = customer.run("adapters", "list", key=wrong)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "Incorrect or revoked API key" in refused.stderr
    assert "check LORAPLEX_API_KEY" in refused.stderr and wrong not in refused.stderr
    flag = customer.run("--api-key", wrong, "adapters", "list", key="")
    assert flag.returncode == 1 and "check LORAPLEX_API_KEY" in flag.stderr
    assert wrong not in flag.stdout + flag.stderr
    missing = customer.run("adapters", "list", key="")
    assert missing.returncode == 2 and "LORAPLEX_API_KEY" in missing.stderr
    unknown = customer.run("adapters", "show", "no-such-adapter")
    assert unknown.returncode == 1 and "adapters list" in unknown.stderr
    down = Customer("http://127.0.0.1:9", tenant.key).run("jobs", "list")
    assert down.returncode == 1 and "check LORAPLEX_URL" in down.stderr
