"""Cross-tenant isolation probes on the live gateway (real vLLM engine, real registry).

Two tenants, ``initech`` (the prober) and ``umbrella`` (the target), each with
adapters, and with one adapter name both use. Every way ``initech`` could reach
``umbrella``'s adapters, files, jobs, events, checkpoints, stored completions, feedback,
usage or listings is tried: names and their variants, forged tenant headers, registry
routes, keys of the wrong kind, missing, malformed and revoked keys. Names that could
point at another tenant's adapter must get exactly the body of a name nobody owns.

The name probes in tests/e2e/test_tenancy.py (retired versions, the first
variants) are not repeated here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import ADMIN_SCOPE, AdapterVersion, Registry
from registry.captures import (
    CaptureSettings,
    CaptureStore,
    CompletionQuery,
    FeedbackInput,
    FeedbackQuery,
)
from registry.jobs import JobStore
from server.errors import model_not_found
from tests import reliability
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import Probes
from tests.e2e.serving import ServeProcess
from tests.e2e.test_tenancy import peft_greedy
from tests.registry.registry_testdata import build_adapter
from tests.training.training_testdata import fixed_answer_records, jsonl

pytestmark = pytest.mark.reliability

UNKNOWN = "never-made-bot"
"""An adapter name no tenant has: foreign names must be answered exactly like it."""
PROMPT, TWIN_TOKENS = "hi", 8
"""The completions prompt of every probe, and how many tokens the twins answer with."""
FORGED_HEADERS = ("x-tenant", "x-tenant-id", "x-loraplex-tenant", "openai-organization",
                  "openai-project", "x-forwarded-user")  # fmt: skip


@dataclass(frozen=True)
class World:
    prober: TenantKeys
    target: TenantKeys
    own: AdapterVersion
    """The prober's adapter ``desk-bot`` v1 (production)."""
    foreign: list[AdapterVersion]
    """The target's ``vault-bot`` v1 (production) and v2 (canary)."""
    twins: dict[str, AdapterVersion]
    """``twin`` v1 of each tenant, by tenant name; the target's also has a v2 canary."""
    twin_answers: dict[str, str]
    """What PEFT answers to ``PROMPT`` with each tenant's ``twin`` v1, by tenant name."""
    target_file: str
    target_job: str
    target_completion: str
    """A chat completion the target stored (its capture is on), with feedback on it."""
    admin_key: str


@pytest.fixture(scope="module")
def world(
    gateway: ServeProcess,
    registry: Registry,
    demo_base: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    prober, target = make_tenant(registry, "initech"), make_tenant(registry, "umbrella")
    root = tmp_path_factory.mktemp("isolation")

    def push(tenant: TenantKeys, name: str, seed: int) -> AdapterVersion:
        path = build_adapter(demo_base, root / f"{tenant.name}-{name}-{seed}", seed=seed, r=8)
        return registry.push_adapter(tenant.tenant_id, name, path, demo_base.name, OPERATOR)

    own = push(prober, "desk-bot", 41)
    foreign = [push(target, "vault-bot", 42), push(target, "vault-bot", 43)]
    twins = {prober.name: push(prober, "twin", 44), target.name: push(target, "twin", 46)}
    canary_twin = push(target, "twin", 45)
    twin_answers = {
        name: peft_greedy(demo_base, root / f"{name}-twin-{seed}", PROMPT, TWIN_TOKENS)
        for name, seed in ((prober.name, 44), (target.name, 46))
    }
    # Two seeds can give the same few greedy tokens on a small base: the test below could
    # then not tell the tenants' adapters apart, so the fixture refuses such a pair.
    assert len(set(twin_answers.values())) == 2, f"pick other twin seeds: {twin_answers}"
    for tenant, name in [(prober, "desk-bot"), (target, "vault-bot"), (prober, "twin"),
                         (target, "twin")]:  # fmt: skip
        registry.promote(tenant.tenant_id, name, 1, OPERATOR)
    registry.canary(target.tenant_id, "vault-bot", 2, 0.5, OPERATOR)
    registry.canary(target.tenant_id, "twin", canary_twin.number, 0.5, OPERATOR)
    file_id, job_id = _target_job(gateway, target, demo_base.name)
    store = JobStore(registry)
    store.add_event(job_id, "step 1", data={"step": 1, "train_loss": 1.0})
    store.add_checkpoint(job_id, 1, {"train_loss": 1.0})
    _, admin_key = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR)
    CaptureStore(registry).set_settings(target.tenant_id, CaptureSettings(enabled=True), OPERATOR)
    time.sleep(1.0)  # past the gateway's registry cache
    completion_id = _target_completion(gateway, target, registry)
    return World(
        prober, target, own, foreign, twins, twin_answers, file_id, job_id, completion_id, admin_key
    )


