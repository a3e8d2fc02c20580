"""``LoraplexClient``: the tenant REST API of a loraplex gateway over httpx."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import httpx

from server.client.errors import LoraplexError, retry_after
from server.client.models import (
    AdapterInfo,
    Checkpoint,
    EvalScore,
    FineTuningJob,
    GateRule,
    JobEvent,
    TrainingFile,
    UsageReport,
    VersionEvals,
    VersionInfo,
)

Progress = Callable[[int, int], None]
"""Called as an upload goes: (bytes sent so far, bytes in all)."""
T = TypeVar("T")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_RETRY_WAIT = 60.0
"""The longest one wait before a retry (a larger Retry-After is cut to this)."""


class _Uploads:
    """Files opened for a multipart body, counting the bytes httpx reads of them."""

    def __init__(self, paths: Sequence[Path], progress: Progress | None) -> None:
        self.paths, self.progress = list(paths), progress
        self.total = sum(p.stat().st_size for p in self.paths)
        self.read: dict[int, int] = {}

    def open(self, stack: ExitStack) -> list[_Counted]:
        return [
            _Counted(self, i, stack.enter_context(p.open("rb"))) for i, p in enumerate(self.paths)
        ]

    def moved(self, index: int, position: int) -> None:
        self.read[index] = position
        if self.progress is not None:
            self.progress(sum(self.read.values()), self.total)


class _Counted:
    """A file whose reads report progress; seeks too, since httpx rewinds it on a retry."""

    def __init__(self, uploads: _Uploads, index: int, file: BinaryIO) -> None:
        self.uploads, self.index, self.file = uploads, index, file

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(size)
        self.uploads.moved(self.index, self.file.tell())
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.file.seek(offset, whence)
        self.uploads.moved(self.index, position)
        return position

    def tell(self) -> int:
        return self.file.tell()

    def fileno(self) -> int:  # httpx sizes the part (Content-Length) by fstat
        return self.file.fileno()


def adapter_files(source: Path) -> list[Path]:
    """What a push of ``source`` uploads: a directory's regular files, or the archive."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file())
        if not files:
            raise LoraplexError(f"{source} holds no files; give the PEFT output directory")
        return files
    if source.is_file():
        return [source]
    raise LoraplexError(f"{source} does not exist; give a PEFT output directory or a tar/zip")


