"""Versioned datasets (tenant routes): create, version, inspect, page through examples.

``POST /v1/datasets`` creates a dataset; ``GET /v1/datasets`` and
``GET /v1/datasets/{name}`` list and show them. ``POST /v1/datasets/{name}/versions``
makes a version from the latest one: add the examples of an uploaded fine-tuning file
(``training_file``) or of stored completions with feedback (``from_completions``), leave
some out (``remove``: their addresses), or start from nothing (``replace``). Identical
content makes no new version: the latest is answered with 200 instead of 201.
``GET .../versions``, ``GET .../versions/{n}`` (with its ``diff`` against its parent) and
``GET .../versions/{n}/examples`` (paged by address) read them.

Each new version is audited (``training.dataset_audit``: duplicates, blank answers,
lengths, split leakage) and the report stored on it. A version's ``file_id`` is an
ordinary fine-tuning file: ``client.fine_tuning.jobs.create(training_file=file_id)``.

A foreign dataset is answered exactly like an unknown one. No shape here is OpenAI's;
they follow its style (``object``, unix ``created_at``, list pages).

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import datetime as dt
import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictBool

from registry import Actor, NotFound, Principal
from registry.dataset_sources import CompletionFilter
from registry.datasets import (
    Dataset,
    DatasetStore,
    DatasetVersion,
    NewExample,
    VersionChange,
)
from registry.jobs import JobStore
from server.api.auth import require_tenant
from server.api.jobs_routes import job_store
from server.errors import APIError
from training.data import DatasetError, Method, check_method, load_jsonl
from training.dataset_audit import audit

log = logging.getLogger("loraplex.api")
routes = APIRouter(tags=["datasets"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]
_ADDRESS = re.compile(r"[0-9a-f]{64}")
_LATEST = 253402300799  # 9999-12-31: later unix times do not fit a datetime


def dataset_store(request: Request) -> DatasetStore:
    """The app's ``DatasetStore`` (``app.state.dataset_store``), made on first use."""
    store: DatasetStore | None = getattr(request.app.state, "dataset_store", None)
    if store is None:
        store = DatasetStore(job_store(request))
        request.app.state.dataset_store = store
    return store


Datasets = Annotated[DatasetStore, Depends(dataset_store)]


def _tenant_id(principal: Principal) -> int:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return principal.tenant_id


# -- shapes ------------------------------------------------------------------------


def _unix(value: dt.datetime) -> int:
    return int(value.timestamp())


def latest_number(store: DatasetStore, tenant_id: int, name: str) -> int | None:
    try:
        return store.get_version(tenant_id, name).number
    except NotFound:
        return None


def dataset_json(store: DatasetStore, dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.name,
        "object": "dataset",
        "name": dataset.name,
        "description": dataset.description,
        "created_at": _unix(dataset.created_at),
        "latest_version": latest_number(store, dataset.tenant_id, dataset.name),
    }


def version_json(name: str, version: DatasetVersion) -> dict[str, Any]:
    return {
        "id": f"{name}@{version.number}",
        "object": "dataset.version",
        "dataset": name,
        "number": version.number,
        # A version's parent is the latest version when it was made: always number - 1.
        "parent": None if version.parent_id is None else version.number - 1,
        "sha256": version.sha256,
        "examples": version.example_count,
        "added": version.added,
        "removed": version.removed,
        "file_id": version.file_id,
        "method": version.method,
        "source": version.source,
        "audit": version.audit,
        "created_by": version.created_by,
        "created_at": _unix(version.created_at),
    }


def _page(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }


# -- making versions (shared with ``loraplex datasets add``) -------------------------