def _target_job(gateway: ServeProcess, target: TenantKeys, base_name: str) -> tuple[str, str]:
    """A training file and a queued job of the target, made through the API."""
    auth = _auth(target.key)
    uploaded = httpx.post(
        gateway.url + "/v1/files",
        files={"file": ("train.jsonl", jsonl(fixed_answer_records(5)))},
        data={"purpose": "fine-tune"},
        headers=auth,
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    job = httpx.post(
        gateway.url + "/v1/fine_tuning/jobs",
        json={"model": base_name, "training_file": file_id, "suffix": "vault-tuned"},
        headers=auth,
        timeout=30,
    )
    assert job.status_code == 200, job.text
    return file_id, job.json()["id"]


def _target_completion(gateway: ServeProcess, target: TenantKeys, registry: Registry) -> str:
    """A chat completion the target stored, with metadata and feedback; once it is written."""
    body = {"model": "vault-bot", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "store": True, "metadata": {"vault": "secret"}}  # fmt: skip
    answer = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers=_auth(target.key), timeout=60
    )
    assert answer.status_code == 200, answer.text
    completion_id: str = answer.json()["id"]
    store, deadline = CaptureStore(registry), time.monotonic() + 30
    while not store.list_completions(target.tenant_id, CompletionQuery()):
        assert time.monotonic() < deadline, "the target's completion was not stored"
        time.sleep(0.2)
    store.add_feedback(target.tenant_id, completion_id, FeedbackInput(thumbs="up"))
    return completion_id


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def http(gateway: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def _finish(check: str, probes: Probes) -> None:
    reliability.record("isolation", check, probes.tried, "probes", len(probes.leaks), "leaks")
    assert probes.leaks == []


def _foreign_names(world: World) -> list[str]:
    """Strings that name, or look like, the target's adapters; none is the prober's."""
    v1, v2 = world.foreign
    engine = v1.lora_name
    return [
        "vault-bot", "vault-bot@1", "vault-bot@2", "vault-bot:production", "vault-bot:canary",
        v2.lora_name, engine.upper(), "LX-" + engine[3:], engine + "@1",
        engine + ":production", world.twins[world.target.name].lora_name,
        "twin@2", "twin@3", "twin:canary",  # the target's twin has them, the prober's does not
        "VAULT-BOT", "Vault-Bot@1", "\tvault-bot", "vault-bot\n", "vault-bot@1 ",
        "vault\u200bbot", "v\u0430ult-bot", "\uff56\uff41\uff55\uff4c\uff54-bot",
        "vault-bot\u0000", "vault_bot", "vault-bot@01", "vault-bot@+1", "vault-bot@1.0",
        "vault-bot@0", "vault-bot@-1", "vault-bot@", "vault-bot:", "umbrella/vault-bot",
        f"{world.target.tenant_id}/vault-bot", "umbrella:vault-bot", "vault-bot@umbrella",
        "../vault-bot", "vault-*", "*", "vault-bot%401",
    ]  # fmt: skip


def _post_model(
    http: httpx.Client, key: str, path: str, model: str, **extra: Any
) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "max_tokens": 2, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = PROMPT
    return http.post(path, json=body, headers=_auth(key))


def test_foreign_names_and_variants_are_answered_like_an_unknown_name(
    world: World, http: httpx.Client
) -> None:
    probes = Probes()
    key = world.prober.key
    for name in [*_foreign_names(world), UNKNOWN]:
        for path in ("/v1/completions", "/v1/chat/completions"):
            reply = _post_model(http, key, path, name)
            same = reply.status_code == 404 and reply.json() == model_not_found(name).body()
            hinted = any(h.startswith("x-loraplex") for h in reply.headers)
            probes.check(same and not hinted, f"{path} {name!r}: {reply.status_code} {reply.text}")
    streamed = _post_model(http, key, "/v1/completions", "vault-bot", stream=True)
    probes.check(
        streamed.status_code == 404 and streamed.json() == model_not_found("vault-bot").body(),
        f"streamed request for a foreign name: {streamed.status_code} {streamed.text[:200]}",
    )
    _finish("foreign adapter names and look-alikes (both inference routes)", probes)


def test_a_name_both_tenants_use_serves_each_its_own(world: World, http: httpx.Client) -> None:
    probes = Probes()
    texts = {}
    for tenant in (world.prober, world.target):
        pinned = _post_model(
            http, tenant.key, "/v1/completions", "twin@1", temperature=0, max_tokens=TWIN_TOKENS
        )
        texts[tenant.name] = pinned.json()["choices"][0]["text"]
        for _ in range(4):  # the target's canary split never sends the prober to its v2
            reply = _post_model(http, tenant.key, "/v1/completions", "twin", max_tokens=1)
            probes.check(reply.status_code == 200, f"{tenant.name} twin: {reply.text[:200]}")
            if tenant is world.prober:
                route = reply.headers.get("x-loraplex-route")
                probes.check(route == "production", f"prober's twin went to {route}")
    probes.check(texts == world.twin_answers, f"served {texts}, PEFT {world.twin_answers}")
    _finish("one adapter name in two tenants", probes)


def _same_as_unknown(
    probes: Probes, http: httpx.Client, key: str, method: str, path: str, **kwargs: Any
) -> None:
    """``path`` (with ``{}`` for an adapter name) says the same for vault-bot and UNKNOWN."""
    foreign = http.request(method, path.format("vault-bot"), headers=_auth(key), **kwargs)
    unknown = http.request(method, path.format(UNKNOWN), headers=_auth(key), **kwargs)
    probes.error(foreign, 404, f"{method} {path}")
    probes.check(
        foreign.text.replace("vault-bot", UNKNOWN) == unknown.text,
        f"{method} {path}: {foreign.text[:200]} differs from {unknown.text[:200]}",
    )


def test_registry_routes_on_a_foreign_adapter_say_unknown_and_change_nothing(
    world: World, http: httpx.Client, registry: Registry
) -> None:
    probes = Probes()
    key = world.prober.key
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/adapters/{}", {}),
        ("GET", "/v1/adapters/{}/versions", {}),
        ("GET", "/v1/adapters/{}/versions/1/evals", {}),
        ("GET", "/v1/adapters/{}/gates", {}),
        ("POST", "/v1/adapters/{}/promote", {"json": {"version": 2, "override": True}}),
        ("POST", "/v1/adapters/{}/canary", {"json": {"version": 1, "weight": 1.0}}),
        ("DELETE", "/v1/adapters/{}/canary", {}),
        ("POST", "/v1/adapters/{}/rollback", {}),
        ("POST", "/v1/adapters/{}/versions/1/retire", {}),
        ("POST", "/v1/adapters/{}/versions/2/archive", {}),
        ("POST", "/v1/adapters/{}/versions/1/evals",
         {"json": {"suite": "s", "metric": "m", "value": 1.0}}),
        ("PUT", "/v1/adapters/{}/gates", {"json": {"gates": []}}),
    ]  # fmt: skip
    for method, path, kwargs in calls:
        _same_as_unknown(probes, http, key, method, path, **kwargs)
    listed = http.get("/v1/adapters", headers=_auth(key)).json()
    probes.check({a["id"] for a in listed["data"]} == {"desk-bot", "twin"}, f"listing {listed}")
    aliases = registry.aliases(world.target.tenant_id, "vault-bot")
    probes.check(
        (aliases["production"].version, aliases["canary"].version) == (1, 2), f"aliases {aliases}"
    )
    states = [v.state for v in registry.list_versions(world.target.tenant_id, "vault-bot")]
    probes.check(states == ["active", "active"], f"target's versions now {states}")
    _finish("registry routes on another tenant's adapter", probes)


