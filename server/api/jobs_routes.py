"""OpenAI-compatible files and fine-tuning jobs API (tenant routes).

``POST /v1/files`` stores a JSONL training file (checked line by line at upload);
``/v1/fine_tuning/jobs`` creates, lists, retrieves, cancels, pauses and resumes jobs (a
resumed job trains again from the start) and lists their events and checkpoints, in
the object shapes the official ``openai`` client parses. Workers (``loraplex worker``)
run the jobs. A foreign id is answered exactly like an unknown one.

``model`` is a registered base, or one of the tenant's adapters: ``name`` (its production
version), ``name@N`` or ``name:N`` (version N; ``name@N`` is what a job's
``fine_tuned_model`` says when it was not promoted) or ``name:alias``. A job on an
adapter continues that version's weights (``init_version``), on its base, into the same
adapter unless ``suffix`` names another. A foreign or unknown adapter is answered like
an unknown base. A ``training_file`` that is a dataset version's file records the version
(``dataset_version``). Both appear on the job as extra fields.

Extensions beyond OpenAI's request body (send them with ``extra_body``): any
``TrainConfig`` field in ``hyperparameters`` (``r``, ``alpha``, ``learning_rate``...)
``json_schema``, a JSON schema the answers must follow (scored as format
compliance on the test split), and ``answer_regex``, a regular expression (at most 1024
characters) the answers must match in full (scored as ``regex_match``), and
``servable_checkpoints`` (true): the run's last three checkpoints register, unpromoted,
as versions of the adapter with its result, and each checkpoint's
``fine_tuned_model_checkpoint`` is then the ``name@N`` the gateway serves.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import datetime as dt
import re
import uuid
from typing import Annotated, Any

import jsonschema
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from pydantic import BaseModel

from registry import PRODUCTION, AdapterVersion, BaseModelRecord, Principal, Registry, lora_names
from registry.datasets import DatasetStore
from registry.jobs import (
    FINE_TUNE_PURPOSE,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    JobStore,
    TrainingFile,
)
from registry.retraining import job_links
from registry.workers import WorkerRoster
from server.api.auth import registry_of, require_tenant
from server.errors import APIError, model_not_found
from training.config import ConfigError, TrainConfig
from training.data import DatasetError, Method, check_method, load_jsonl
from training.hyperparameters import train_config
from training.schema import RegexError, check_regex, check_schema

MAX_FILE_BYTES = 64 << 20
"""Default bound on an uploaded training file (``app.state.max_training_file_bytes``)."""
_SUFFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_ADAPTER_MODEL = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})"
    r"(?:@(?P<version>[1-9][0-9]{0,8})|:(?P<number>[1-9][0-9]{0,8})|:(?P<alias>[A-Za-z0-9._-]+))?"
)

routes = APIRouter(tags=["fine-tuning"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]


def job_store(request: Request) -> JobStore:
    """The app's ``JobStore`` (``app.state.job_store``), made on first use."""
    store: JobStore | None = getattr(request.app.state, "job_store", None)
    if store is None:
        store = JobStore(registry_of(request))
        request.app.state.job_store = store
    return store


Jobs = Annotated[JobStore, Depends(job_store)]


def _tenant_id(principal: Principal) -> int:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return principal.tenant_id


# -- shapes ------------------------------------------------------------------------


def _unix(value: dt.datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_json(f: TrainingFile) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": _unix(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
        "line_count": f.line_count,
        "sha256": f.sha256,
    }


def job_json(job: FineTuningJob, registry: Registry | None = None) -> dict[str, Any]:
    """The job in OpenAI's shape, with loraplex's fields (``adapter_name``, ``result``) and,
    given the registry, its lineage (``dataset_version``, ``init_version``, or None)."""
    shown = {**_openai_job(job), "adapter_name": job.adapter_name, "result": job.result}
    shown["answer_regex"] = job.answer_regex
    shown["servable_checkpoints"] = job.servable_checkpoints
    if registry is not None:
        links = job_links(registry, job)
        dataset, init = links.dataset_version, links.init_version
        shown["dataset_version"] = dataset and {"dataset": dataset[0], "version": dataset[1]}
        shown["init_version"] = init and {"adapter": init[0], "version": init[1]}
    return shown


