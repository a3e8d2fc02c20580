"""Routed models (``registry.routed_models``), a tenant's own, under ``/v1/routed_models``:

- ``POST /v1/routed_models`` ``{"name", "policy", "description"}``: a new routed model, its
  first version live at once (409 if the name is taken);
- ``GET /v1/routed_models``, ``GET /v1/routed_models/{name}`` (with its versions),
  ``DELETE /v1/routed_models/{name}``;
- ``POST /{name}/versions`` ``{"policy", "description", "promote"}``: the next version
  (live only when promoted: gates apply); ``GET /{name}/versions/{n}``;
- ``POST /{name}/versions/{n}/promote``, ``POST /{name}/rollback``;
- ``PUT /{name}/gates`` ``{"gates": [{"suite", "min_accuracy", "max_regression"}]}``;
- ``POST /{name}/versions/{n}/evals`` ``{"examples": [...]}`` or ``{"file_id"}`` (JSONL):
  each example a request (``messages`` or ``prompt``, with ``metadata`` and ``user``) and
  the ``expected`` target; its decisions are made as requests get them (the classifier
  asked on the engines), and the accuracy and confusion matrix are stored;
  ``GET /{name}/evals``: every version's, oldest first;
- ``POST /{name}/versions/{n}/replay`` ``{"limit"}``: the tenant's stored completions of
  the routed model decided again by version n and by the live version, side by side.

Policies are parsed by ``router.RoutingPolicy`` (a 400 lists every problem); the registry
checks that every name a policy uses is the tenant's own or a base's. Decisions need the
gateway's engines, reached through ``app.state.content_router`` (absent: 503).

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import json
from collections.abc import Sequence
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

import router
from registry import Principal
from registry.captures import CaptureStore, CompletionQuery
from registry.jobs import JobStore
from registry.routed_models import ROUTING_SUITE, RoutedModelStore, RoutedVersion, RoutingGate
from server.api.auth import registry_of, require_tenant
from server.errors import APIError

MAX_EXAMPLES = 1000
"""Examples one routing eval may hold."""
MAX_REPLAY = 1000
"""Stored completions one replay decides again, at most."""

routes = APIRouter(prefix="/v1/routed_models", tags=["routed models"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]


class Decider(Protocol):
    """What these routes use of the gateway's ``ContentRouter``."""

    async def evaluate(
        self,
        principal: Principal,
        tenant_name: str,
        name: str,
        version: int,
        policy: router.RoutingPolicy,
        texts: Sequence[router.RequestText],
    ) -> list[router.RoutingDecision]: ...


class NewRoutedModel(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    policy: dict[str, Any]
    description: str = Field(default="", max_length=4096)


class NewVersion(BaseModel):
    policy: dict[str, Any]
    description: str = Field(default="", max_length=4096)
    promote: bool = False
    """Make it live now (its gates apply)."""


class GateBody(BaseModel):
    suite: str = ROUTING_SUITE
    min_accuracy: float | None = None
    max_regression: float | None = None


class GatesBody(BaseModel):
    gates: list[GateBody] = Field(max_length=16)


class EvalBody(BaseModel):
    examples: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_EXAMPLES)
    """Requests (``messages`` or ``prompt``, ``metadata``, ``user``) with ``expected``."""
    file_id: str | None = None
    """An uploaded JSONL file of such examples, instead of ``examples``."""
    suite: str = ROUTING_SUITE


class ReplayBody(BaseModel):
    limit: int = Field(default=200, ge=1, le=MAX_REPLAY)
    """How many of the latest stored completions of the routed model to decide again."""


def _store(request: Request) -> RoutedModelStore:
    return RoutedModelStore(registry_of(request))


def _tenant(principal: Principal) -> int:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return principal.tenant_id


def _parsed(document: dict[str, Any]) -> router.RoutingPolicy:
    try:
        return router.RoutingPolicy.from_json(document)
    except router.InvalidRoutingPolicy as exc:
        raise APIError(400, str(exc), code="invalid_routing_policy", param="policy") from None


def _decider(request: Request) -> Decider:
    decider: Decider | None = getattr(request.app.state, "content_router", None)
    if decider is None:
        raise APIError(
            503,
            "Routing decisions need the gateway's engines; send this to a gateway.",
            code="no_gateway",
        )
    return decider