def _same_as_unknown_id(
    probes: Probes, http: httpx.Client, key: str, ids: tuple[str, str], call: tuple[str, str, Any]
) -> None:
    """``call`` (``{}`` in its path or body for an id) says the same for both ``ids``."""
    method, path, body = call
    replies = []
    for some_id in ids:
        json_body = {k: _with_id(v, some_id) for k, v in body.items()} if body else None
        replies.append(
            http.request(method, path.format(some_id), json=json_body, headers=_auth(key))
        )
    foreign, unknown = replies
    probes.error(foreign, 404, f"{method} {path} on the target's {ids[0]}")
    probes.check(
        foreign.text.replace(*ids) == unknown.text,
        f"{method} {path}: {foreign.text[:200]} differs from {unknown.text[:200]}",
    )


def _with_id(value: Any, some_id: str) -> Any:
    return value.format(some_id) if isinstance(value, str) else value


def test_foreign_files_jobs_events_and_checkpoints_say_unknown(
    world: World, http: httpx.Client, base_name: str, registry: Registry
) -> None:
    probes = Probes()
    key = world.prober.key
    fake_file = "file-" + "0" * (len(world.target_file) - 5)
    fake_job = "ftjob-" + "0" * (len(world.target_job) - 6)
    file_calls = [
        ("GET", "/v1/files/{}", None),
        ("POST", "/v1/fine_tuning/jobs", {"model": base_name, "training_file": "{}"}),
    ]
    own_file = http.post(
        "/v1/files",
        files={"file": ("t.jsonl", jsonl(fixed_answer_records(5)))},
        data={"purpose": "fine-tune"},
        headers=_auth(key),
    ).json()["id"]
    with_validation = {"model": base_name, "training_file": own_file, "validation_file": "{}"}
    file_calls.append(("POST", "/v1/fine_tuning/jobs", with_validation))
    for call in file_calls:
        _same_as_unknown_id(probes, http, key, (world.target_file, fake_file), call)
    for call in [
        ("GET", "/v1/fine_tuning/jobs/{}", None),
        ("POST", "/v1/fine_tuning/jobs/{}/cancel", None),
        ("POST", "/v1/fine_tuning/jobs/{}/pause", None),
        ("POST", "/v1/fine_tuning/jobs/{}/resume", None),
        ("GET", "/v1/fine_tuning/jobs/{}/events", None),
        ("GET", "/v1/fine_tuning/jobs/{}/events?after=ftevent-1000", None),
        ("GET", "/v1/fine_tuning/jobs/{}/checkpoints", None),
    ]:
        _same_as_unknown_id(probes, http, key, (world.target_job, fake_job), call)
    files = http.get("/v1/files", headers=_auth(key)).json()["data"]
    probes.check([f["id"] for f in files] == [own_file], f"prober's files {files}")
    jobs = http.get("/v1/fine_tuning/jobs", headers=_auth(key)).json()["data"]
    probes.check(jobs == [], f"prober's jobs {jobs}")
    status = JobStore(registry).get_job(world.target.tenant_id, world.target_job).status
    probes.check(status == "queued", f"the target's job is now {status}")
    _finish("another tenant's files, jobs, events and checkpoints", probes)


