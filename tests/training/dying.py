"""A real registry and job store with a hook at each named moment of a job, for kill tests.

``DyingRegistry`` and ``DyingStore`` are ``Registry`` and ``JobStore`` unchanged but for
a call to ``hook(moment)`` right after each moment in ``MOMENTS``. A hook that raises
``Killed`` kills the worker there the way SIGKILL would (no ``except Exception`` stops
it); run as a program, this module starts a worker process that SIGKILLs itself at the
moment named on its command line. Moments inside the completing transaction
(``registering``, ``scoring``, ``promoting``) die with its rows written, not committed.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlmodel import Session

from registry import BlobStore, LocalBlobStore, Registry
from registry.jobs import FineTuningJob, JobStore

MOMENTS = (
    "claimed",
    "data audited",
    "training",
    "trained",
    "staged",
    "registering",
    "scoring",
    "promoting",
    "completed",
)
"""A job's moments in order: claimed; its data audit recorded; its first checkpoint
recorded; training finished; its adapter's blob stored (nothing registered); inside the
completing transaction, after the version's row, an eval result and the promotion; the
completing transaction committed (the job succeeded)."""

Hook = Callable[[str], None]


class Killed(BaseException):
    """The worker died at a moment (a ``BaseException``, as nothing may catch a kill)."""


def kill_at(moment: str) -> Hook:
    """A hook that kills the worker at ``moment``."""
    assert moment in MOMENTS, moment

    def hook(now: str) -> None:
        if now == moment:
            raise Killed(now)

    return hook


def _after(target: object, method: str, moment: Callable[..., str | None], hook: Hook) -> None:
    """Make ``target.method`` call ``hook(moment(returned, *args, **kwargs))`` once it has
    returned (no hook when that is None); rows it wrote in a caller's transaction are
    flushed first."""
    original = getattr(target, method)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        returned = original(*args, **kwargs)
        now = moment(returned, *args, **kwargs)
        if now is not None:
            if args and isinstance(args[0], Session):
                args[0].flush()
            hook(now)
        return returned

    setattr(target, method, wrapped)


def _always(name: str) -> Callable[..., str]:
    return lambda *args, **kwargs: name


def _claimed(job: FineTuningJob | None, *args: Any) -> str | None:
    return None if job is None else "claimed"


def _event_moment(_: None, job_id: str, message: str, *args: Any, **kwargs: Any) -> str | None:
    if message.startswith("Data audit"):
        return "data audited"
    return "trained" if message.startswith("Training finished") else None


class DyingRegistry(Registry):
    """A real ``Registry`` calling ``hook`` after staging and inside the completion."""

    def __init__(self, database_url: str, blobs: BlobStore, hook: Hook) -> None:
        super().__init__(database_url, blobs)
        self.hook = hook
        _after(self, "stage_adapter", _always("staged"), hook)
        _after(self, "push_in", _always("registering"), hook)
        _after(self, "add_eval_result_in", _always("scoring"), hook)
        _after(self, "promote_in", _always("promoting"), hook)


class DyingStore(JobStore):
    """A real ``JobStore`` calling its registry's hook at the job's other moments."""

    def __init__(self, registry: DyingRegistry) -> None:
        super().__init__(registry, stale_after=60, max_attempts=50)
        _after(self, "claim", _claimed, registry.hook)
        _after(self, "add_event", _event_moment, registry.hook)
        _after(self, "add_checkpoint", _always("training"), registry.hook)
        _after(self, "complete", _always("completed"), registry.hook)


def _sigkill_at(moment: str) -> Hook:
    def hook(now: str) -> None:
        if now == moment:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: Sequence[str]) -> None:
    """DATABASE_URL BLOB_ROOT BASE_DIR BASE_FINGERPRINT WORK_DIR MOMENT: run one job, die."""
    from tests.training.training_testdata import FAST
    from training.worker import Worker, WorkerOptions

    database_url, blob_root, base_dir, fingerprint, work_dir, moment = argv
    registry = DyingRegistry(database_url, LocalBlobStore(blob_root), _sigkill_at(moment))
    options = WorkerOptions(Path(base_dir), fingerprint, Path(work_dir), FAST, 0.1, 0.2, False)
    Worker(DyingStore(registry), options, "doomed").run_once()


if __name__ == "__main__":
    main(sys.argv[1:])