def _openai_job(job: FineTuningJob) -> dict[str, Any]:
    hyperparameters = {"n_epochs": "auto", "batch_size": "auto", **job.hyperparameters}
    if job.method != "dpo":
        hyperparameters.pop("beta", None)
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": _unix(job.created_at),
        "finished_at": _unix(job.finished_at),
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": f"tenant-{job.tenant_id}",
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": hyperparameters,
        "method": {"type": job.method, job.method: {"hyperparameters": hyperparameters}},
        "seed": job.seed,
        "suffix": job.suffix,
        "error": job.error,
        "result_files": [],
        "trained_tokens": _trained_tokens(job),
        "estimated_finish": None,
        "integrations": None,
        "metadata": None,
    }


def _trained_tokens(job: FineTuningJob) -> int | None:
    """What the worker counted (``result.train.trained_tokens``); None until it has."""
    train = (job.result or {}).get("train") or {}
    tokens = train.get("trained_tokens")
    return tokens if isinstance(tokens, int) else None


def event_json(event: FineTuningEvent) -> dict[str, Any]:
    return {
        "id": f"ftevent-{event.id}",
        "object": "fine_tuning.job.event",
        "created_at": _unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "data": event.data,
        "type": "metrics" if event.data and "step" in event.data else "message",
    }


def _checkpoint_model(job: FineTuningJob, step: int) -> str:
    """``name@N``, the version a kept checkpoint registered as when its job succeeded (the
    gateway serves it); ``name:step-N`` names one not kept (nothing serves that)."""
    number = ((job.result or {}).get("checkpoints") or {}).get(str(step))
    return f"{job.adapter_name}@{number}" if number else f"{job.adapter_name}:step-{step}"


def checkpoint_json(job: FineTuningJob, checkpoint: FineTuningCheckpoint) -> dict[str, Any]:
    return {
        "id": f"ftckpt-{checkpoint.id}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": _unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": _checkpoint_model(job, checkpoint.step),
        "fine_tuning_job_id": job.id,
        "metrics": checkpoint.metrics,
        "step_number": checkpoint.step,
    }


def _page(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    first = items[0]["id"] if items else None
    last = items[-1]["id"] if items else None
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": first,
        "last_id": last,
    }


# -- files -------------------------------------------------------------------------