STORED_COMPLETION_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/v1/chat/completions/{0}", None),
    ("POST", "/v1/chat/completions/{0}", {"metadata": {"vault": "opened"}}),
    ("DELETE", "/v1/chat/completions/{0}", None),
    ("GET", "/v1/chat/completions/{0}/messages", None),
    ("GET", "/v1/chat/completions/{0}/messages?after={0}-0", None),
    ("POST", "/v1/chat/completions/{0}/feedback", {"thumbs": "down", "note": "{0}"}),
    ("GET", "/v1/chat/completions/{0}/feedback", None),
    ("GET", "/v1/chat/completions?after={0}", None),
    ("GET", "/v1/feedback?completion_id={0}", None),
    ("GET", "/v1/feedback/export?completion_id={0}", None),
]
"""Every route that takes a completion id (in its path, query or body)."""


def test_foreign_stored_completions_and_feedback_say_unknown(
    world: World, http: httpx.Client, registry: Registry
) -> None:
    probes = Probes()
    key, theirs = world.prober.key, world.target_completion
    fake = "chatcmpl-" + "0" * (len(theirs) - 9)
    for call in STORED_COMPLETION_CALLS:
        _same_as_unknown_id(probes, http, key, (theirs, fake), call)
    for path in ("/v1/chat/completions", "/v1/feedback", "/v1/feedback/export"):
        reply = http.get(path, headers=_auth(key))
        probes.check(reply.status_code == 200 and theirs not in reply.text, f"{path}: {reply.text}")
    store = CaptureStore(registry)
    kept = store.get(world.target.tenant_id, theirs).metadata_
    probes.check(kept == {"vault": "secret"}, f"the target's metadata is now {kept}")
    feedback = store.list_feedback(world.target.tenant_id, FeedbackQuery())
    probes.check([f.thumbs for f in feedback] == ["up"], f"the target's feedback is now {feedback}")
    _finish("another tenant's stored completions and feedback", probes)


