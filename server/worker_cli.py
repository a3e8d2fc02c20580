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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.config import Settings, add_settings_flags, load_settings

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


def cmd_worker(args: argparse.Namespace) -> int:
    from registry.jobs import JobStore
    from server.bootstrap import StartupError, open_registry, served_base_fingerprint
    from training.worker import Worker, WorkerOptions

    settings = load_settings(vars(args))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    registry = open_registry(settings)
    try:
        fingerprint = served_base_fingerprint(settings, registry)
    except StartupError as exc:
        print(f"loraplex worker: {exc}", file=sys.stderr)
        return 2
    store = JobStore(registry, stale_after=args.stale_after, max_attempts=args.max_attempts)
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
            outcome = run_training(spec, Path(args.out), on_step=bar.update, on_prepared=bar.audit)
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

    def audit(self, prepared: Any) -> None:
        print(f"data audit: {prepared.audit.summary()}", file=sys.stderr)

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
    worker.add_argument("--max-attempts", type=int, default=3, help="claims before failing a job")
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
    """Run ``worker`` or ``train`` standalone (``python -m server.worker_cli ...``)."""
    parser = argparse.ArgumentParser(prog="loraplex")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