@routes.post("", status_code=201, summary="Create a routed model (its first version goes live)")
def create(request: Request, principal: TenantPrincipal, body: NewRoutedModel) -> dict[str, Any]:
    store, tenant_id = _store(request), _tenant(principal)
    policy = _parsed(body.policy)
    if any(m.name == body.name for m in store.list(tenant_id)):
        raise APIError(
            409,
            f"routed model {body.name!r} exists; add a version with "
            f"POST /v1/routed_models/{body.name}/versions",
            code="conflict",
        )
    version = store.save_version(
        tenant_id, body.name, policy.to_json(), policy.references(), principal.actor,
        body.description,
    )  # fmt: skip
    return version.to_json()


@routes.get("", summary="List routed models")
def list_routed(request: Request, principal: TenantPrincipal) -> dict[str, Any]:
    listed = _store(request).list(_tenant(principal))
    return {"object": "list", "data": [m.to_json() for m in listed]}


@routes.get("/{name}", summary="Show a routed model and its versions")
def show(request: Request, principal: TenantPrincipal, name: str) -> dict[str, Any]:
    store, tenant_id = _store(request), _tenant(principal)
    info = store.get(tenant_id, name)
    return {**info.to_json(), "data": [v.to_json() for v in store.versions(tenant_id, name)]}


@routes.delete("/{name}", status_code=204, summary="Delete a routed model (its name is freed)")
def delete(request: Request, principal: TenantPrincipal, name: str) -> None:
    _store(request).delete(_tenant(principal), name, principal.actor)


@routes.post("/{name}/versions", status_code=201, summary="Save a routed model's next version")
def add_version(
    request: Request, principal: TenantPrincipal, name: str, body: NewVersion
) -> dict[str, Any]:
    store, tenant_id = _store(request), _tenant(principal)
    policy = _parsed(body.policy)
    store.get(tenant_id, name)  # an unknown name is a 404 here, not a new routed model
    version = store.save_version(
        tenant_id, name, policy.to_json(), policy.references(), principal.actor, body.description
    )
    if body.promote and not version.live:
        version = store.promote(tenant_id, name, version.number, principal.actor)
    return version.to_json()


@routes.get("/{name}/versions/{number}", summary="Show one version of a routed model")
def show_version(
    request: Request, principal: TenantPrincipal, name: str, number: int
) -> dict[str, Any]:
    return _store(request).version(_tenant(principal), name, number).to_json()


@routes.post("/{name}/versions/{number}/promote", summary="Make a version live (gates apply)")
def promote(request: Request, principal: TenantPrincipal, name: str, number: int) -> dict[str, Any]:
    return _store(request).promote(_tenant(principal), name, number, principal.actor).to_json()


@routes.post("/{name}/rollback", summary="Make the previously live version live again")
def rollback(request: Request, principal: TenantPrincipal, name: str) -> dict[str, Any]:
    return _store(request).rollback(_tenant(principal), name, principal.actor).to_json()


@routes.put("/{name}/gates", summary="Set a routed model's promotion gates")
def set_gates(
    request: Request, principal: TenantPrincipal, name: str, body: GatesBody
) -> dict[str, Any]:
    gates = [RoutingGate(g.suite, g.min_accuracy, g.max_regression) for g in body.gates]
    saved = _store(request).set_gates(_tenant(principal), name, gates, principal.actor)
    return {"object": "list", "data": [g.to_json() for g in saved]}


@routes.get("/{name}/evals", summary="Routing evals of every version, oldest first")
def list_evals(request: Request, principal: TenantPrincipal, name: str) -> dict[str, Any]:
    evals = _store(request).evals(_tenant(principal), name)
    return {"object": "list", "data": [e.to_json() for e in evals]}


class _Deciding:
    """What an eval or a replay of the caller's routed model decides with: the registry's
    store and the gateway's ``ContentRouter``."""

    def __init__(self, request: Request, principal: Principal, name: str) -> None:
        self.request, self.principal, self.name = request, principal, name
        self.store, self.tenant_id = _store(request), _tenant(principal)
        self.decider = _decider(request)

    async def version(self, number: int) -> RoutedVersion:
        return await run_in_threadpool(self.store.version, self.tenant_id, self.name, number)

    async def decisions(
        self, number: int, document: dict[str, Any], texts: Sequence[router.RequestText]
    ) -> list[str]:
        """The target version ``number`` (its policy ``document``) chooses for each text."""
        registry = registry_of(self.request)
        tenant = await run_in_threadpool(registry.get_tenant, self.tenant_id)
        policy = router.RoutingPolicy.from_json(document)
        decided = await self.decider.evaluate(
            self.principal, tenant.name, self.name, number, policy, texts
        )
        return [d.target for d in decided]