def test_forged_tenant_headers_change_nothing(
    world: World, http: httpx.Client, base_name: str
) -> None:
    probes = Probes()
    target = world.target
    for header in FORGED_HEADERS:
        for value in (target.name, str(target.tenant_id), f"tenant-{target.tenant_id}"):
            headers = {**_auth(world.prober.key), header: value}
            body = {"model": "vault-bot", "prompt": "hi", "max_tokens": 1}
            reply = http.post("/v1/completions", headers=headers, json=body)
            probes.check(
                reply.status_code == 404 and reply.json() == model_not_found("vault-bot").body(),
                f"{header}: {value} -> {reply.status_code} {reply.text[:200]}",
            )
            models = {m["id"] for m in http.get("/v1/models", headers=headers).json()["data"]}
            probes.check(models == {base_name, "desk-bot", "twin"}, f"{header}: models {models}")
        adapters = http.get("/v1/adapters", headers={**_auth(world.prober.key), header: "2"})
        probes.check({a["id"] for a in adapters.json()["data"]} == {"desk-bot", "twin"}, header)
    two_keys = [("authorization", f"Bearer {k}") for k in (world.prober.key, target.key)]
    both = http.get("/v1/models", headers=two_keys)
    seen = {m["id"] for m in both.json().get("data", [])} if both.status_code == 200 else set()
    probes.check("vault-bot" not in seen, f"two Authorization headers listed {seen}")
    _finish("forged tenant headers", probes)


def test_models_and_usage_hold_only_the_callers_own(
    world: World, http: httpx.Client, base_name: str, registry: Registry
) -> None:
    probes = Probes()
    owners = [(world.prober, {"desk-bot", "twin"}), (world.target, {"vault-bot", "twin"})]
    for tenant, own in owners:
        for name in own:
            reply = _post_model(http, tenant.key, "/v1/completions", name, max_tokens=1)
            probes.check(reply.status_code == 200, f"{tenant.name} {name}: {reply.text[:200]}")
        models = {m["id"] for m in http.get("/v1/models", headers=_auth(tenant.key)).json()["data"]}
        probes.check(models == {base_name, *own}, f"{tenant.name} /v1/models: {models}")
    time.sleep(2.5)  # the gateway flushes usage once a second
    for tenant, own in owners:
        used = {u.adapter for u in registry.usage(tenant.tenant_id)}
        probes.check(own <= used <= {*own, base_name, ""}, f"{tenant.name} usage rows {used}")
    _finish("/v1/models and usage records per tenant", probes)