def file_examples(jobs: JobStore, tenant_id: int, file_id: str, method: Method) -> list[NewExample]:
    """The examples of an uploaded fine-tuning file, each non-blank line one, checked as a
    job's training file is (``DatasetError`` lists every problem). Each keeps only its
    format's fields, so re-uploading the same records with extra keys adds nothing."""
    record = jobs.get_file(tenant_id, file_id)
    examples = load_jsonl(jobs.file_content(record), "training_file")
    check_method(examples, method, "training_file")
    return [NewExample(dict(e.data), "file", file_id) for e in examples]


def audit_version(store: DatasetStore, version: DatasetVersion) -> None:
    """Run the data audit on a new version and store its report on it."""
    examples = [content for _, content in store.examples(version) if content is not None]
    try:
        report = audit(examples)
    except Exception:  # the version is written already; a failed audit must not hide it
        log.exception("data audit of dataset version %s failed", version.id)
        report = {"error": "the data audit failed; it has been logged"}
    store.set_audit(version, report)


def add_file_version(
    store: DatasetStore,
    tenant_id: int,
    name: str,
    change: VersionChange,
    file_id: str | None,
    actor: Actor,
) -> tuple[DatasetVersion, bool]:
    """``change`` plus the examples of ``file_id`` (when given), audited when new."""
    if file_id is not None:
        add = file_examples(store.jobs, tenant_id, file_id, change.method)
        source = {**change.source, "training_file": file_id}
        change = VersionChange(add, change.remove, change.replace, change.method, source)
    version, new = store.add_version(tenant_id, name, change, actor)
    if new:
        audit_version(store, version)
    return version, new


# -- datasets ----------------------------------------------------------------------


class DatasetBody(BaseModel):
    name: str
    description: str = Field(default="", max_length=4096)


@routes.post("/v1/datasets", status_code=201, summary="Create a dataset")
def create_dataset(body: DatasetBody, principal: TenantPrincipal, store: Datasets) -> Any:
    dataset = store.create(_tenant_id(principal), body.name, body.description)
    return dataset_json(store, dataset)


@routes.get("/v1/datasets", summary="Your datasets")
def list_datasets(principal: TenantPrincipal, store: Datasets) -> dict[str, Any]:
    return _page([dataset_json(store, d) for d in store.list_datasets(_tenant_id(principal))])


@routes.get("/v1/datasets/{name}", summary="A dataset")
def get_dataset(name: str, principal: TenantPrincipal, store: Datasets) -> dict[str, Any]:
    return dataset_json(store, store.get(_tenant_id(principal), name))


# -- versions ----------------------------------------------------------------------


class CompletionsBody(BaseModel):
    """Which stored completions (with feedback) make the examples."""

    adapter: str | None = None
    version: int | None = Field(default=None, ge=0, le=2**31 - 1)
    model: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    created_after: int | None = Field(default=None, ge=0, le=_LATEST)
    created_before: int | None = Field(default=None, ge=0, le=_LATEST)


class VersionBody(BaseModel):
    training_file: str | None = None
    from_completions: CompletionsBody | None = None
    remove: list[str] = Field(default_factory=list)
    replace: StrictBool = False
    method: Literal["supervised", "dpo"] | None = None
    """Omitted: the latest version's method (supervised for a first version)."""


def _check_version_body(body: VersionBody) -> None:
    """Refuse a body that asks for nothing, or for two sources at once (nothing written)."""
    if body.training_file is not None and body.from_completions is not None:
        raise APIError(
            400,
            "give one source per version: training_file or from_completions, not both",
            param="from_completions",
        )
    if body.from_completions is not None and (body.remove or body.replace):
        raise APIError(
            400,
            "from_completions adds to the latest version; remove or replace in a version of "
            "its own first",
            param="from_completions",
        )
    if body.training_file is None and body.from_completions is None and not body.remove:
        raise APIError(
            400,
            "nothing to change: give a training_file, from_completions, or remove "
            "(addresses of examples to leave out)",
            param="training_file",
        )
    bad = [a for a in body.remove if not _ADDRESS.fullmatch(a)]
    if bad:
        raise APIError(
            400,
            f"remove[{body.remove.index(bad[0])}] {bad[0][:80]!r} is not an example address "
            "(64 lower-case hex digits); list the version's examples for their ids",
            param="remove",
        )


