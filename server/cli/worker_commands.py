"""``loraplex worker`` (run fine-tuning jobs from the registry) and ``loraplex train``.

``worker`` registers the local base model (idempotent), then claims queued jobs pinned
to it, one at a time, until stopped (SIGTERM/SIGINT: finish the current job, then exit;
a killed worker's job is re-queued by the next worker's reaper). ``train`` runs one
training locally from a JSONL file, with a progress bar, and writes the adapter to a
directory; it touches no database.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from server.config import Settings, add_settings_flags, load_settings

if TYPE_CHECKING:
    from registry import Registry
    from registry.jobs import JobStore

T = TypeVar("T")

WORKER_SETTINGS = [
    "home",
    "database_url",
    "blob_url",
    "s3_endpoint_url",
    "base_model",
    "base_revision",
    "served_model_name",
    "max_lora_rank",
    "max_upload_bytes",
    "log_level",
]


def _defaults(path: str | None) -> Any:
    """The worker's default ``TrainConfig``: built-ins, overridden by a JSON file."""
    from training.config import TrainConfig

    if path is None:
        return TrainConfig()
    return TrainConfig().with_overrides(json.loads(Path(path).read_text()))


def job_store(registry: Registry, args: argparse.Namespace) -> JobStore:
    """The job queue as the worker's flags set it up.

    ``--max-attempts`` is applied by this worker's reaper, to every job it finds stale
    whichever worker was running it: workers sharing a queue should agree on it.
    """
    from registry.jobs import JobStore

    return JobStore(registry, stale_after=args.stale_after, max_attempts=args.max_attempts)


def _wait_for(step: Callable[[], T]) -> T:
    """``step()``, retried while the registry database is unavailable: a worker started
    during a database restart waits for it instead of exiting (and being restarted)."""
    from registry import DATABASE_DOWN

    delay = 1.0
    while True:
        try:
            return step()
        except DATABASE_DOWN as exc:
            print(f"loraplex worker: registry database unavailable ({type(exc).__name__}); "
                  f"retrying in {delay:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def cmd_worker(args: argparse.Namespace) -> int:
    from server.cli.bootstrap import StartupError, open_registry, served_base_fingerprint
    from training.worker import Worker, WorkerOptions

    settings = load_settings(vars(args))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    registry = _wait_for(lambda: open_registry(settings))
    try:
        fingerprint = _wait_for(lambda: served_base_fingerprint(settings, registry))
    except StartupError as exc:
        print(f"loraplex worker: {exc}", file=sys.stderr)
        return 2
    store = job_store(registry, args)
    options = WorkerOptions(
        base_dir=settings.resolved_base_model,
        base_fingerprint=fingerprint,
        work_dir=Path(args.work_dir) if args.work_dir else settings.home / "worker",
        defaults=_defaults(args.defaults),
        poll_interval=args.poll_interval,
        heartbeat_interval=args.heartbeat_interval,
    )
    worker = Worker(store, options, args.worker_id)
    print(f"loraplex: worker {worker.worker_id} on base {fingerprint[:12]}", flush=True)
    try:
        if args.once:
            worker.run_once()
        else:
            worker.run(_stop_on_signals())
    finally:
        registry.close()
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    """``name=value`` pairs; values are read as JSON when they parse, else as strings."""
    overrides: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"loraplex train: --set {item!r} must look like name=value")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import ConfigError
    from training.data import DatasetError
    from training.hyperparameters import train_config
    from training.pipeline import RunSpec, run_training
    from training.render import TemplateError

    settings: Settings = load_settings(vars(args))
    try:
        config = train_config(
            _defaults(args.defaults), args.method, args.seed, _parse_set(args.set)
        )
        spec = RunSpec(
            base_dir=settings.resolved_base_model,
            training=Path(args.data).read_bytes(),
            config=config,
            validation=Path(args.validation).read_bytes() if args.validation else None,
            schema=json.loads(Path(args.schema).read_text()) if args.schema else None,
        )
        with _ProgressBar() as bar:
            outcome = run_training(
                spec, Path(args.out), on_step=bar.update, on_prepared=bar.data_checked
            )
    except (DatasetError, ConfigError, TemplateError) as exc:
        print(f"loraplex train: {exc}", file=sys.stderr)
        return 1
    _print_metrics(outcome.metrics)
    print(f"adapter written to {outcome.adapter_dir}")
    return 0


class _ProgressBar:
    """A tqdm bar over optimizer steps, showing the latest losses."""

    def __enter__(self) -> _ProgressBar:
        self.bar: Any = None
        return self

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def data_checked(self, prepared: Any) -> None:
        print(f"data audit: {prepared.report.summary()}", file=sys.stderr)

    def update(self, report: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=report.total_steps, desc="Training", unit="step", file=sys.stderr)
        postfix = {"loss": f"{report.train_loss:.3f}"}
        if report.validation_loss is not None:
            postfix["val"] = f"{report.validation_loss:.3f}"
        self.bar.set_postfix(postfix)
        self.bar.update(1)


def _print_metrics(metrics: dict[str, Any]) -> None:
    if not metrics:
        print("no test examples: nothing evaluated (add data or raise test_fraction)")
        return
    samples = metrics["candidate"].samples
    print(f"{'model':12} {'loss':>8} {'exact':>7} {'format':>7}  (test split, n={samples})")
    for name, m in metrics.items():
        fmt = "-" if m.format_compliance is None else f"{m.format_compliance:.1%}"
        print(f"{name:12} {m.loss:8.4f} {m.exact_match:7.1%} {fmt:>7}")


def add_commands(sub: Any) -> None:
    """Add ``worker`` and ``train`` to the ``loraplex`` subcommands."""
    worker = sub.add_parser("worker", help="run fine-tuning jobs from the registry queue")
    add_settings_flags(worker, WORKER_SETTINGS)
    worker.add_argument("--work-dir", help="scratch directory (default: HOME/worker)")
    worker.add_argument("--worker-id", help="name in job records (default: host-pid-random)")
    worker.add_argument("--once", action="store_true", help="process at most one job, then exit")
    worker.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls")
    worker.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds")
    worker.add_argument(
        "--stale-after", type=float, default=120.0, help="re-queue jobs silent this long (s)"
    )
    worker.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="claims a job gets before this worker's reaper fails it when its worker falls silent",
    )
    worker.add_argument("--defaults", help="JSON file of default hyperparameters (TrainConfig)")
    worker.set_defaults(func=cmd_worker)

    train = sub.add_parser("train", help="train one adapter locally from a JSONL file")
    add_settings_flags(train, ["home", "base_model"])
    train.add_argument("data", help="training JSONL (messages, prompt/completion or preferences)")
    train.add_argument("--out", required=True, help="directory for the adapter files")
    train.add_argument("--validation", help="validation JSONL (default: split off the data)")
    train.add_argument("--method", choices=["supervised", "dpo"], default="supervised")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--schema", help="JSON schema file the answers must follow")
    train.add_argument("--defaults", help="JSON file of default hyperparameters (TrainConfig)")
    train.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a hyperparameter"
    )
    train.set_defaults(func=cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``worker`` or ``train`` standalone (``python -m server.cli.worker_commands ...``)."""
    parser = argparse.ArgumentParser(prog="loraplex")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