ADMIN_ROUTES = [
    ("GET", "/admin/tenants", None), ("POST", "/admin/tenants", {"name": "stolen"}),
    ("GET", "/admin/tenants/umbrella", None),
    ("PUT", "/admin/tenants/umbrella/limits", {"requests_per_minute": 1}),
    ("GET", "/admin/keys", None), ("POST", "/admin/keys", {"tenant": "umbrella"}),
    ("POST", "/admin/keys/1/revoke", None), ("GET", "/admin/bases", None),
    ("POST", "/admin/bases", {"path": "/", "name": "x"}),
    ("POST", "/admin/bases/x/deprecate", {"reason": "x"}), ("GET", "/admin/audit", None),
    ("GET", "/admin/tenants/umbrella/capture", None),
    ("PUT", "/admin/tenants/umbrella/capture", {"enabled": False}),
    ("GET", "/admin/tenants/umbrella/adapters", None),
    ("GET", "/admin/tenants/umbrella/adapters/vault-bot", None),
    ("POST", "/admin/tenants/umbrella/adapters/vault-bot/promote", {"version": 2}),
    ("POST", "/admin/tenants/umbrella/adapters/vault-bot/versions/1/retire", None),
]  # fmt: skip
TENANT_ROUTES = [
    ("POST", "/v1/completions", {"model": "vault-bot", "prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions",
     {"model": "vault-bot", "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/v1/models", None), ("GET", "/v1/adapters", None),
    ("GET", "/v1/adapters/vault-bot", None), ("GET", "/v1/files", None),
    ("GET", "/v1/fine_tuning/jobs", None), ("GET", "/v1/chat/completions", None),
    ("GET", "/v1/feedback", None),
]  # fmt: skip


def test_keys_reach_only_their_own_kind_of_route(world: World, http: httpx.Client) -> None:
    probes = Probes()
    for method, path, body in ADMIN_ROUTES:
        reply = http.request(method, path, json=body, headers=_auth(world.prober.key))
        probes.error(reply, 403, f"tenant key on {method} {path}")
    for method, path, body in TENANT_ROUTES:
        reply = http.request(method, path, json=body, headers=_auth(world.admin_key))
        probes.error(reply, 403, f"admin key on {method} {path}")
    still = http.get("/v1/models", headers=_auth(world.target.key))
    probes.check(still.status_code == 200 and "vault-bot" in still.text, "target's key broken")
    _finish("admin routes with tenant keys, tenant routes with admin keys", probes)


def test_missing_malformed_and_revoked_keys_get_401(
    world: World, http: httpx.Client, registry: Registry
) -> None:
    probes = Probes()
    doomed = make_tenant(registry, "revoked-co")
    assert http.get("/v1/models", headers=_auth(doomed.key)).status_code == 200  # cached now
    [record] = registry.list_api_keys(doomed.tenant_id)
    assert record.id is not None
    registry.revoke_api_key(record.id, OPERATOR)
    time.sleep(1.0)
    key = world.prober.key
    headers: list[dict[str, str]] = [
        {}, {"authorization": ""}, {"authorization": "Bearer"},
        {"authorization": f"Basic {key}"}, {"authorization": f"Token {key}"},
        {"authorization": key}, {"authorization": f"Bearer {key}x"},
        {"authorization": f"Bearer {key[:-1]}"}, {"authorization": f"Bearer {key.upper()}"},
        {"authorization": f"Bearer {key} {key}"},
        {"authorization": f"Bearer {world.target.key[:12]}"},
        {"x-api-key": key}, {"authorization": f"Bearer {doomed.key}"},
    ]  # fmt: skip
    for header in headers:
        for method, path, body in TENANT_ROUTES:
            reply = http.request(method, path, json=body, headers=header)
            probes.error(reply, 401, f"{header!r:.60} on {method} {path}")
    _finish("missing, malformed and revoked keys", probes)
