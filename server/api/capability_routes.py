"""Admin routes of a base's capability suites (``registry.capability``).

``PUT /admin/bases/{ref}/capability/{name}`` creates or replaces a suite from a JSON body
``{"examples": [{"prompt": ..., "answer": ...}, ...]}`` (1 to 200 examples; replacing
clears the base's reference, which the next fine-tuning job on the base measures);
``GET`` shows it with the base's reference scores (null until measured). ``ref`` is a
base's name, ``name@revision``, revision or fingerprint. Bad input is a 400 naming the
field, an unknown base or suite a 404; nothing is written unless all of it is good.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from registry import InvalidRequest, Principal
from registry.capability import CapabilityStore, Suite
from server.api.auth import registry_of, require_admin
from server.errors import APIError

MAX_BODY_BYTES = 2 << 20
"""Largest suite body: 200 examples of two 2000-character strings, JSON-escaped, fit."""

routes = APIRouter(tags=["registry"])
AdminPrincipal = Annotated[Principal, Depends(require_admin)]


def suite_json(suite: Suite) -> dict[str, Any]:
    reference = suite.reference
    return {
        "object": "capability_suite",
        "name": suite.name,
        "eval_suite": suite.label,
        "examples": suite.examples,
        "examples_sha256": suite.examples_sha256,
        "created_by": suite.created_by,
        "created_at": suite.created_at.isoformat(),
        "reference": None
        if reference is None
        else {
            "metrics": reference.metrics,
            "sample_count": reference.sample_count,
            "details": reference.details,
            "created_by": reference.created_by,
            "created_at": reference.created_at.isoformat(),
        },
    }


def _examples(raw: bytes) -> list[Any]:
    """The body's ``examples`` list; a 400 (413 when too large) naming what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the suite body is over {MAX_BODY_BYTES} bytes", param="examples")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the body is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict) or not isinstance(body.get("examples"), list):
        raise APIError(
            400,
            'the body must be {"examples": [{"prompt": ..., "answer": ...}, ...]}',
            param="examples",
        )
    unknown = sorted(set(body) - {"examples"})
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    examples: list[Any] = body["examples"]
    return examples


@routes.put(
    "/admin/bases/{ref}/capability/{name}",
    summary="Create or replace a base's capability suite (clears its reference)",
)
async def set_suite(request: Request, ref: str, name: str, principal: AdminPrincipal) -> Any:
    examples = _examples(await request.body())
    registry = registry_of(request)

    def write() -> Suite:
        base = registry.get_base(ref)
        try:
            return CapabilityStore(registry).set_suite(base, name, examples, principal.actor)
        except InvalidRequest as exc:
            param = "name" if "suite name" in str(exc) else "examples"
            raise APIError(400, str(exc), code="invalid_request", param=param) from exc

    return suite_json(await run_in_threadpool(write))


@routes.get(
    "/admin/bases/{ref}/capability/{name}",
    summary="A base's capability suite and the base's reference scores on it",
)
def get_suite(request: Request, ref: str, name: str, _: AdminPrincipal) -> dict[str, Any]:
    registry = registry_of(request)
    return suite_json(CapabilityStore(registry).get_suite(registry.get_base(ref), name))
