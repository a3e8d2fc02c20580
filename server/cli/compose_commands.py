"""``loraplex adapters compose NAME --tenant T --parent a@1:0.7 --parent b@2:0.3``: a new
version of adapter NAME composed from the tenant's versions (``training.compose``).

``--method`` is ``linear`` (the default), ``ties``, ``dare_linear`` or ``dare_ties``;
``--density`` (the share of each weight change kept) is required by the last three,
``--seed`` fixes DARE's random drop, ``--target-rank`` the result's rank (default: the
parents' summed rank capped at the serving rank). The version is pushed like any
upload, so evaluate it and promote it as any other (gates apply).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from registry import Registry
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, operator

_PARENT = re.compile(r"^(?P<adapter>[^@\s]+)@(?P<version>\d+)(?::(?P<weight>[^:]+))?$")


def parent_arg(text: str) -> tuple[str, int, float]:
    """``NAME@VERSION[:WEIGHT]`` (weight 1 when left out) as (name, version, weight)."""
    match = _PARENT.match(text)
    try:
        if match is None:
            raise ValueError
        weight = float(match["weight"]) if match["weight"] is not None else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME@VERSION[:WEIGHT], e.g. support-bot@3:0.7"
        ) from None
    return match["adapter"], int(match["version"]), weight


def adapters_compose(registry: Registry, args: argparse.Namespace) -> int:
    # Imported here: torch and PEFT load only for this command, not for every CLI call.
    from training.compose import CompositionSpec, Parent, compose

    spec = CompositionSpec(
        [Parent(*parent) for parent in args.parent],
        args.method,
        density=args.density,
        seed=args.seed,
        target_rank=args.target_rank,
        majority_sign_method=args.majority_sign_method,
    )
    tenant_id = _tenant_id(registry, args)
    version = compose(registry, tenant_id, args.name, spec, operator(), args.description)
    if args.json:
        print(json.dumps({"version": version.number, "composition": version.composition}))
        return 0
    parents = ", ".join(f"{a}@{v} x {w:g}" for a, v, w in args.parent)
    print(
        f"{args.name} version {version.number}: {version.lora_name} (rank {version.rank}, "
        f"{args.method} of {parents})",
        file=sys.stdout,
    )
    return 0


def add_commands(sub: Any) -> None:
    """Add ``compose`` to the ``adapters`` group (``registry_commands`` makes the group)."""
    adapters = sub.choices["adapters"]
    group = next(a for a in adapters._actions if isinstance(a, argparse._SubParsersAction))
    compose = _command(
        group, "compose", adapters_compose, "compose a new version from the tenant's versions"
    )
    compose.add_argument("name", help="the adapter the composition becomes the next version of")
    compose.add_argument(
        "--parent",
        action="append",
        required=True,
        type=parent_arg,
        metavar="NAME@VERSION[:WEIGHT]",
        help="a version to compose and its weight (default 1); give two or more",
    )
    compose.add_argument(
        "--method", default="linear", help="linear, ties, dare_linear or dare_ties"
    )
    compose.add_argument("--density", type=float, help="share kept, (0, 1]: ties and dare_*")
    compose.add_argument("--seed", type=int, help="DARE's random drop (default 0)")
    compose.add_argument("--target-rank", type=int, help="rank of the result")
    compose.add_argument(
        "--majority-sign-method", help="TIES sign election: total (default) or frequency"
    )
    compose.add_argument("--description", default=None)
    compose.add_argument("--json", action="store_true", help="print the version as JSON")
    _tenant_flag(compose)
