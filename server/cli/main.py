"""The ``loraplex`` command line.

``loraplex serve`` runs the gateway (and its engines); ``loraplex demo-base``
builds the tiny demo model; ``loraplex config`` prints every setting. Registry
commands (tenants, keys, bases, adapters) come from ``server.cli.registry_commands``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from server.cli import alias_commands as alias_cli
from server.cli import capability_commands as capability_cli
from server.cli import compose_commands as compose_cli
from server.cli import dataset_commands as dataset_cli
from server.cli import drift_commands as drift_cli
from server.cli import erasure_commands as erasure_cli
from server.cli import eval_commands as eval_cli
from server.cli import registry_commands as registry_cli
from server.cli import remote_commands as remote_cli
from server.cli import retraining_commands as retraining_cli
from server.cli import routed_model_commands as routed_model_cli
from server.cli import shadow_commands as shadow_cli
from server.cli import upgrade_commands as upgrade_cli
from server.cli import usage_commands as usage_cli
from server.cli import webhook_commands as webhook_cli
from server.cli import worker_commands as worker_cli
from server.config import (
    SECRET_SETTINGS,
    Settings,
    SettingsError,
    add_settings_flags,
    env_name,
    field_docs,
    load_settings,
    masked,
)

Handler = Callable[[argparse.Namespace], int]


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(vars(args))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.cli.bootstrap import (
        StartupError,
        external_engines,
        local_supervisors,
        open_registry,
        served_base_fingerprint,
    )
    from server.gateway.transport import server_config

    settings = settings_from(args)
    _setup_logging(settings)
    try:
        registry = open_registry(settings)
        if settings.external_engines:
            # Each engine says which base it serves: the gateway needs none of its own, but
            # registers a local one it is pointed at, as a gateway that runs its engines does.
            if (settings.resolved_base_model / "config.json").is_file():
                served_base_fingerprint(settings, registry)
            app = create_app(settings, registry, engines=external_engines(settings))
        else:
            base_fingerprint = served_base_fingerprint(settings, registry)
            supervisors = local_supervisors(settings, base_fingerprint)
            app = create_app(settings, registry, supervisors=supervisors)
    except StartupError as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 2
    config = server_config(app, settings)
    print(f"loraplex: gateway on http://{settings.host}:{settings.port}", flush=True)
    # Server.run, not asyncio.run(serve()): it picks uvloop (and config picks httptools) when
    # installed, which cuts the gateway's CPU per proxied request.
    uvicorn.Server(config).run()
    return 0


def cmd_demo_base(args: argparse.Namespace) -> int:
    from training.demo_base import build_demo_base

    settings = settings_from(args)
    out = Path(args.out) if args.out else settings.home / "demo-base"
    path = build_demo_base(out)
    print(path)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the registry schema (run once per upgrade, before the gateways)."""
    from server.cli.bootstrap import open_registry

    registry = open_registry(settings_from(args))
    registry.close()
    print("loraplex: registry schema is up to date")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print every setting: its variable, current value and meaning."""
    settings = settings_from(args)
    docs = field_docs()
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        shown = "(set)" if f.name in SECRET_SETTINGS and value else masked(value)
        print(f"{env_name(f.name):34} {shown:28} {docs.get(f.name, '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex", description="Multi-LoRA serving and adapter registry."
    )
    remote_cli.add_global_flags(parser)  # with a URL, customer commands go over HTTP
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway and its engines")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo-base", help="build (once) the tiny demo base model")
    add_settings_flags(demo, ["home"])
    demo.add_argument("--out", help="output directory (default: HOME/demo-base)")
    demo.set_defaults(func=cmd_demo_base)

    migrate = sub.add_parser("migrate", help="create or upgrade the registry's schema")
    add_settings_flags(migrate, ["home", "database_url", "blob_url", "s3_endpoint_url"])
    migrate.set_defaults(func=cmd_migrate)

    config = sub.add_parser("config", help="print the settings and where they come from")
    add_settings_flags(config)
    config.set_defaults(func=cmd_config)

    registry_cli.add_commands(sub)
    drift_cli.add_commands(sub)
    shadow_cli.add_commands(sub)
    alias_cli.add_commands(sub)
    compose_cli.add_commands(sub)
    usage_cli.add_commands(sub)
    eval_cli.add_commands(sub)
    capability_cli.add_commands(sub)
    worker_cli.add_commands(sub)
    retraining_cli.add_commands(sub)
    erasure_cli.add_commands(sub)
    dataset_cli.add_commands(sub)
    webhook_cli.add_commands(sub)
    routed_model_cli.add_commands(sub)
    upgrade_cli.add_commands(sub)
    return parser


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx (used by some dependencies) logs every request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if remote_cli.wants_remote(argv):
        return remote_cli.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except SettingsError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