@routes.post("/{name}/versions/{number}/evals", summary="Run and store a routing eval")
async def run_eval(
    request: Request, principal: TenantPrincipal, name: str, number: int, body: EvalBody
) -> dict[str, Any]:
    deciding = _Deciding(request, principal, name)
    version = await deciding.version(number)
    examples = body.examples
    if (examples is None) == (body.file_id is None):
        raise APIError(400, "give either examples or file_id", param="examples")
    if examples is None:
        assert body.file_id is not None
        examples = await run_in_threadpool(
            _file_examples, request, deciding.tenant_id, body.file_id
        )
    texts, expected = _examples(examples)
    chosen = await deciding.decisions(number, version.policy, texts)
    table = router.confusion(zip(expected, chosen, strict=True))
    recorded = await run_in_threadpool(
        deciding.store.record_eval, deciding.tenant_id, name, number, router.accuracy(table),
        len(texts), table, principal.actor, body.suite,
    )  # fmt: skip
    return recorded.to_json()


@routes.post("/{name}/versions/{number}/replay", summary="Decide stored traffic again")
async def replay(
    request: Request, principal: TenantPrincipal, name: str, number: int, body: ReplayBody
) -> dict[str, Any]:
    deciding = _Deciding(request, principal, name)
    candidate = await deciding.version(number)
    live = await run_in_threadpool(deciding.store.live, deciding.tenant_id, name)
    if live is None:
        raise APIError(409, f"routed model {name!r} has no live version to compare with")
    texts = await run_in_threadpool(_stored_requests, request, deciding.tenant_id, name, body.limit)
    live_targets = await deciding.decisions(live.version, live.policy, texts)
    candidate_targets = await deciding.decisions(number, candidate.policy, texts)
    # live target -> candidate target -> requests: off the diagonal is what would change
    changes = router.confusion(zip(live_targets, candidate_targets, strict=True))
    agreed = sum(row.get(target, 0) for target, row in changes.items())
    return {
        "object": "routed_model.replay",
        "routed_model": name,
        "version": number,
        "live_version": live.version,
        "requests": len(texts),
        "agreed": agreed,
        "agreement": agreed / len(texts) if texts else None,
        "changes": changes,
    }


def _examples(examples: list[dict[str, Any]]) -> tuple[list[router.RequestText], list[str]]:
    """The request texts and expected targets of eval examples; 400 naming a bad one."""
    if not examples:
        raise APIError(400, "a routing eval needs at least one example", param="examples")
    texts, expected = [], []
    for index, example in enumerate(examples):
        target = example.get("expected") if isinstance(example, dict) else None
        if not isinstance(target, str) or not target:
            raise APIError(
                400, f"examples[{index}] needs 'expected': the model name it should go to",
                param="examples",
            )  # fmt: skip
        if "messages" not in example and "prompt" not in example:
            raise APIError(400, f"examples[{index}] needs 'messages' or 'prompt'", param="examples")
        texts.append(router.RequestText.of(example))
        expected.append(target)
    return texts, expected


def _file_examples(request: Request, tenant_id: int, file_id: str) -> list[dict[str, Any]]:
    jobs = JobStore(registry_of(request))
    content = jobs.file_content(jobs.get_file(tenant_id, file_id))
    examples = []
    for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            examples.append(json.loads(line))
        except ValueError:
            problem = f"line {number} of file {file_id} is not JSON"
            raise APIError(400, problem, param="file_id") from None
        if len(examples) > MAX_EXAMPLES:
            raise APIError(400, f"at most {MAX_EXAMPLES} examples a routing eval", param="file_id")
    return examples


def _stored_requests(
    request: Request, tenant_id: int, name: str, limit: int
) -> list[router.RequestText]:
    """The request texts of the tenant's latest stored completions of routed model ``name``."""
    captures = CaptureStore(registry_of(request))
    texts: list[router.RequestText] = []
    after: str | None = None
    while len(texts) < limit:
        size = min(100, limit - len(texts))
        query = CompletionQuery(model=name, order="desc", limit=size, after=after)
        page = captures.list_completions(tenant_id, query)
        if not page:
            break
        texts += [router.RequestText.of(captures.bodies(record)[0]) for record in page]
        after = page[-1].completion_id
    return texts