def _read_bounded(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    for chunk in iter(lambda: upload.file.read(1 << 20), b""):
        total += len(chunk)
        if total > limit:
            raise APIError(
                413,
                f"File exceeds the {limit}-byte limit for training files; split the data "
                "or sample it down.",
                code="file_too_large",
                param="file",
            )
        chunks.append(chunk)
    return b"".join(chunks)


@routes.post("/v1/files")
def create_file(
    request: Request,
    principal: TenantPrincipal,
    store: Jobs,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    if purpose != FINE_TUNE_PURPOSE:
        raise APIError(
            400,
            f"purpose {purpose!r} is not supported here; upload training data with purpose "
            "'fine-tune'",
            code="invalid_purpose",
            param="purpose",
        )
    limit = int(getattr(request.app.state, "max_training_file_bytes", MAX_FILE_BYTES))
    content = _read_bounded(file, limit)
    name = file.filename or "upload.jsonl"
    try:
        load_jsonl(content, name)
    except DatasetError as exc:
        raise APIError(400, str(exc), code="invalid_file", param="file") from exc
    record = store.create_file(_tenant_id(principal), name, purpose, content)
    return file_json(record)


@routes.get("/v1/files")
def list_files(principal: TenantPrincipal, store: Jobs) -> dict[str, Any]:
    return _page([file_json(f) for f in store.list_files(_tenant_id(principal))])


@routes.get("/v1/files/{file_id}")
def get_file(file_id: str, principal: TenantPrincipal, store: Jobs) -> dict[str, Any]:
    return file_json(store.get_file(_tenant_id(principal), file_id))


@routes.get("/v1/files/{file_id}/content")
def file_content(file_id: str, principal: TenantPrincipal, store: Jobs) -> Response:
    """The file's bytes as uploaded (another tenant's or a deleted file: 404, like an
    unknown one)."""
    record = store.get_file(_tenant_id(principal), file_id)
    return Response(store.file_content(record), media_type="application/octet-stream")


# -- jobs --------------------------------------------------------------------------


class MethodBody(BaseModel):
    type: str = "supervised"
    supervised: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None


class JobBody(BaseModel):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    method: MethodBody | None = None
    suffix: str | None = None
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    answer_regex: str | None = None
    servable_checkpoints: bool = False
    metadata: dict[str, str] | None = None


def _method_and_hyperparameters(body: JobBody) -> tuple[Method, dict[str, Any]]:
    """OpenAI puts hyperparameters at the top (legacy) or under ``method.<type>``."""
    kind = body.method.type if body.method else "supervised"
    if kind not in ("supervised", "dpo"):
        raise APIError(
            400,
            f"method type {kind!r} is not supported; use 'supervised' or 'dpo'",
            code="invalid_method",
            param="method",
        )
    method: Method = "dpo" if kind == "dpo" else "supervised"
    nested = getattr(body.method, method, None) if body.method else None
    hyperparameters = dict(body.hyperparameters or {})
    hyperparameters.update((nested or {}).get("hyperparameters") or {})
    return method, hyperparameters


def _check_file(store: JobStore, tenant_id: int, file_id: str, method: Method, param: str) -> None:
    record = store.get_file(tenant_id, file_id)
    try:
        check_method(load_jsonl(store.file_content(record), param), method, param)
    except DatasetError as exc:
        raise APIError(400, str(exc), code="invalid_training_file", param=param) from exc


def _adapter_name(suffix: str | None, base_name: str, job_id: str) -> str:
    if suffix is None:
        stem = _NAME_CHARS.sub("-", base_name).strip("-._")[:40] or "model"
        return f"{stem}-ft-{job_id[-8:]}"
    if not _SUFFIX.fullmatch(suffix) or lora_names.in_namespace(suffix):
        raise APIError(
            400,
            f"suffix {suffix!r} must be 1-40 characters of letters, digits, '.', '_' or '-', "
            f"start with a letter or digit and not start with {lora_names.PREFIX!r} (any case)",
            code="invalid_suffix",
            param="suffix",
        )
    return suffix


def _check_options(body: JobBody, method: Method, hyperparameters: dict[str, Any]) -> None:
    try:
        train_config(TrainConfig(), method, body.seed or 0, hyperparameters)
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
    if body.answer_regex is not None:
        try:
            check_regex(body.answer_regex)
        except RegexError as exc:
            raise APIError(
                400, str(exc), code="invalid_answer_regex", param="answer_regex"
            ) from exc


def _adapter_version(registry: Registry, tenant_id: int, model: str) -> AdapterVersion:
    """The tenant's adapter version ``model`` names; the one 404 for anything else."""
    match = _ADAPTER_MODEL.fullmatch(model)
    view = None if match is None else registry.routing_view(tenant_id, match["name"])
    if match is None or view is None:
        raise model_not_found(model)
    number = match["version"] or match["number"]
    if number is None:
        alias = match["alias"] or PRODUCTION
        target = view.aliases.get(alias)
        if target is None and alias == PRODUCTION:
            raise APIError(
                400,
                f"adapter {view.name!r} has no production version to continue; name a version "
                f"('{view.name}@N') or promote one",
                code="no_production_version",
                param="model",
            )
        if target is None:
            raise model_not_found(model)
        number = str(target.version)
    for version in view.versions:  # active versions only: a retired one is not addressable
        if version.number == int(number):
            return version
    raise model_not_found(model)


def _resolve_model(
    registry: Registry, tenant_id: int, model: str
) -> tuple[BaseModelRecord, AdapterVersion | None]:
    """The base to train on, and the adapter version to continue (None: a fresh LoRA)."""
    base = registry.find_base(model)
    if base is not None:
        return base, None
    version = _adapter_version(registry, tenant_id, model)
    pinned = next((b for b in registry.list_bases() if b.id == version.base_id), None)
    if pinned is None:  # a version's base is never deleted; a missing one is unaddressable
        raise model_not_found(model)
    return pinned, version


def _target_adapter(
    body: JobBody, base: BaseModelRecord, init: AdapterVersion | None, job_id: str
) -> str:
    """The adapter the result registers under: ``suffix``, else the continued adapter."""
    if init is None or body.suffix is not None:
        return _adapter_name(body.suffix, base.name, job_id)
    adapter = _ADAPTER_MODEL.fullmatch(body.model)
    assert adapter is not None  # _adapter_version matched it
    return adapter["name"]


@routes.post("/v1/fine_tuning/jobs")
def create_job(
    body: JobBody, request: Request, principal: TenantPrincipal, store: Jobs
) -> dict[str, Any]:
    tenant_id, registry = _tenant_id(principal), registry_of(request)
    base, init = _resolve_model(registry, tenant_id, body.model)
    method, hyperparameters = _method_and_hyperparameters(body)
    _check_options(body, method, hyperparameters)
    _check_file(store, tenant_id, body.training_file, method, "training_file")
    if body.validation_file is not None:
        _check_file(store, tenant_id, body.validation_file, method, "validation_file")
    job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
    dataset = DatasetStore(store).version_of_file(tenant_id, body.training_file)
    job = FineTuningJob(
        id=job_id,
        tenant_id=tenant_id,
        model=body.model,
        base_fingerprint=base.fingerprint,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method=method,
        hyperparameters=hyperparameters,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else 0,
        json_schema=body.json_schema,
        answer_regex=body.answer_regex,
        adapter_name=_target_adapter(body, base, init, job_id),
        dataset_version_id=None if dataset is None else dataset.id,
        init_version_id=None if init is None else init.id,
        servable_checkpoints=body.servable_checkpoints,
    )
    created = store.create_job(job)
    if not WorkerRoster(registry).serving(base.fingerprint):
        store.add_event(job_id, waiting_for_a_worker(base.name, base.revision), level="warn")
    return job_json(created, registry)


def waiting_for_a_worker(base: str, revision: str) -> str:
    return (
        f"No fine-tuning worker is running for base {base!r} (revision {revision!r}): the job "
        "stays queued until one starts. Start `loraplex worker` with LORAPLEX_BASE_MODEL "
        "pointing at that base's weights."
    )


@routes.get("/v1/fine_tuning/jobs")
def list_jobs(
    principal: TenantPrincipal,
    store: Jobs,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    jobs = store.list_jobs(_tenant_id(principal), after, limit + 1)
    registry = registry_of(request)
    return _page([job_json(j, registry) for j in jobs[:limit]], has_more=len(jobs) > limit)


@routes.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(
    job_id: str, request: Request, principal: TenantPrincipal, store: Jobs
) -> dict[str, Any]:
    return job_json(store.get_job(_tenant_id(principal), job_id), registry_of(request))


@routes.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(
    job_id: str, request: Request, principal: TenantPrincipal, store: Jobs
) -> dict[str, Any]:
    return job_json(store.cancel(_tenant_id(principal), job_id), registry_of(request))


@routes.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(
    job_id: str, request: Request, principal: TenantPrincipal, store: Jobs
) -> dict[str, Any]:
    """Pause a queued or running job (a running one stops at its worker's next heartbeat)."""
    return job_json(store.pause(_tenant_id(principal), job_id), registry_of(request))


@routes.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(
    job_id: str, request: Request, principal: TenantPrincipal, store: Jobs
) -> dict[str, Any]:
    """Re-queue a paused job; its training restarts from the start."""
    return job_json(store.resume(_tenant_id(principal), job_id), registry_of(request))


def _event_cursor(after: str | None) -> int | None:
    if after is None:
        return None
    number = after.removeprefix("ftevent-")
    if not (number.isascii() and number.isdigit()):  # int() refuses '¹', isdigit() does not
        raise APIError(400, f"after {after!r} is not an event id (ftevent-N)", param="after")
    return int(number)


@routes.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(
    job_id: str,
    principal: TenantPrincipal,
    store: Jobs,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    events = store.events(_tenant_id(principal), job_id, _event_cursor(after), limit + 1)
    return _page([event_json(e) for e in events[:limit]], has_more=len(events) > limit)


@routes.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, principal: TenantPrincipal, store: Jobs) -> dict[str, Any]:
    job = store.get_job(_tenant_id(principal), job_id)
    checkpoints = store.checkpoints(_tenant_id(principal), job_id)
    return _page([checkpoint_json(job, c) for c in checkpoints])
