"""Retraining policies (tenant routes): an adapter that retrains itself on its dataset.

``PUT /v1/fine_tuning/policies/{adapter}`` sets (creates or replaces) the adapter's
policy: its dataset, its trigger (``every_seconds`` and/or ``after_feedback`` new feedback
items on the adapter's stored completions), where training starts (``start_from``:
``production`` continues the production version's weights, ``scratch`` a fresh LoRA) and
the job template (``method``, ``seed``, ``hyperparameters``, ``json_schema``; no
``suffix``: a policy always trains into its adapter). ``GET`` shows it with its last run,
``DELETE`` removes it, ``POST .../run`` runs it now, and ``GET /v1/fine_tuning/policies``
lists them. Workers run due policies (``registry.retraining``); each run queues an
ordinary fine-tuning job. A foreign adapter is answered exactly like an unknown one.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import datetime as dt
from typing import Annotated, Any, Literal

import jsonschema
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from registry import Principal
from registry.retraining import (
    NamedPolicy,
    PolicySpec,
    RetrainingStore,
    RunOutcome,
    policy_settings,
)
from server.api.auth import require_tenant
from server.api.jobs_routes import Jobs, job_json
from server.errors import APIError
from training.config import ConfigError, TrainConfig
from training.hyperparameters import train_config
from training.schema import check_schema

routes = APIRouter(tags=["fine-tuning"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]


class PolicyBody(BaseModel):
    # Unknown fields (``suffix``, a misspelt trigger) are refused, not silently dropped.
    model_config = ConfigDict(extra="forbid")

    dataset: str
    every_seconds: int | None = None
    after_feedback: int | None = None
    start_from: Literal["production", "scratch"] = "production"
    method: Literal["supervised", "dpo"] = "supervised"
    seed: int = 0
    hyperparameters: dict[str, Any] | None = None
    json_schema: dict[str, Any] | None = None
    enabled: bool = True


def _tenant_id(principal: Principal) -> int:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return principal.tenant_id


def _unix(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    return int((value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp())


def policy_json(policy: NamedPolicy) -> dict[str, Any]:
    row = policy.row
    last_version = policy.last_dataset_version
    return {
        "object": "fine_tuning.policy",
        "adapter": policy.adapter,
        "dataset": policy.dataset,
        **policy_settings(row),
        "json_schema": row.json_schema,
        "next_run_at": _unix(row.next_run_at),
        "last_run_at": _unix(row.last_run_at),
        "last_job": row.last_job,
        "last_dataset_version": None
        if last_version is None
        else {"dataset": policy.dataset, "version": last_version},
        "last_outcome": row.last_outcome or None,
        "created_at": _unix(row.created_at),
        "updated_at": _unix(row.updated_at),
    }


def _spec(body: PolicyBody) -> PolicySpec:
    """The policy as the registry takes it, its job template checked as a job's would be."""
    hyperparameters = dict(body.hyperparameters or {})
    try:
        train_config(TrainConfig(), body.method, body.seed, hyperparameters)
    except ConfigError as exc:
        raise APIError(
            400, str(exc), code="invalid_hyperparameters", param="hyperparameters"
        ) from exc
    if body.json_schema is not None:
        try:
            check_schema(body.json_schema)
        except jsonschema.SchemaError as exc:
            raise APIError(
                400, f"json_schema is not a valid JSON schema: {exc.message}", param="json_schema"
            ) from exc
    return PolicySpec(
        dataset=body.dataset,
        every_seconds=body.every_seconds,
        after_feedback=body.after_feedback,
        start_from=body.start_from,
        method=body.method,
        seed=body.seed,
        hyperparameters=hyperparameters,
        json_schema=body.json_schema,
        enabled=body.enabled,
    )


def _store(jobs: Jobs) -> RetrainingStore:
    return RetrainingStore(jobs)


Policies = Annotated[RetrainingStore, Depends(_store)]


@routes.get("/v1/fine_tuning/policies")
def list_policies(principal: TenantPrincipal, store: Policies) -> dict[str, Any]:
    items = [policy_json(p) for p in store.list_policies(_tenant_id(principal))]
    return {"object": "list", "data": items, "has_more": False}


@routes.put("/v1/fine_tuning/policies/{adapter}")
def set_policy(
    adapter: str, body: PolicyBody, principal: TenantPrincipal, store: Policies
) -> dict[str, Any]:
    spec = _spec(body)
    return policy_json(store.set_policy(_tenant_id(principal), adapter, spec, principal.actor))


@routes.get("/v1/fine_tuning/policies/{adapter}")
def get_policy(adapter: str, principal: TenantPrincipal, store: Policies) -> dict[str, Any]:
    return policy_json(store.get_policy(_tenant_id(principal), adapter))


@routes.delete("/v1/fine_tuning/policies/{adapter}")
def delete_policy(adapter: str, principal: TenantPrincipal, store: Policies) -> dict[str, Any]:
    store.delete_policy(_tenant_id(principal), adapter, principal.actor)
    return {"object": "fine_tuning.policy.deleted", "adapter": adapter, "deleted": True}


def run_json(outcome: RunOutcome, request: Request) -> dict[str, Any]:
    job = None if outcome.job is None else job_json(outcome.job, request.app.state.registry)
    return {"object": "fine_tuning.policy.run", "queued": job is not None,
            "message": outcome.message, "job": job}  # fmt: skip


@routes.post("/v1/fine_tuning/policies/{adapter}/run")
def run_policy(
    adapter: str, request: Request, principal: TenantPrincipal, store: Policies
) -> dict[str, Any]:
    """Run the policy now, whatever its trigger says (a skip still says why)."""
    policy = store.claim_now(_tenant_id(principal), adapter)
    return run_json(store.run_claimed(policy), request)
