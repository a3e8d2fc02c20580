"""schemathesis against the gateway's own OpenAPI spec, with a tenant key and an admin key.

Every operation in ``/openapi.json`` gets generated requests that fit its schema
(positive) and that break it (negative). Each answer must be a non-5xx, and
each error must be OpenAI's ``{"error": {"message", "type", "param", "code"}}``
with a precise message.

The fuzzed gateway is a second ``loraplex serve`` in front of the session's real
vLLM engine, with a registry of its own: admin fuzzing creates tenants, sets
limits and revokes keys at random, which must not reach the other tests'
tenants. Inference cases that name the base model do reach the engine; their
``max_tokens`` is cut to a few tokens so 1,000+ cases fit in CI's time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from registry import ADMIN_SCOPE, LocalBlobStore, Registry
from tests import reliability
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import error_shape_problem, gateway_on_engine
from tests.e2e.serving import ServeProcess

pytestmark = pytest.mark.reliability

SEED = int(os.environ.get("LORAPLEX_FUZZ_SEED", "20261123"))
"""Fixed by default so CI is reproducible; set LORAPLEX_FUZZ_SEED to explore further."""
USABLE_EXAMPLES = 24
"""Generated cases per operation and mode on routes the key may use."""
REFUSED_EXAMPLES = 4
"""...and on routes it may not (each must be a clean 403)."""
FUZZ_MAX_TOKENS = 4
"""Cap on generated ``max_tokens`` for cases that reach the engine (time, not coverage)."""
INFERENCE = ("/v1/completions", "/v1/chat/completions")
NEVER_FUZZED = ("/healthz", "/readyz", "/metrics", "/openapi.json")


@dataclass(frozen=True)
class FuzzTarget:
    serve: ServeProcess
    tenant: TenantKeys
    admin_key: str
    protected_key_ids: frozenset[int]
    base_name: str


@pytest.fixture(scope="module")
def fuzz_target(
    gateway: ServeProcess,
    demo_base: Path,
    engine_port: int,
    engine_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FuzzTarget]:
    home = tmp_path_factory.mktemp("fuzz")
    serve = gateway_on_engine(home, engine_port, engine_key, ["--base-model", str(demo_base)], {})
    registry = None
    try:
        serve.wait_ready(timeout=120)
        registry = Registry(
            f"sqlite:///{serve.home / 'registry.db'}", LocalBlobStore(serve.home / "blobs")
        )
        tenant = make_tenant(registry, "fuzzed")
        admin, admin_key = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR)
        protected = frozenset(k.id for k in registry.list_api_keys(None) if k.id is not None)
        assert admin.id in protected
        yield FuzzTarget(serve, tenant, admin_key, protected, demo_base.name)
    finally:
        if registry is not None:
            registry.close()
        assert serve.stop(), serve.log_tail()


@dataclass
class Tally:
    """What a fuzzing run sent and what came back wrong (grouped: one line per kind)."""

    cases: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    server_errors: dict[str, list[str]] = field(default_factory=dict)
    bad_errors: dict[str, list[str]] = field(default_factory=dict)
    engine_cases: int = 0
    """Inference cases the engine answered (200)."""

    def add(self, case: Case, response: requests.Response) -> None:
        self.cases += 1
        self.by_status[response.status_code] = self.by_status.get(response.status_code, 0) + 1
        if case.path in INFERENCE and response.status_code == 200:
            self.engine_cases += 1
        where = f"{case.method} {case.path} -> {response.status_code}"
        if response.status_code >= 500:
            found = self.server_errors.setdefault(where, [])
            found.append(f"{response.text[:300]}\n    {_curl(case)}")
        elif response.status_code >= 400:
            problem = error_shape_problem(response)
            if problem:
                self.bad_errors.setdefault(f"{where}: {problem}", []).append(_curl(case))

    @property
    def server_error_count(self) -> int:
        return sum(map(len, self.server_errors.values()))

    @property
    def bad_error_count(self) -> int:
        return sum(map(len, self.bad_errors.values()))


def _curl(case: Case) -> str:
    try:
        return case.as_curl_command(headers={"Authorization": "Bearer <key>"})[:600]
    except Exception as exc:  # the report must not hide the finding it describes
        return f"(no curl: {exc})"


def _steer(target: FuzzTarget, tally: Tally) -> Callable[[Case], None]:
    """Case edits before sending: half the valid inference bodies name the real base
    (so the engine answers), with a small ``max_tokens``; the fuzzer's own keys stay valid."""

    def steer(case: Case) -> None:
        params = case.path_parameters or {}
        if isinstance(params.get("key_id"), int) and params["key_id"] in target.protected_key_ids:
            params["key_id"] = 10**9  # revoking the fuzzer's own key would end the run early
        body = case.body
        if case.path not in INFERENCE or not isinstance(body, dict):
            return
        if case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE:
            if tally.cases % 2 == 0:
                body["model"] = target.base_name
            for name in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(name), int) and body[name] > FUZZ_MAX_TOKENS:
                    body[name] = FUZZ_MAX_TOKENS
            if "max_tokens" not in body and "max_completion_tokens" not in body:
                body["max_tokens"] = FUZZ_MAX_TOKENS

    return steer


def fuzz(target: FuzzTarget, key: str, usable: Callable[[str], bool]) -> Tally:
    """Run every operation of the live spec, positive and negative, with ``key``."""
    schema = schemathesis.openapi.from_url(target.serve.url + "/openapi.json")
    tally = Tally()
    steer = _steer(target, tally)
    headers = {"Authorization": f"Bearer {key}"}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path in NEVER_FUZZED:
                continue
            examples = USABLE_EXAMPLES if usable(operation.path) else REFUSED_EXAMPLES
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @seed(SEED)
                @settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def one(case: Case) -> None:
                    steer(case)
                    tally.add(case, case.call(session=session, headers=headers, timeout=60))

                # Unsatisfiable: nothing to break (no parameters, no body); positive cases cover it.
                with contextlib.suppress(Unsatisfiable):
                    one()
    return tally


def _report(name: str, tally: Tally, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        statuses = json.dumps(dict(sorted(tally.by_status.items())))
        print(
            f"\n[fuzz {name}] {tally.cases} cases ({tally.engine_cases} answered by the engine), "
            f"seed {SEED}, statuses {statuses}"
        )
        for kind, found in (tally.server_errors | tally.bad_errors).items():
            print(f"  {len(found)} x {kind}\n    e.g. {found[0]}")


def _is_admin_route(path: str) -> bool:
    return path.startswith("/admin")


def _record_and_check(name: str, tally: Tally) -> None:
    reliability.record("fuzzing", f"schemathesis, {name}", tally.cases, "cases",
                       tally.server_error_count, "server errors")  # fmt: skip
    reliability.record("fuzzing", f"error bodies, {name}", tally.cases, "cases",
                       tally.bad_error_count, "non-OpenAI or vague errors")  # fmt: skip
    assert tally.cases >= 1000
    assert not tally.server_errors, sorted(tally.server_errors)
    assert not tally.bad_errors, sorted(tally.bad_errors)


def test_fuzz_with_a_tenant_key(
    fuzz_target: FuzzTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = fuzz(fuzz_target, fuzz_target.tenant.key, lambda p: not _is_admin_route(p))
    _report("tenant key", tally, capsys)
    assert tally.engine_cases > 0
    _record_and_check("tenant key", tally)


def test_fuzz_with_an_admin_key(
    fuzz_target: FuzzTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = fuzz(fuzz_target, fuzz_target.admin_key, _is_admin_route)
    _report("admin key", tally, capsys)
    _record_and_check("admin key", tally)