class LoraplexClient:
    """A tenant's client of one gateway: adapters, files, fine-tuning jobs and usage.

    ``url`` is the gateway (``http://host:8000``), ``api_key`` a tenant key. Requests the
    gateway answers 429 or 503 with ``Retry-After`` are retried ``max_retries`` times after
    the wait it asks for (at most ``MAX_RETRY_WAIT``); every other failure raises
    ``LoraplexError``. ``http`` replaces the httpx client (tests pass an ASGI one).
    Use it as a context manager, or call ``close``.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key:
            raise LoraplexError("no API key given; pass a tenant key (LORAPLEX_API_KEY)")
        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._http = http or httpx.Client(timeout=timeout)
        self._owns_http = http is None
        self._sleep = sleep

    def __repr__(self) -> str:  # never the key
        return f"LoraplexClient({self.url!r})"

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # -- transport ---------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried while the gateway answers a retryable 429/503."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(
                    method, self.url + path, headers=self._headers, **kwargs
                )
            except httpx.TimeoutException as exc:
                raise LoraplexError(
                    f"{method} {path} timed out ({type(exc).__name__}); the gateway at "
                    f"{self.url} is slow or unreachable",
                    code="connection_error",
                ) from exc
            except httpx.TransportError as exc:
                raise LoraplexError(
                    f"cannot reach the gateway at {self.url} ({type(exc).__name__}: {exc})",
                    code="connection_error",
                ) from exc
            wait = retry_after(response)
            retryable = response.status_code in (429, 503) and wait is not None
            if retryable and attempt < self.max_retries:
                assert wait is not None
                self._sleep(min(wait, MAX_RETRY_WAIT) or 0.5 * 2**attempt)
                continue
            if response.is_error:
                raise LoraplexError.from_response(response)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.request(method, path, **kwargs).json()
        return body

    def _list(self, path: str, build: Callable[[dict[str, Any]], T], **params: Any) -> list[T]:
        query = {k: v for k, v in params.items() if v is not None}
        return [build(item) for item in self._json("GET", path, params=query)["data"]]

    def _upload(
        self, path: str, field: str, files: Sequence[Path], data: dict[str, str],
        progress: Progress | None,
    ) -> dict[str, Any]:  # fmt: skip
        uploads = _Uploads(files, progress)
        with ExitStack() as stack:
            parts = [(field, (p.name, f)) for p, f in zip(files, uploads.open(stack), strict=True)]
            return self._json("POST", path, files=parts, data=data)

    @staticmethod
    def _adapter(name: str) -> str:
        return "/v1/adapters/" + quote(name, safe="")

    # -- adapters ----------------------------------------------------------------------

    def list_adapters(self) -> list[AdapterInfo]:
        return self._list("/v1/adapters", AdapterInfo.from_json)

    def get_adapter(self, name: str) -> AdapterInfo:
        """The adapter with its aliases and every version."""
        return AdapterInfo.from_json(self._json("GET", self._adapter(name)))

    def push_adapter(
        self,
        source: str | Path,
        name: str,
        base: str,
        *,
        description: str | None = None,
        progress: Progress | None = None,
    ) -> VersionInfo:
        """Upload a PEFT output directory (its files) or a tar/zip of it as a new version."""
        data = {"name": name, "base": base}
        if description is not None:
            data["description"] = description
        files = adapter_files(Path(source))
        return VersionInfo.from_json(self._upload("/v1/adapters", "files", files, data, progress))

    def list_versions(self, name: str) -> list[VersionInfo]:
        return self._list(self._adapter(name) + "/versions", VersionInfo.from_json)

    def promote(self, name: str, version: int, *, override: bool = False) -> VersionInfo:
        """Point production at ``version`` (its gates must pass unless ``override``)."""
        body = {"version": version, "override": override}
        return VersionInfo.from_json(
            self._json("POST", self._adapter(name) + "/promote", json=body)
        )

    def canary(self, name: str, version: int, weight: float) -> VersionInfo:
        """Send ``weight`` (0..1) of the adapter's traffic to ``version``."""
        body = {"version": version, "weight": weight}
        return VersionInfo.from_json(self._json("POST", self._adapter(name) + "/canary", json=body))

    def clear_canary(self, name: str) -> None:
        self.request("DELETE", self._adapter(name) + "/canary")

    def rollback(self, name: str) -> VersionInfo:
        """Point production back at the version it pointed at before."""
        return VersionInfo.from_json(self._json("POST", self._adapter(name) + "/rollback"))

    def retire(self, name: str, version: int) -> VersionInfo:
        path = f"{self._adapter(name)}/versions/{version}/retire"
        return VersionInfo.from_json(self._json("POST", path))

    def archive(self, name: str, version: int) -> VersionInfo:
        path = f"{self._adapter(name)}/versions/{version}/archive"
        return VersionInfo.from_json(self._json("POST", path))

    def add_eval(
        self,
        name: str,
        version: int,
        suite: str,
        metric: str,
        value: float,
        *,
        sample_count: int | None = None,
        dataset_sha256: str | None = None,
    ) -> EvalScore:
        body = {"suite": suite, "metric": metric, "value": value}
        body |= {"sample_count": sample_count, "dataset_sha256": dataset_sha256}
        path = f"{self._adapter(name)}/versions/{version}/evals"
        return EvalScore.from_json(self._json("POST", path, json=body))

    def eval_results(self, name: str, version: int) -> list[EvalScore]:
        """Every eval result of one version, oldest first."""
        return self._list(f"{self._adapter(name)}/versions/{version}/evals", EvalScore.from_json)

    def eval_history(self, name: str) -> list[VersionEvals]:
        """Every version's latest result of each suite and metric, oldest version first."""
        return self._list(self._adapter(name) + "/evals", VersionEvals.from_json)

    def get_gates(self, name: str) -> list[GateRule]:
        return self._list(self._adapter(name) + "/gates", GateRule.from_json)

    def set_gates(self, name: str, gates: Sequence[GateRule]) -> list[GateRule]:
        """Replace the adapter's promotion gates (an empty list removes them)."""
        body = {"gates": [g.to_json() for g in gates]}
        found = self._json("PUT", self._adapter(name) + "/gates", json=body)["data"]
        return [GateRule.from_json(g) for g in found]

    # -- files -------------------------------------------------------------------------

    def upload_file(
        self, path: str | Path, *, purpose: str = "fine-tune", progress: Progress | None = None
    ) -> TrainingFile:
        """Upload a JSONL training file (checked line by line by the gateway)."""
        body = self._upload("/v1/files", "file", [Path(path)], {"purpose": purpose}, progress)
        return TrainingFile.from_json(body)

    def list_files(self) -> list[TrainingFile]:
        return self._list("/v1/files", TrainingFile.from_json)

    def get_file(self, file_id: str) -> TrainingFile:
        return TrainingFile.from_json(self._json("GET", "/v1/files/" + quote(file_id, safe="")))

    # -- fine-tuning jobs ----------------------------------------------------------------

    @staticmethod
    def _job(job_id: str) -> str:
        return "/v1/fine_tuning/jobs/" + quote(job_id, safe="")

    def create_job(
        self,
        model: str,
        training_file: str,
        *,
        validation_file: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        method: str | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> FineTuningJob:
        """Queue a job on a base or an adapter (``name``, ``name@N``, ``name:alias``).

        ``extra`` goes into the body as it is (``json_schema``, ``answer_regex``...)."""
        body: dict[str, Any] = {"model": model, "training_file": training_file, **extra}
        optional = {"validation_file": validation_file, "suffix": suffix, "seed": seed}
        body |= {k: v for k, v in optional.items() if v is not None}
        if hyperparameters:
            body["hyperparameters"] = hyperparameters
        if method is not None:
            body["method"] = {"type": method}
        return FineTuningJob.from_json(self._json("POST", "/v1/fine_tuning/jobs", json=body))

    def list_jobs(self, *, limit: int = 20, after: str | None = None) -> list[FineTuningJob]:
        """The newest ``limit`` jobs (after the job id ``after``: the next page)."""
        return self._list("/v1/fine_tuning/jobs", FineTuningJob.from_json, limit=limit, after=after)

    def get_job(self, job_id: str) -> FineTuningJob:
        return FineTuningJob.from_json(self._json("GET", self._job(job_id)))

    def cancel_job(self, job_id: str) -> FineTuningJob:
        return FineTuningJob.from_json(self._json("POST", self._job(job_id) + "/cancel"))

    def job_events(
        self, job_id: str, *, limit: int = 20, after: str | None = None
    ) -> list[JobEvent]:
        """The newest ``limit`` events, newest first (``after``: older than that event)."""
        path = self._job(job_id) + "/events"
        return self._list(path, JobEvent.from_json, limit=limit, after=after)

    def events_since(self, job_id: str, cursor: int | None) -> list[JobEvent]:
        """Every event newer than the event number ``cursor`` (None: all), oldest first."""
        fresh: list[JobEvent] = []
        after: str | None = None
        while True:
            page = self.job_events(job_id, limit=100, after=after)
            newer = [e for e in page if cursor is None or e.number > cursor]
            fresh.extend(newer)
            if len(newer) < len(page) or len(page) < 100:
                return fresh[::-1]
            after = page[-1].id

    def follow_job_events(
        self, job_id: str, *, poll_interval: float = 2.0, timeout: float | None = None
    ) -> Iterator[JobEvent]:
        """Every event of the job, oldest first, as they come, until the job finishes.

        Polls every ``poll_interval`` seconds; raises ``LoraplexError`` (code ``timeout``)
        if the job is still going after ``timeout`` seconds."""
        cursor: int | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            finished = self.get_job(job_id).finished  # before the events: none is missed
            for event in self.events_since(job_id, cursor):
                cursor = event.number
                yield event
            if finished:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise LoraplexError(
                    f"job {job_id} is still going after {timeout:g}s", code="timeout"
                )
            self._sleep(poll_interval)

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The job's checkpoints, latest step first."""
        return self._list(self._job(job_id) + "/checkpoints", Checkpoint.from_json)

    # -- usage -------------------------------------------------------------------------

    def usage(
        self,
        *,
        since: dt.date | None = None,
        until: dt.date | None = None,
        adapter: str | None = None,
    ) -> UsageReport:
        """Requests and tokens by day, adapter and version (the last 30 days by default)."""
        return UsageReport.from_json(
            self._json("GET", "/v1/usage", params=_usage(since, until, adapter))
        )

    def usage_csv(
        self,
        *,
        since: dt.date | None = None,
        until: dt.date | None = None,
        adapter: str | None = None,
    ) -> str:
        params = {**_usage(since, until, adapter), "format": "csv"}
        return self.request("GET", "/v1/usage", params=params).text


def _usage(since: dt.date | None, until: dt.date | None, adapter: str | None) -> dict[str, str]:
    query = {
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "adapter": adapter,
    }
    return {k: v for k, v in query.items() if v is not None}