def _method(store: DatasetStore, tenant_id: int, name: str, body: VersionBody) -> Method:
    if body.method is not None:
        return body.method
    store.get(tenant_id, name)  # an unknown dataset is a 404 before anything else
    try:
        return "dpo" if store.get_version(tenant_id, name).method == "dpo" else "supervised"
    except NotFound:
        return "supervised"


def _from_completions(
    store: DatasetStore, tenant_id: int, name: str, body: VersionBody, actor: Actor
) -> tuple[DatasetVersion, bool]:
    """The hook for the second source: stored completions and their feedback."""
    wanted = body.from_completions
    assert wanted is not None
    when = {
        key: None if unix is None else dt.datetime.fromtimestamp(unix, dt.UTC)
        for key, unix in (("created_after", wanted.created_after),
                          ("created_before", wanted.created_before))
    }  # fmt: skip
    method = _method(store, tenant_id, name, body)
    found = CompletionFilter(
        wanted.adapter, wanted.version, wanted.model, wanted.metadata, **when, method=method
    )
    version, new = store.add_from_completions(tenant_id, name, found, actor)
    if new:
        audit_version(store, version)
    return version, new


@routes.post("/v1/datasets/{name}/versions", summary="Make a new version from the latest")
def add_version(
    name: str, body: VersionBody, principal: TenantPrincipal, store: Datasets
) -> JSONResponse:
    tenant_id = _tenant_id(principal)
    _check_version_body(body)
    if body.from_completions is not None:
        version, new = _from_completions(store, tenant_id, name, body, principal.actor)
    else:
        method = _method(store, tenant_id, name, body)
        source: dict[str, Any] = {"removed": list(body.remove), "replace": body.replace}
        change = VersionChange((), body.remove, body.replace, method, source)
        try:
            version, new = add_file_version(
                store, tenant_id, name, change, body.training_file, principal.actor
            )
        except DatasetError as exc:
            raise APIError(
                400, str(exc), code="invalid_training_file", param="training_file"
            ) from exc
    return JSONResponse(version_json(name, version), status_code=201 if new else 200)


@routes.get("/v1/datasets/{name}/versions", summary="A dataset's versions, oldest first")
def list_versions(name: str, principal: TenantPrincipal, store: Datasets) -> dict[str, Any]:
    return _page([version_json(name, v) for v in store.versions(_tenant_id(principal), name)])


@routes.get("/v1/datasets/{name}/versions/{number}", summary="A version and its diff")
def get_version(
    name: str, number: int, principal: TenantPrincipal, store: Datasets
) -> dict[str, Any]:
    version = store.get_version(_tenant_id(principal), name, _number(number))
    diff = store.diff(version)
    return {**version_json(name, version), "diff": {"added": diff.added, "removed": diff.removed}}


def _number(number: int) -> int:
    if not 1 <= number <= 2**31 - 1:
        raise APIError(400, f"version {number} is not a version number (1, 2, ...)", param="number")
    return number


@routes.get("/v1/datasets/{name}/versions/{number}/examples", summary="A version's examples")
def list_examples(
    name: str,
    number: int,
    principal: TenantPrincipal,
    store: Datasets,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """In the version's order; ``example`` is null where its source was erased."""
    version = store.get_version(_tenant_id(principal), name, _number(number))
    examples = store.examples(version)
    start = 0
    if after is not None:
        addresses = [sha for sha, _ in examples]
        if after not in addresses:
            raise APIError(
                400, f"after {after[:80]!r} is not an example of {name}@{number}", param="after"
            )
        start = addresses.index(after) + 1
    shown = examples[start : start + limit]
    items = [{"id": sha, "object": "dataset.example", "example": c} for sha, c in shown]
    return _page(items, has_more=start + limit < len(examples))
